"""End to end: a converted Qwen-VL-format checkpoint gives the PyTorch reference's image features and logits.

The checkpoint is random tensors in the exact reference naming (tiny config, float32); it goes through
`torch_to_orbax` and `load_model` (sharded over 8 fake devices). The references are the model-core parity modules
(`tests/model/torch_reference.py`: the ViT trunk and `nn.MultiheadAttention` adapter written from the spec, and
transformers' `Qwen2ForCausalLM` for the decoder) loaded straight from the same PyTorch state dict by name.
Tolerance (float32 both sides): logits within 2e-4 absolute + 2e-4 relative.
"""
import numpy as np
import pytest
import torch

from qwenvl_jax import checkpoint, sharding
from qwenvl_jax.model import tiny
from tests.model import torch_reference

pytestmark = [pytest.mark.parity, pytest.mark.slow]

ATOL = RTOL = 2e-4


def _reference_visual(cfg, state):
  """TorchVisionTrunk + TorchAdapter holding the checkpoint's `transformer.visual.*` tensors."""
  v, r = cfg.vision, cfg.resampler
  trunk = torch_reference.TorchVisionTrunk(v.width, v.layers, v.heads, v.mlp_dim, v.patch_size, v.pos_grid)
  vis = {k[len("transformer.visual."):]: t for k, t in state.items() if k.startswith("transformer.visual.")}
  trunk_sd = {k.replace("transformer.resblocks.", "resblocks."): t for k, t in vis.items()
              if not k.startswith(("attn_pool.", "ln_post.", "proj"))}
  trunk.load_state_dict(trunk_sd, strict=True)
  adapter = torch_reference.TorchAdapter(r.grid, cfg.llm.width, r.heads, v.width,
                                         np.zeros((r.num_queries, cfg.llm.width), np.float32))
  adapter_sd = {k[len("attn_pool."):] if k.startswith("attn_pool.") else k: t for k, t in vis.items()
                if k.startswith(("attn_pool.", "ln_post.", "proj"))}
  adapter.load_state_dict(adapter_sd, strict=True)
  return trunk.eval(), adapter.eval()


def test_converted_checkpoint_gives_reference_logits(tmp_path, qwenvl_checkpoint):
  # 448 px = 32x32 patches, so both positional tables are resized; forward only, so no remat.
  cfg = tiny(dtype="float32", param_dtype="float32", remat_policy="none").with_image_size(448)
  src, state = qwenvl_checkpoint(cfg, fmt="bin", dtype=torch.float32, seed=4)
  checkpoint.torch_to_orbax(src, tmp_path / "orbax", cfg)
  model = checkpoint.load_model(tmp_path / "orbax", cfg, sharding.make_mesh({"fsdp": -1}),
                                sharding.load_rules("fsdp"))

  rng = np.random.default_rng(0)
  b, q, s = 2, cfg.image_tokens, cfg.vision.image_size
  images = rng.integers(0, 256, (b, 1, s, s, 3), dtype=np.uint8)
  ids = rng.integers(0, cfg.image_pad_id - 2, (b, 6 + q + 3)).astype(np.int32)
  ids[:, 6:6 + q] = cfg.image_pad_id
  image_mask = np.ones((b, 1), bool)

  trunk, adapter = _reference_visual(cfg, state)
  mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
  std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
  pixels = (torch.from_numpy(images[:, 0]).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
  llm = cfg.llm
  ref_lm = torch_reference.qwen2_from_qwen_weights(
      {k: t for k, t in state.items() if not k.startswith("transformer.visual.")},
      llm.vocab_size, llm.width, llm.layers, llm.heads, llm.mlp_dim)
  with torch.no_grad():
    ref_feats = adapter(trunk(pixels))  # [B, Q, D]
    embeds = ref_lm.model.embed_tokens(torch.from_numpy(ids).long())
    embeds[:, 6:6 + q] = ref_feats
    ref_logits = ref_lm(inputs_embeds=embeds).logits.numpy()

  logits = np.asarray(model(ids, images=images, image_mask=image_mask).logits)
  # Every position after the image span attends to the image features, so a wrong visual or adapter layout
  # fails here as surely as a wrong decoder layout.
  np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=RTOL)
