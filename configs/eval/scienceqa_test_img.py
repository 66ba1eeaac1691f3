"""Evaluation config: scienceqa_test_img (multiple_choice, metric choice_accuracy; max/min new tokens 0/0).

  python -m qwenvl_jax.evaluate --config=configs/eval/scienceqa_test_img.py --config.output=results/scienceqa_test_img.json \\
      --config.checkpoint=CKPT --config.tokenizer=qwen.tiktoken --config.image_root=DATA_ROOT
"""
from qwenvl_jax.evaluation.config import default_config


def get_config(arg=None):
  return default_config('scienceqa_test_img', arg)
