"""Evaluation config: vqav2_testdev (vqa, metric none (submission split: predictions only); max/min new tokens 10/1).

  python -m qwenvl_jax.evaluate --config=configs/eval/vqav2_testdev.py --config.output=results/vqav2_testdev.json \\
      --config.checkpoint=CKPT --config.tokenizer=qwen.tiktoken --config.image_root=DATA_ROOT
"""
from qwenvl_jax.evaluation.config import default_config


def get_config(arg=None):
  return default_config('vqav2_testdev', arg)
