"""Experiments over many runs: the ablation grids and the statistics that compare runs."""
