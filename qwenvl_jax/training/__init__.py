"""Training of the three Qwen-VL stages: stage-aware optimizer, pure train step, checkpoints, metrics, loop.

Public surface:
  train(config) -> TrainResult                            (trainer.py: the loop; `python -m qwenvl_jax.train`)
  stage_config(stage, arg)                                (stage_config.py: a stage's experiment config defaults)
  make_optimizer, stage_frozen_patterns, param_labels     (optimizer.py)
  make_train_step, TrainState                             (step.py; the loss: model.losses.cross_entropy_sum)
  train_step_flops, StepFlops                             (flops.py: model FLOPs for MFU and the planner)
  Checkpointer, resolve_params_checkpoint                 (checkpointing.py)
"""
from qwenvl_jax.training.checkpointing import Checkpointer, resolve_params_checkpoint
from qwenvl_jax.training.flops import StepFlops, train_step_flops
from qwenvl_jax.training.optimizer import make_optimizer, param_labels, stage_frozen_patterns
from qwenvl_jax.training.stage_config import stage_config
from qwenvl_jax.training.step import TrainState, make_train_step
from qwenvl_jax.training.trainer import TrainResult, train

__all__ = [
    "Checkpointer", "StepFlops", "TrainResult", "TrainState", "make_optimizer",
    "make_train_step", "param_labels", "resolve_params_checkpoint", "stage_config", "stage_frozen_patterns", "train",
    "train_step_flops",
]
