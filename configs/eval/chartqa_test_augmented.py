"""Evaluation config: chartqa_test_augmented (vqa, metric relaxed_accuracy; max/min new tokens 100/1).

  python -m qwenvl_jax.evaluate --config=configs/eval/chartqa_test_augmented.py --config.output=results/chartqa_test_augmented.json \\
      --config.checkpoint=CKPT --config.tokenizer=qwen.tiktoken --config.image_root=DATA_ROOT
"""
from qwenvl_jax.evaluation.config import default_config


def get_config(arg=None):
  return default_config('chartqa_test_augmented', arg)
