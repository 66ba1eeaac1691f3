"""Evaluation config: refcoco+_testB (grounding, metric grounding_accuracy; max/min new tokens 28/10).

  python -m qwenvl_jax.evaluate --config=configs/eval/refcocoplus_testB.py --config.output=results/refcocoplus_testB.json \\
      --config.checkpoint=CKPT --config.tokenizer=qwen.tiktoken --config.image_root=DATA_ROOT
"""
from qwenvl_jax.evaluation.config import default_config


def get_config(arg=None):
  return default_config('refcoco+_testB', arg)
