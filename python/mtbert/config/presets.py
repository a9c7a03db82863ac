"""Named starting configurations, and the merge: defaults < preset < config file < flags."""

from __future__ import annotations

from typing import Optional

from .train_config import TrainConfig

# The embedded default is tuned to finish on a 2-core CPU in about 20 minutes.
PRESETS: dict[str, dict] = {
    "cpu-default": {},
    # The published final configuration (for a GPU or a long CPU run).
    "seed-final": {"epochs": 10, "lr": 5e-5, "batch_size": 8, "combine": "pcgrad",
                   "max_steps": None, "steps_per_epoch": None},
    # A few steps on tiny slices: checks that everything runs end to end.
    "smoke": {"max_steps": 20, "train_limit": 64, "eval_limit": 64, "batch_size": 8,
              "save_every": 10},
}


def config_from_sources(preset: Optional[str], file_values: dict, flag_values: dict) -> TrainConfig:
    """defaults < preset < config file < flags given on the command line (per entry for
    mappings such as `dropout`)."""
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    for source in (file_values, flag_values):
        for key, value in source.items():
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                value = {**values[key], **value}  # mappings (dropout per task) merge entry by entry
            values[key] = value
    return TrainConfig.from_dict(values)
