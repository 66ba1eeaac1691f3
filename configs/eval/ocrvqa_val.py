"""Evaluation config: ocrvqa_val (vqa, metric exact_match; max/min new tokens 100/1).

  python -m qwenvl_jax.evaluate --config=configs/eval/ocrvqa_val.py --config.output=results/ocrvqa_val.json \\
      --config.checkpoint=CKPT --config.tokenizer=qwen.tiktoken --config.image_root=DATA_ROOT
"""
from qwenvl_jax.evaluation.config import default_config


def get_config(arg=None):
  return default_config('ocrvqa_val', arg)
