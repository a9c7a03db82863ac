"""Using a trained model: scores and prediction files (evaluate.py), predictions from a
checkpoint for splits or single sentences (inference.py), and plots (plots.py)."""
