"""Image preprocessing exactly as the reference does it on the host (SPEC §1.1, Gotcha 11).

The reference opens the file with PIL, converts to RGB (alpha dropped, no EXIF transpose), stretches to S x S with
PIL's antialiased bicubic filter (aspect ratio not kept, no crop) and normalizes with the OpenAI-CLIP mean/std.
The pipeline stops after the resize and ships uint8[S, S, 3]: the model normalizes on device (DESIGN §2.1), which
moves 4x fewer bytes and gives the same numbers since the reference normalizes exactly this uint8 image.
"""
import io
import logging
import os
from typing import Union

import numpy as np
from PIL import Image

from qwenvl_jax import errors

# OpenAI-CLIP constants, channel order R, G, B (SPEC §1.1 step 4).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[bytes, str, os.PathLike, Image.Image, np.ndarray]


class ImageError(errors.InputFormatError):
  """An image that is missing, unreadable or not an image."""


def open_image(source: ImageLike) -> Image.Image:
  """Opens `source` (encoded bytes, a file path, a PIL image or uint8[H, W, 3]) as a PIL RGB image.

  Raises:
    ImageError: the file does not exist or cannot be decoded; the message names the file when there is one.
  """
  if isinstance(source, Image.Image):
    image = source
  elif isinstance(source, np.ndarray):
    if source.dtype != np.uint8 or source.ndim != 3 or source.shape[-1] != 3:
      raise ImageError(f"an array image must be uint8[H, W, 3], got {source.dtype}{list(source.shape)}")
    image = Image.fromarray(source, "RGB")
  elif isinstance(source, (bytes, bytearray, memoryview)):
    if not source:
      raise ImageError("empty image bytes")
    image = _decode(io.BytesIO(bytes(source)), "<bytes>")
  elif isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if os.path.isdir(path):
      raise ImageError(f"image path {path} is a folder, not an image file")
    if not os.path.isfile(path):
      raise ImageError(f"image file not found: {path}")
    image = _decode(path, path)
  else:
    raise ImageError(f"unsupported image source type {type(source).__name__}")
  if image.mode in _SIXTEEN_BIT_MODES:
    _warn_sixteen_bit(image.mode)
  # convert() is a no-op copy for RGB and drops alpha without compositing, as the reference does.
  return image if image.mode == "RGB" else image.convert("RGB")


# PIL modes of 16-bit (and 32-bit integer) grayscale: a 16-bit grayscale PNG opens as "I;16" or "I".
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_sixteen_bit = {"count": 0}


def _warn_sixteen_bit(mode: str) -> None:
  """Counts 16-bit grayscale images and warns once per process.

  PIL's convert("RGB") clips such pixels to 255 instead of scaling them (a 16-bit photo becomes near-white). The
  reference converts exactly so, and the model was trained on what it produced, so the numbers are kept; the
  warning tells the user that these images carry almost no information.
  """
  _sixteen_bit["count"] += 1
  if _sixteen_bit["count"] == 1:
    logging.getLogger("qwenvl_jax.data").warning(
        "a 16-bit grayscale image (PIL mode %s) was converted to RGB like the reference does, which clips every "
        "value above 255 (most pixels become white); convert such images to 8 bits beforehand to keep their "
        "content. Warned once; sixteen_bit_image_count() counts them", mode)


def sixteen_bit_image_count() -> int:
  """How many 16-bit grayscale images this process has opened (each was clipped to 8 bits, see the warning)."""
  return _sixteen_bit["count"]


def _decode(fp, name: str) -> Image.Image:
  try:
    image = Image.open(fp)
    # Decode now, so a truncated or corrupt file fails here (with its name) rather than later in resize().
    image.load()
  except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
    raise ImageError(f"cannot decode image {name}: {e}") from e
  return image


def preprocess_image(source: ImageLike, image_size: int) -> np.ndarray:
  """PIL RGB + bicubic stretch to a square, as the reference.

  Args:
    source: encoded bytes, a file path, a PIL image or uint8[H, W, 3].
    image_size: S, the side of the output (224 for stage 1, 448 after).

  Returns:
    uint8[S, S, 3], RGB, not normalized.

  Raises:
    ImageError: missing or corrupt image.
  """
  if image_size <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}")
  image = open_image(source)
  if image.size != (image_size, image_size):
    image = image.resize((image_size, image_size), Image.BICUBIC)
  return np.asarray(image, dtype=np.uint8)


def normalize(images: np.ndarray) -> np.ndarray:
  """CLIP normalization of uint8[..., 3] RGB images to float32[..., 3], the reference's ToTensor + Normalize.

  The model does this on device; this host version is the reference for its tests.
  """
  x = images.astype(np.float32) / 255.0
  return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
