"""Stage 1 of Qwen-VL training (pre-training: ViT + adapter train, LLM frozen, 224 px, 512 tokens).

Fields and arg keys (model, res, fix_vit, scale): configs/common.py.

  python -m qwenvl_jax.train --config=configs/stage1.py                     # tiny model, synthetic data
  python -m qwenvl_jax.train --config=configs/stage1.py:model=qwen_vl_7b   # the paper's recipe
"""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("qwenvl_configs_common", pathlib.Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg=None):
  return common.stage_config(1, arg)
