"""Stage 3 of Qwen-VL training (SFT: ViT frozen, adapter + LLM train; `fix_vit` also freezes ln_post/proj).

Fields and arg keys (model, res, fix_vit, scale): configs/common.py.

  python -m qwenvl_jax.train --config=configs/stage3.py                     # tiny model, synthetic data
  python -m qwenvl_jax.train --config=configs/stage3.py:model=qwen_vl_7b   # the paper's recipe
"""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("qwenvl_configs_common", pathlib.Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg=None):
  return common.stage_config(3, arg)
