"""Stage 1 of Qwen-VL training (pre-training: ViT + adapter train, LLM frozen, 224 px, 512 tokens).

Fields, defaults and arg keys (model, res, fix_vit, scale): qwenvl_jax/training/stage_config.py.

  python -m qwenvl_jax.train --config=configs/stage1.py                     # tiny model, synthetic data
  python -m qwenvl_jax.train --config=configs/stage1.py:model=qwen_vl_7b   # the paper's recipe
"""
from qwenvl_jax.training.stage_config import stage_config


def get_config(arg=None):
  return stage_config(1, arg)
