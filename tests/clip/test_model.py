"""Our CLIP and Chinese-CLIP against transformers' CLIPModel / ChineseCLIPModel on the same tiny random checkpoints.

float32 on both sides. Stated tolerance: embeddings (unit vectors) within 1e-5, logits_per_image (scaled by
exp(logit_scale) ~ 14) within 1e-4; measured differences are ~2e-7 and ~3e-6. The inputs are the same PIL images
and strings: each side preprocesses and tokenizes with its own code.
"""
import numpy as np
import PIL.Image
import pytest
from flax import nnx

from qwenvl_jax import sharding
from qwenvl_jax.clip import ClipModel, load_clip, prepare
from qwenvl_jax.clip.config import preset
from tests.clip import reference

EMBED_ATOL, LOGIT_ATOL = 1e-5, 1e-4
TEXTS = {
    # The third is longer than the context: both sides must truncate it the same way.
    "clip": ["a red square on the table", "The GREEN grass!", "a photo of a blue cat " * 20, ""],
    "chinese_clip": ["一只红色的狗在沙滩上", "red cats on the 草地。", "照片" * 40, "a"],
}


def _images():
  rng = np.random.default_rng(0)
  # Portrait, landscape, square at model size, and a greyscale image (converted to RGB by both).
  arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((45, 37), (32, 61), (32, 32))]
  return [PIL.Image.fromarray(a) for a in arrays] + [PIL.Image.fromarray(arrays[0][..., 0], "L")]


@pytest.mark.parity
@pytest.mark.parametrize("family", ["clip", "chinese_clip"])
def test_embeddings_and_logits_match_transformers(family, clip_checkpoint, chinese_clip_checkpoint):
  folder, hf = clip_checkpoint if family == "clip" else chinese_clip_checkpoint
  model, info = load_clip(folder, family)
  images, texts = _images(), TEXTS[family]
  want_image, want_text, want_logits = reference.forward(hf, folder, family, images, texts, info.config.text_len)
  pixels = np.stack([prepare(im, info.image_spec) for im in images])
  ids, mask = info.tokenizer.pad(info.tokenizer.encode(texts), info.config.text_len)
  forward = nnx.jit(lambda m, *args: m(*args))  # one compiled program: faster than op-by-op on CPU
  image, text, logits = (np.asarray(x) for x in forward(model, pixels, ids, mask))
  np.testing.assert_allclose(image, want_image, atol=EMBED_ATOL, rtol=0)
  np.testing.assert_allclose(text, want_text, atol=EMBED_ATOL, rtol=0)
  np.testing.assert_allclose(logits, want_logits, atol=LOGIT_ATOL, rtol=0)
  # The scores differ between pairs by far more than the tolerance: the comparison is not vacuous.
  assert np.ptp(want_logits) > 100 * LOGIT_ATOL


@pytest.mark.parametrize("family", ["clip", "chinese_clip"])
def test_every_parameter_has_logical_axes_the_rule_tables_know(family):
  cfg = preset("tiny", family)
  _, state = nnx.split(nnx.eval_shape(lambda: ClipModel(cfg, mean=(0, 0, 0), std=(1, 1, 1), rngs=nnx.Rngs(0))))
  params = list(nnx.to_flat_state(state))
  assert len(params) > 20
  mesh_shape = {"data": 1, "fsdp": 2, "tensor": 2}
  for rules_name in ("fsdp", "fsdp_tp"):
    rules = sharding.load_rules(rules_name)
    for path, variable in params:
      axes = variable.get_metadata().get("out_sharding")
      assert axes is not None and len(axes) == len(variable.shape), path
      sharding.resolve_spec(variable.shape, axes, rules, mesh_shape)  # raises on an unknown name
