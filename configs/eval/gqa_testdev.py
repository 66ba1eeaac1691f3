"""Evaluation config: gqa_testdev (vqa, metric gqa_exact_match; max/min new tokens 10/1).

  python -m qwenvl_jax.evaluate --config=configs/eval/gqa_testdev.py --config.output=results/gqa_testdev.json \\
      --config.checkpoint=CKPT --config.tokenizer=qwen.tiktoken --config.image_root=DATA_ROOT
"""
from qwenvl_jax.evaluation.config import default_config


def get_config(arg=None):
  return default_config('gqa_testdev', arg)
