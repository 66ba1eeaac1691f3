"""Evaluation config: vizwiz_test (vqa, metric none (submission split: predictions only); max/min new tokens 10/1).

  python -m qwenvl_jax.evaluate --config=configs/eval/vizwiz_test.py --config.output=results/vizwiz_test.json \\
      --config.checkpoint=CKPT --config.tokenizer=qwen.tiktoken --config.image_root=DATA_ROOT
"""
from qwenvl_jax.evaluation.config import default_config


def get_config(arg=None):
  return default_config('vizwiz_test', arg)
