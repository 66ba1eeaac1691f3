"""Host preprocessing against transformers' PIL image processors (the reference; no torchvision on either side)."""
import numpy as np
import PIL.Image
import pytest
import transformers

from qwenvl_jax.clip import CheckpointError
from qwenvl_jax.clip.images import ImageSpec, default_spec, prepare, spec_from_hf

SIZES = [(45, 37), (37, 45), (32, 32), (300, 17), (33, 200), (64, 64)]


def _normalize(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
  """What the model does on device, in numpy: [H, W, 3] uint8 -> [3, H, W] float like the processor's output."""
  x = (pixels.astype(np.float32) / 255.0 - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
  return x.transpose(2, 0, 1)


@pytest.mark.parametrize("squash", [False, True])
def test_prepare_matches_the_transformers_pil_processor(squash):
  if squash:
    processor = transformers.ChineseCLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
  else:
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  spec = spec_from_hf(processor.to_dict(), 32)
  rng = np.random.default_rng(0)
  for h, w in SIZES:
    image = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    want = processor(images=image, return_tensors="np")["pixel_values"][0]
    got = prepare(image, spec)
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    np.testing.assert_allclose(_normalize(got, spec), want, atol=1e-5, rtol=0, err_msg=f"{h}x{w}")


def test_old_feature_extractor_format_and_defaults():
  old = {"crop_size": 224, "do_center_crop": True, "size": 224, "resample": 3}
  assert spec_from_hf(old, 224) == default_spec(224)
  assert spec_from_hf({}, 224) == default_spec(224)


@pytest.mark.parametrize("raw, message", [
    ({"do_normalize": False}, "do_normalize"),
    ({"crop_size": 112}, "112"),
    ({"size": {"height": 224, "width": 200}, "do_center_crop": False}, "vision tower takes 224"),
    ({"image_mean": [0.5, 0.5]}, "3 values"),
])
def test_settings_that_cannot_feed_the_model_are_refused(raw, message):
  with pytest.raises(CheckpointError, match=message):
    spec_from_hf(raw, 224)
