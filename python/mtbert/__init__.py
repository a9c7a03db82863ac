"""mtbert: multi-task fine-tuning of BERT with gradient surgery, on a Rust core.

The public names are re-exported here; `mtbert._native` (the Rust extension)
stays private behind `mtbert.tokenizer` and `mtbert.pcgrad`.
"""

from .model.config import BertConfig
from .model.bert import BertModel, BertOutput
from .model.multitask import MultitaskBert, MultitaskConfig
from .model.optim import AdamW
from .mtl import PCGrad, gradient_conflicts
from .data.tokenizer import BatchEncoding, WordPieceTokenizer

__version__ = "0.1.0"

__all__ = [
    "AdamW",
    "BatchEncoding",
    "BertConfig",
    "BertModel",
    "BertOutput",
    "MultitaskBert",
    "MultitaskConfig",
    "PCGrad",
    "WordPieceTokenizer",
    "gradient_conflicts",
]
