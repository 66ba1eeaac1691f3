"""Stage 3 of Qwen-VL training (SFT: ViT frozen, adapter + LLM train; `fix_vit` also freezes ln_post/proj).

Fields, defaults and arg keys (model, res, fix_vit, scale, lora, qlora): qwenvl_jax/training/stage_config.py.

  python -m qwenvl_jax.train --config=configs/stage3.py                     # tiny model, synthetic data
  python -m qwenvl_jax.train --config=configs/stage3.py:model=qwen_vl_7b   # the paper's recipe
  python -m qwenvl_jax.train --config=configs/stage3.py:qlora=64            # LoRA r=64 on an nf4 LLM base
"""
from qwenvl_jax.training.stage_config import stage_config


def get_config(arg=None):
  return stage_config(3, arg)
