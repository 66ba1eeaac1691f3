"""Host-side image preprocessing of a CLIP checkpoint, as its `preprocessor_config.json` says (CLIPImageProcessor).

The reference (transformers' PIL image processor) does, per image: RGB conversion; resize with PIL (bicubic for
CLIP) either so the shortest side is `size.shortest_edge` (the long side becomes int(edge * long / short)) or to
`size.height x size.width`; a center crop to `crop_size` (top = (h - ch) // 2, left = (w - cw) // 2); rescale by
1/255; normalize with the OpenAI-CLIP mean/std. OpenAI CLIP uses shortest-edge 224 + center crop 224; the released
Chinese-CLIP checkpoints stretch to 224 x 224 without a crop, as the Chinese-CLIP repository's transform does.

`prepare` stops after the crop and returns uint8[S, S, 3]: the model normalizes on device with the same mean/std
(`ImageSpec.mean`, `.std`), which moves 4x fewer bytes and gives the reference's numbers for the same uint8 crop.
No torchvision: PIL does the resize, exactly the filter the reference's PIL backend runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np
from PIL import Image

from qwenvl_jax.clip.config import CheckpointError
from qwenvl_jax.data.images import CLIP_MEAN, CLIP_STD, ImageLike, open_image


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """What `prepare` does: resize (shortest edge, or exact height x width), optional center crop, mean/std.

  Attributes:
    shortest_edge: resize so the short side has this length (aspect ratio kept); None = use `resize_hw`.
    resize_hw: (height, width) to stretch to when `shortest_edge` is None.
    crop_hw: (height, width) of the center crop; None = no crop.
    resample: PIL resampling filter (3 = bicubic).
    mean, std: per-channel RGB normalization applied on device.
  """
  shortest_edge: int | None = 224
  resize_hw: tuple[int, int] | None = None
  crop_hw: tuple[int, int] | None = (224, 224)
  resample: int = int(Image.Resampling.BICUBIC)
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD

  def output_hw(self) -> tuple[int, int] | None:
    """(height, width) every prepared image has, or None when it depends on the input (no crop, shortest edge)."""
    if self.crop_hw is not None:
      return self.crop_hw
    return self.resize_hw if self.shortest_edge is None else None


def default_spec(image_size: int) -> ImageSpec:
  """transformers' CLIPImageProcessor defaults for an S-pixel model: shortest edge S, center crop S x S."""
  return ImageSpec(shortest_edge=image_size, crop_hw=(image_size, image_size))


def _hw(value: Any, where: str) -> tuple[int, int]:
  if isinstance(value, int) and not isinstance(value, bool):
    return value, value
  if isinstance(value, Mapping) and "height" in value and "width" in value:
    return int(value["height"]), int(value["width"])
  raise CheckpointError(f"preprocessor_config.json: {where} must be an integer or {{height, width}}, got {value!r}")


def spec_from_hf(raw: Mapping[str, Any], image_size: int) -> ImageSpec:
  """The ImageSpec of a `preprocessor_config.json` dict; missing fields take the CLIPImageProcessor defaults.

  Raises:
    CheckpointError: a setting this module does not implement, or one whose output is not `image_size` square.
  """
  for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
    if raw.get(flag) is False:
      raise CheckpointError(f"preprocessor_config.json sets {flag}=false, which this scorer does not implement")
  if raw.get("rescale_factor", 1 / 255) != 1 / 255 and abs(raw["rescale_factor"] - 1 / 255) > 1e-12:
    raise CheckpointError(f"preprocessor_config.json rescale_factor={raw['rescale_factor']}, expected 1/255")
  size = raw.get("size", {"shortest_edge": image_size})
  shortest, resize_hw = None, None
  if isinstance(size, int) and not isinstance(size, bool):
    shortest = size  # the old feature-extractor format: an int is the shortest edge (default_to_square=False)
  elif isinstance(size, Mapping) and "shortest_edge" in size:
    shortest = int(size["shortest_edge"])
  else:
    resize_hw = _hw(size, "size")
  crop = _hw(raw.get("crop_size", image_size), "crop_size") if raw.get("do_center_crop", True) else None
  mean, std = raw.get("image_mean", CLIP_MEAN), raw.get("image_std", CLIP_STD)
  if len(mean) != 3 or len(std) != 3:
    raise CheckpointError(f"preprocessor_config.json image_mean/image_std must have 3 values, got {mean}, {std}")
  spec = ImageSpec(shortest_edge=shortest, resize_hw=resize_hw, crop_hw=crop, resample=int(raw.get("resample", 3)),
                   mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
  if spec.output_hw() != (image_size, image_size):
    raise CheckpointError(f"preprocessor_config.json gives images of {spec.output_hw() or 'varying size'}, but "
                          f"the vision tower takes {image_size} x {image_size}")
  if shortest is not None and crop is not None and shortest < max(crop):
    raise CheckpointError(f"preprocessor_config.json: shortest_edge {shortest} is smaller than the crop {crop}")
  if resize_hw is not None and crop is not None and (crop[0] > resize_hw[0] or crop[1] > resize_hw[1]):
    raise CheckpointError(f"preprocessor_config.json: crop {crop} is larger than the resized image {resize_hw}")
  return spec


def read_spec(directory: str | os.PathLike, image_size: int) -> ImageSpec:
  """`spec_from_hf` of `<directory>/preprocessor_config.json`, or `default_spec` when the file is absent."""
  path = os.path.join(os.fspath(directory), "preprocessor_config.json")
  if not os.path.isfile(path):
    return default_spec(image_size)
  try:
    with open(path, encoding="utf-8") as f:
      return spec_from_hf(json.load(f), image_size)
  except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f"{path} is not a readable image processor config: {e}") from e


def prepare(source: ImageLike, spec: ImageSpec) -> np.ndarray:
  """One image -> uint8[S, S, 3] RGB, resized and cropped as the reference, not normalized.

  Args:
    source: encoded bytes, a path, a PIL image or uint8[H, W, 3] (any PIL mode; converted to RGB).
    spec: the checkpoint's preprocessing.
  """
  image = open_image(source)
  w, h = image.size
  if spec.shortest_edge is not None:
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  else:
    new_h, new_w = spec.resize_hw
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), Image.Resampling(spec.resample))
  pixels = np.asarray(image, dtype=np.uint8)
  if spec.crop_hw is not None:
    ch, cw = spec.crop_hw
    top, left = (new_h - ch) // 2, (new_w - cw) // 2
    pixels = pixels[top:top + ch, left:left + cw]
  return pixels
