"""Evaluation config: flickr (caption, metric cider; max/min new tokens 30/8).

  python -m qwenvl_jax.evaluate --config=configs/eval/flickr.py --config.output=results/flickr.json \\
      --config.checkpoint=CKPT --config.tokenizer=qwen.tiktoken --config.image_root=DATA_ROOT
"""
from qwenvl_jax.evaluation.config import default_config


def get_config(arg=None):
  return default_config('flickr', arg)
