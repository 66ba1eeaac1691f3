"""The Qwen-VL model in Flax NNX: configs, the ViT trunk, the adapter, the Qwen decoder and their composition."""

from qwenvl_jax.model.config import (LLMConfig, QwenVLConfig, ResamplerConfig, VisionConfig, get_preset, mid,
                                     qwen_vl_7b, tiny)
from qwenvl_jax.model.qwen import KVCache, ModelOutput, QwenLM
from qwenvl_jax.model.qwenvl import QwenVL
from qwenvl_jax.model.resampler import Adapter, Resampler
from qwenvl_jax.model.vit import VisionTransformer

__all__ = [
    "Adapter", "KVCache", "LLMConfig", "ModelOutput", "QwenLM", "QwenVL", "QwenVLConfig", "Resampler",
    "ResamplerConfig", "VisionConfig", "VisionTransformer", "get_preset", "mid", "qwen_vl_7b", "tiny",
]
