"""Evaluation config: ocrvqa_test (vqa, metric exact_match; max/min new tokens 100/1).

  python -m qwenvl_jax.evaluate --config=configs/eval/ocrvqa_test.py --config.output=results/ocrvqa_test.json \\
      --config.checkpoint=CKPT --config.tokenizer=qwen.tiktoken --config.image_root=DATA_ROOT
"""
from qwenvl_jax.evaluation.config import default_config


def get_config(arg=None):
  return default_config('ocrvqa_test', arg)
