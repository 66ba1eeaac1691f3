"""Evaluation config: okvqa_val (vqa, metric vqa_accuracy; max/min new tokens 10/1).

  python -m qwenvl_jax.evaluate --config=configs/eval/okvqa_val.py --config.output=results/okvqa_val.json \\
      --config.checkpoint=CKPT --config.tokenizer=qwen.tiktoken --config.image_root=DATA_ROOT
"""
from qwenvl_jax.evaluation.config import default_config


def get_config(arg=None):
  return default_config('okvqa_val', arg)
