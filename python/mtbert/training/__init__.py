"""Training: building a run, the step, the loop, its records, saving and resume, the final
evaluation, torchrun, and the non-finite checks. `train(cfg)` is the entry point."""

from ..config import PRESETS, TrainConfig, config_from_sources
from .finish import finish_run
from .loop import Evaluator, due, train
from .records import DiscardedLog, MetricsLog, TrainLog
from .run import (Run, RunData, build_model_config, build_run, load_run_data, pick_device, pick_precision,
                  task_probabilities)
from .state import load_resume_state, save_best, save_last
from .step import (StepResult, backward, clip_gradients, compute_task_loss, forward_losses, lr_factor, next_batches,
                   optimizer_step, set_learning_rate, step_tasks, train_step)

__all__ = ["train", "TrainConfig", "PRESETS", "config_from_sources", "build_run", "Run", "RunData", "train_step",
           "StepResult", "Evaluator", "MetricsLog", "DiscardedLog", "TrainLog", "save_best", "save_last",
           "load_resume_state", "finish_run", "due", "backward", "clip_gradients", "compute_task_loss",
           "forward_losses", "lr_factor", "next_batches", "optimizer_step", "set_learning_rate", "step_tasks",
           "task_probabilities", "build_model_config", "load_run_data", "pick_device", "pick_precision"]
