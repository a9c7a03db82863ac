"""mtbert: multi-task fine-tuning of BERT with gradient surgery, on a Rust core.

The public names are re-exported here; `mtbert._native` (the Rust extension)
stays private behind `mtbert.tokenizer` and `mtbert.pcgrad`.
"""

from .config import BertConfig
from .model import BertModel, BertOutput
from .multitask import MultitaskBert, MultitaskConfig
from .optim import AdamW
from .pcgrad import PCGrad, gradient_conflicts  # the module stays `mtbert.pcgrad`
from .tokenizer import BatchEncoding, WordPieceTokenizer

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
