"""Logical-axis -> mesh-axis rule tables (data, not code). Select one by name with `config.mesh.rules`
(`sharding.load_rules`). They live in the package, not in the checkout's `configs/`, so an installed `qwenvl_jax`
finds them from any directory.

Each entry maps a logical axis name used in the model to the mesh axes it may be split over, in order of
preference; `qwenvl_jax.sharding.resolve_spec` keeps an axis only when it is free in that array and divides the
dimension, so the same table serves tiny and 9.6B models. Mesh axes: `data` (pure replicas; put it on DCN for
multi-slice), `fsdp` (parameters and optimizer state sharded, ZeRO-3 style), `tensor` (Megatron-style heads/MLP).

Training uses `fsdp` / `fsdp_tp`. Inference (generate, evaluate, serve) defaults to `inference_tp`: the weights are
split only over `tensor` (a host's chips) and replicated over `data` (one replica per host, or per group of
chips), so a decode step reads its weight shard in place instead of all-gathering every weight for every token as
`fsdp` does; `qwenvl_jax/inference/layout.py` builds its (data, tensor) mesh.
"""

_ACTIVATIONS = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_images", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_len", None),
    ("cache_heads", "tensor"),
    ("cache_head_dim", None),
)

# The CLIP scorer's own axes (qwenvl_jax/clip; its towers otherwise reuse the vit_* and text names): small tables
# (text positions, token types, projection width) that are never worth splitting.
_CLIP = (
    ("clip_text_pos", None),
    ("clip_token_types", None),
    ("clip_proj", None),
)

# Pure FSDP: every weight is split over `fsdp` along its model-width dimension, nothing over `tensor`.
FSDP = _ACTIVATIONS + (
    ("layers", None),
    ("norm", None),
    ("vocab", "fsdp"),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("mlp", "fsdp"),
    ("q_heads", None),
    ("kv_heads", None),
    ("head_dim", None),
    ("queries", None),
    ("vit_embed", "fsdp"),
    ("vit_mlp", "fsdp"),
    ("vit_heads", None),
    ("vit_pos", None),
    ("vit_patch", None),
    ("vit_channels", None),
) + _CLIP

# FSDP over the width dimensions plus tensor parallelism over heads, MLP width and vocabulary.
FSDP_TP = _ACTIVATIONS + (
    ("layers", None),
    ("norm", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("queries", None),
    ("vit_embed", "fsdp"),
    ("vit_mlp", "tensor"),
    ("vit_heads", "tensor"),
    ("vit_pos", None),
    ("vit_patch", None),
    ("vit_channels", None),
) + _CLIP

# Inference: Megatron tensor parallelism over `tensor` (attention heads, MLP width, vocabulary, the adapter's
# heads and output width, the ViT's heads and MLP width; the KV cache by heads), everything else replicated, and
# batch rows / serving slots / KV-cache rows split over `data` (independent replicas). Nothing is split over
# `fsdp`: a weight split there would be all-gathered by every decode step.
_INFERENCE_ACTIVATIONS = (
    ("act_batch", "data"),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_images", None),
    ("cache_batch", "data"),
    ("cache_len", None),
    ("cache_heads", "tensor"),
    ("cache_head_dim", None),
)

INFERENCE_TP = _INFERENCE_ACTIVATIONS + (
    ("layers", None),
    ("norm", None),
    ("vocab", "tensor"),
    ("embed", None),
    ("embed_out", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("queries", None),
    ("vit_embed", None),
    ("vit_mlp", "tensor"),
    ("vit_heads", "tensor"),
    ("vit_pos", None),
    ("vit_patch", None),
    ("vit_channels", None),
) + _CLIP

RULES = {"fsdp": FSDP, "fsdp_tp": FSDP_TP, "inference_tp": INFERENCE_TP}
INFERENCE_DEFAULT = "inference_tp"  # the table generate, evaluate, serve and the inference planner use by default
