"""Evaluation config: ai2diagram_test (vqa, metric exact_match; max/min new tokens 10/1).

  python -m qwenvl_jax.evaluate --config=configs/eval/ai2diagram_test.py --config.output=results/ai2diagram_test.json \\
      --config.checkpoint=CKPT --config.tokenizer=qwen.tiktoken --config.image_root=DATA_ROOT
"""
from qwenvl_jax.evaluation.config import default_config


def get_config(arg=None):
  return default_config('ai2diagram_test', arg)
