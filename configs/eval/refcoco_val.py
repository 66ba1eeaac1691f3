"""Evaluation config: refcoco_val (grounding, metric grounding_accuracy; max/min new tokens 28/10).

  python -m qwenvl_jax.evaluate --config=configs/eval/refcoco_val.py --config.output=results/refcoco_val.json \\
      --config.checkpoint=CKPT --config.tokenizer=qwen.tiktoken --config.image_root=DATA_ROOT
"""
from qwenvl_jax.evaluation.config import default_config


def get_config(arg=None):
  return default_config('refcoco_val', arg)
