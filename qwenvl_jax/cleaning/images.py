"""Reading, decoding and storing the image of a pair; every failure is an exception the filter turns into a count.

An input image may be given as encoded bytes, a path, an http(s) URL, a `data:` URL, or a
{"bytes": ..., "path": ...} struct (Hugging Face datasets' image layout; in JSON the bytes are base64). Reading
fails with `ImageReadError` (the pair is "image_unreadable"), decoding with `ImageDecodeError`
("image_undecodable"). Neither ever escapes the cleaning job.

Kept images are stored as their original bytes when they are RGB JPEG or PNG and need no downscaling (no
re-encoding loss, no CPU spent); anything else (grey, CMYK, alpha, palette, GIF, WebP, ...) is converted to RGB the
way the reference preprocessing does (`PIL.Image.convert("RGB")`) and stored as JPEG.
"""
import base64
import binascii
import dataclasses
import http.client
import io
import os
import warnings
from typing import Any

import PIL.Image
from etils import epath

from qwenvl_jax import remote_fetch

_KEEP_AS_IS = frozenset({"JPEG", "PNG"})
# Many image hosts refuse Python's default user agent.
_HEADERS = {"User-Agent": "Mozilla/5.0 (compatible; qwenvl-jax-clean/1.0)"}


class ImageReadError(Exception):
  """The image bytes could not be obtained."""


class ImageDecodeError(Exception):
  """The bytes are not an image PIL can fully decode within the pixel budget."""


@dataclasses.dataclass(frozen=True)
class DecodedImage:
  """A fully decoded input image.

  Attributes:
    data: the encoded bytes as read.
    image: the pixels as an RGB PIL image (converted as the reference does when the file is not RGB).
    format: PIL's name of the file format ("JPEG", "PNG", ...).
    mode: the file's own PIL mode ("RGB", "L", "RGBA", "P", "CMYK", ...).
  """
  data: bytes
  image: PIL.Image.Image
  format: str
  mode: str

  @property
  def width(self) -> int:
    return self.image.width

  @property
  def height(self) -> int:
    return self.image.height


def describe(value: Any) -> str:
  """A short, JSON-safe description of an image field for reports (never the bytes themselves)."""
  if isinstance(value, (bytes, bytearray, memoryview)):
    return f"<{len(value)} bytes>"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
  if isinstance(value, str):
    return value if len(value) <= 200 or not value.startswith("data:") else value[:60] + "..."
  return repr(value)[:200]


def read_image_bytes(value: Any, *, root: str, max_bytes: int, timeout_s: float) -> bytes:
  """The encoded bytes an image field refers to.

  Args:
    value: the input's image field (bytes, path, URL, `data:` URL or {"bytes", "path"} struct).
    root: folder relative paths are resolved against.
    max_bytes: larger images are refused.
    timeout_s: the whole fetch of a URL (lookup, connect, headers, body, redirects) in seconds.

  Raises:
    ImageReadError: the field is empty, the file is missing, the fetch failed, or the image exceeds max_bytes.
  """
  if isinstance(value, dict):
    data = value.get("bytes")
    if data:
      value = _b64decode(data) if isinstance(data, str) else data
    elif value.get("path"):
      value = value["path"]
    else:
      raise ImageReadError("image struct has neither bytes nor path")
  if isinstance(value, (bytes, bytearray, memoryview)):
    data = bytes(value)
  elif isinstance(value, str) and value.startswith(("http://", "https://")):
    data = _fetch(value, max_bytes=max_bytes, timeout_s=timeout_s)
  elif isinstance(value, str) and value.startswith("data:"):
    header, _, payload = value.partition(",")
    if not header.endswith(";base64"):
      raise ImageReadError("data: URL is not base64-encoded")
    data = _b64decode(payload)
  elif isinstance(value, str) and value:
    path = epath.Path(value) if os.path.isabs(value) or "://" in value else epath.Path(root) / value
    try:
      data = path.read_bytes()
    except (OSError, ValueError) as e:
      raise ImageReadError(f"cannot read {os.fspath(path)}: {e}") from e
  else:
    raise ImageReadError(f"empty or unsupported image field of type {type(value).__name__}")
  if not data:
    raise ImageReadError("image is empty (0 bytes)")
  if len(data) > max_bytes:
    raise ImageReadError(f"image is {len(data)} bytes, over max_image_bytes={max_bytes}")
  return data


def _b64decode(text: str) -> bytes:
  try:
    return base64.b64decode(text, validate=True)
  except (binascii.Error, ValueError) as e:
    raise ImageReadError(f"invalid base64 image bytes: {e}") from e


def _fetch(url: str, *, max_bytes: int, timeout_s: float) -> bytes:
  """`url`'s bytes within `timeout_s` in all (`remote_fetch`: urllib's timeout bounds each read, so a server that
  trickled its answer held a Beam worker for as long as it liked)."""
  try:
    return remote_fetch.fetch(url, max_bytes=max_bytes, timeout=timeout_s, headers=_HEADERS)
  except remote_fetch.TooLargeError:
    raise ImageReadError(f"{url} is over max_image_bytes={max_bytes}") from None
  except (OSError, ValueError, http.client.HTTPException) as e:  # URLError / HTTPError / TimeoutError are OSErrors
    raise ImageReadError(f"cannot fetch {url}: {e}") from e


def decode_image(data: bytes, *, max_pixels: int) -> DecodedImage:
  """Fully decodes encoded image bytes to RGB (so truncated files are caught here, not in training).

  Raises:
    ImageDecodeError: unknown format, corrupt or truncated data, a mode that does not convert to RGB, or more
      than max_pixels pixels.
  """
  try:
    with warnings.catch_warnings():
      # Our own max_pixels budget is the limit; PIL's bomb warning would only repeat it.
      warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
      image = PIL.Image.open(io.BytesIO(data))
      width, height = image.size
      if width * height > max_pixels:
        raise ImageDecodeError(f"{width}x{height} image is over max_image_pixels={max_pixels}")
      image.load()
      file_format, mode = image.format or "", image.mode
      # convert() drops alpha without compositing, as the reference preprocessing does.
      rgb = image if mode == "RGB" else image.convert("RGB")
  except ImageDecodeError:
    raise
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) on bad files.
    raise ImageDecodeError(f"cannot decode image: {type(e).__name__}: {e}") from e
  if width < 1 or height < 1:
    raise ImageDecodeError(f"image has no pixels ({width}x{height})")
  return DecodedImage(data=data, image=rgb, format=file_format, mode=mode)


def encode_for_storage(decoded: DecodedImage, *, max_side: int | None, jpeg_quality: int) -> bytes:
  """Bytes to store for a kept image: the original when it is RGB JPEG/PNG within max_side, else RGB JPEG."""
  image = decoded.image
  too_big = max_side is not None and max(image.size) > max_side
  if not too_big and decoded.format in _KEEP_AS_IS and decoded.mode == "RGB":
    return decoded.data
  if too_big:
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, PIL.Image.Resampling.BICUBIC)
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=jpeg_quality)
  return out.getvalue()
