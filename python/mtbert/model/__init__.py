"""The model: minBERT (bert.py, configured by config.py), the multi-task heads (multitask.py),
pretrained folders (pretrained.py), AdamW (optim.py) and the regularizers (regularization.py)."""

from .bert import BertModel, BertOutput
from .config import BertConfig
from .multitask import MultitaskBert, MultitaskConfig
from .optim import AdamW

__all__ = ["BertModel", "BertOutput", "BertConfig", "MultitaskBert", "MultitaskConfig", "AdamW"]
