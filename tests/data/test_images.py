"""Tests of image preprocessing: the reference's PIL RGB + bicubic stretch, CLIP constants, clear errors."""
import io

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.data.images import CLIP_MEAN, CLIP_STD, ImageError, normalize, preprocess_image


def _png(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
@pytest.mark.parametrize("size", [16, 24])
def test_matches_pil_convert_then_bicubic_stretch(tmp_path, mode, size):
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (13, 37, 3), dtype=np.uint8)).convert(mode)
  path = tmp_path / "x.png"
  image.save(path)
  # The reference (SPEC §1.1): open, convert("RGB"), resize((S, S), BICUBIC), no crop, no aspect kept.
  want = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC))
  for source in (path, str(path), path.read_bytes(), Image.open(path)):
    got = preprocess_image(source, size)
    assert got.dtype == np.uint8 and got.shape == (size, size, 3)
    np.testing.assert_array_equal(got, want)


def test_array_input_and_identity_size():
  pixels = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
  np.testing.assert_array_equal(preprocess_image(pixels, 8), pixels)


def test_missing_file_names_the_path(tmp_path):
  with pytest.raises(ImageError, match="nope.jpg"):
    preprocess_image(tmp_path / "nope.jpg", 16)


def test_corrupt_and_truncated_files_are_errors(tmp_path):
  path = tmp_path / "bad.jpg"
  path.write_bytes(b"this is not an image")
  with pytest.raises(ImageError, match="bad.jpg"):
    preprocess_image(path, 16)
  good = _png(Image.new("RGB", (64, 64), (1, 2, 3)))
  with pytest.raises(ImageError):
    preprocess_image(good[: len(good) // 2], 16)
  with pytest.raises(ImageError, match="empty"):
    preprocess_image(b"", 16)


def test_bad_arguments():
  with pytest.raises(ImageError, match="uint8"):
    preprocess_image(np.zeros((4, 4, 3), np.float32), 4)
  with pytest.raises(ValueError, match="positive"):
    preprocess_image(np.zeros((4, 4, 3), np.uint8), 0)


def test_normalize_uses_the_openai_clip_constants():
  # OpenAI-CLIP mean/std as published (SPEC §1.1), written out here rather than imported.
  assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
  assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
  x = np.array([[[0, 128, 255]]], np.uint8)
  want = np.array([(0 / 255 - 0.48145466) / 0.26862954, (128 / 255 - 0.4578275) / 0.26130258,
                   (255 / 255 - 0.40821073) / 0.27577711], np.float32)
  np.testing.assert_allclose(normalize(x)[0, 0], want, rtol=1e-6)
