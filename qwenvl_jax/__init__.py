"""qwenvl_jax: Qwen-VL in JAX/Flax NNX for TPU pods and GPU hosts."""
