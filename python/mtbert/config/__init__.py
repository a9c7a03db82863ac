"""The training configuration: every option declared once (options.py), TrainConfig
(train_config.py), and the presets with the merge of preset, file and flags (presets.py)."""

from .options import Declared, declarations, device_problem, problems
from .presets import PRESETS, config_from_sources
from .train_config import LEGACY_DROPOUT, TrainConfig

__all__ = ["TrainConfig", "PRESETS", "config_from_sources", "LEGACY_DROPOUT", "Declared", "declarations",
           "problems", "device_problem"]
