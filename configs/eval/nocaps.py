"""Evaluation config: nocaps (caption, metric cider; max/min new tokens 30/8).

  python -m qwenvl_jax.evaluate --config=configs/eval/nocaps.py --config.output=results/nocaps.json \\
      --config.checkpoint=CKPT --config.tokenizer=qwen.tiktoken --config.image_root=DATA_ROOT
"""
from qwenvl_jax.evaluation.config import default_config


def get_config(arg=None):
  return default_config('nocaps', arg)
