"""Stage 2 of Qwen-VL training (multi-task pre-training: everything trains, 448 px, 2048 tokens).

Fields, defaults and arg keys (model, res, fix_vit, scale): qwenvl_jax/training/stage_config.py.

  python -m qwenvl_jax.train --config=configs/stage2.py                     # tiny model, synthetic data
  python -m qwenvl_jax.train --config=configs/stage2.py:model=qwen_vl_7b   # the paper's recipe
"""
from qwenvl_jax.training.stage_config import stage_config


def get_config(arg=None):
  return stage_config(2, arg)
