"""mtbert: multi-task fine-tuning of BERT with gradient surgery, on a Rust core."""

__version__ = "0.1.0"
