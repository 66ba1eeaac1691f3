"""Multimodal prompt formatting: the list format, image spans, boxes and the grounding-answer parser.

Reference behaviour (SPEC §3.2–3.5, §4.2, §4.6; Gotchas 16, 19, 20):

* `from_list_format([{'image': p}, {'text': t}, {'ref': r, 'box': [[x1, y1, x2, y2], ...]}])` writes
  `"Picture 1:<img>p</img>\\n" + t + "<ref>r</ref><box>(x1,y1),(x2,y2)</box>"`. The default picture prefix is the
  reference tokenizer's exact form, `Picture {k}:` with NO space before `<img>`; the README / finetune-data /
  vLLM variant `Picture {k}: ` (with a space) is `PICTURE_PREFIX_README`. Numbering restarts at 1 on every call.
* An image occupies 258 positions: `<img>` + 256 x `<imgpad>` + `</img>`. The reference writes the path's UTF-8
  bytes into the first slots and loads the image inside the model; here images are loaded by the data pipeline, so
  `encode_with_images` emits only `<imgpad>` in the slots (same length and positions; the model overwrites all
  256 slots either way) and returns the paths in order of appearance. `path_bytes=True` reproduces the reference
  ids exactly.
* Box coordinates are integers in [0, 1000): (x1, y1) top-left, (x2, y2) bottom-right, x = column. Pixels map to
  them by `floor(1000 * x / size)` clipped to 999 (the reference's data preparation is not published; this is the
  inverse of its drawing rule). Back to pixels: `x / 1000 * size` truncated to int to draw (the reference's
  `draw_bbox_on_latest_picture`), `x / 999 * size` as floats to evaluate (the official grounding eval).
* `to_list_format(text)` splits an answer into `{'image'|'ref'|'box'|'quad'|'text': str}` segments like the
  reference; `parse_boxes` turns it into (ref, box) pairs, a box taking the ref only when the ref immediately
  precedes it (so in `<ref>a</ref><box>…</box><box>…</box>` only the first box is labelled, as the reference).
"""
from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence

from qwenvl_jax.text import tokenizer as qtok

PICTURE_PREFIX = "Picture {k}:"
PICTURE_PREFIX_README = "Picture {k}: "
IMAGE_TOKENS = 256
BOX_RANGE = 1000  # coordinates are integers in [0, BOX_RANGE)

_TAGS = {"image": (qtok.IMG_START, qtok.IMG_END), "ref": (qtok.REF_START, qtok.REF_END),
         "box": (qtok.BOX_START, qtok.BOX_END), "quad": (qtok.QUAD_START, qtok.QUAD_END)}
# One `<img>PATH</img>` span, its path captured; lazy, so `<img>a</img><img>b</img>` is two spans, and an unclosed
# `<img>` (generated text may end inside one) matches nothing rather than raising as `to_list_format` does.
IMAGE_SPAN = re.compile(r"<img>(.*?)</img>", re.DOTALL)
_START_RE = re.compile("|".join(re.escape(start) for start, _ in _TAGS.values()))
_KEY_OF_START = {start: key for key, (start, _) in _TAGS.items()}


class MalformedBoxError(ValueError):
  """A `<box>` whose content is not `(x1,y1),(x2,y2)` with integers 0 <= x1 <= x2 < 1000, 0 <= y1 <= y2 < 1000."""


# ----------------------------------------------------------------------------------------------------------------
# List format
# ----------------------------------------------------------------------------------------------------------------

def from_list_format(items: Sequence[Mapping], picture_prefix: str = PICTURE_PREFIX) -> str:
  """Builds the tagged prompt text of a list of elements, like the reference tokenizer's `from_list_format`.

  Args:
    items: dicts, each exactly one of
      `{'image': path}` → `picture_prefix.format(k=k) + "<img>" + path + "</img>\\n"`, k = 1, 2, … per call;
      `{'text': str}` → the text verbatim;
      `{'box': [[x1, y1, x2, y2], ...], 'ref': str (optional)}` → `<ref>ref</ref>` then one
        `<box>(x1,y1),(x2,y2)</box>` per box (integers in [0, 1000), see `normalize_box`);
      `{'quad': [[x1, y1, …, x4, y4], ...], 'ref': str (optional)}` → `<quad>(x1,y1),…,(x4,y4)</quad>` per quad
        (an extension: the reference tokenizer only emits boxes).
    picture_prefix: a format string with `{k}`; `PICTURE_PREFIX` (reference, default) or `PICTURE_PREFIX_README`.
  Raises:
    ValueError naming the element on an unknown or ambiguous element, an empty image path, or a bad box.
  """
  parts = []
  num_images = 0
  for index, item in enumerate(items):
    if not isinstance(item, Mapping):
      raise ValueError(f"element {index} of the list format is not a dict: {item!r}")
    keys = set(item)
    if keys == {"image"}:
      path = item["image"]
      _check_path(path, f"element {index}")
      num_images += 1
      parts.append(picture_prefix.format(k=num_images) + qtok.IMG_START + path + qtok.IMG_END + "\n")
    elif keys == {"text"}:
      if not isinstance(item["text"], str):
        raise ValueError(f"element {index}: 'text' must be a str, got {item['text']!r}")
      parts.append(item["text"])
    elif keys in ({"box"}, {"box", "ref"}, {"quad"}, {"quad", "ref"}):
      kind = "box" if "box" in keys else "quad"
      shapes = item[kind]
      if not isinstance(shapes, Sequence) or not shapes:
        raise ValueError(f"element {index}: {kind!r} must be a non-empty list of {kind}es, got {shapes!r}")
      if "ref" in item:
        parts.append(qtok.REF_START + str(item["ref"]) + qtok.REF_END)
      for shape in shapes:
        try:
          parts.append(box_to_text(shape) if kind == "box" else quad_to_text(shape))
        except MalformedBoxError as e:
          raise MalformedBoxError(f"element {index}: {e}") from None
    else:
      raise ValueError(f"element {index} of the list format has keys {sorted(keys)}; expected exactly one of "
                       "{'image'}, {'text'}, {'box'[, 'ref']}, {'quad'[, 'ref']}")
  return "".join(parts)


def to_list_format(text: str) -> list[dict[str, str]]:
  """Splits tagged text into `{'image'|'ref'|'box'|'quad'|'text': str}` segments, like the reference.

  The text is NFC-normalized; a tag's content runs to the next matching end tag (so `<ref>a<box>b</box></ref>`
  is one ref whose content is `a<box>b</box>`); empty text between tags is skipped.
  Raises ValueError on a start tag without its end tag (the reference's "Unclosed image token").
  """
  text = unicodedata.normalize("NFC", text)
  out: list[dict[str, str]] = []
  pos = 0
  while True:
    m = _START_RE.search(text, pos)
    if m is None:
      break
    if m.start() > pos:
      out.append({"text": text[pos:m.start()]})
    key = _KEY_OF_START[m.group()]
    end_tag = _TAGS[key][1]
    stop = text.find(end_tag, m.end())
    if stop < 0:
      raise ValueError(f"unclosed {m.group()} at character {m.start()} of {_excerpt(text, m.start())}")
    out.append({key: text[m.end():stop]})
    pos = stop + len(end_tag)
  if pos < len(text):
    out.append({"text": text[pos:]})
  return out


# ----------------------------------------------------------------------------------------------------------------
# Image spans
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EncodedText:
  """Token ids with the image spans expanded, and the image paths in order of appearance.

  ids: int ids; each image is `<img>` + n_image_tokens x `<imgpad>` + `</img>` (or path bytes, see
    `encode_with_images`).
  image_paths: the k-th path belongs to the k-th `<img>` of `ids`.
  """
  ids: list[int]
  image_paths: list[str]


def image_span_ids(tok: qtok.Tokenizer, n_tokens: int = IMAGE_TOKENS) -> list[int]:
  """`[<img>] + n_tokens x [<imgpad>] + [</img>]` (258 ids for Qwen-VL)."""
  if n_tokens < 1:
    raise ValueError(f"an image span needs at least one slot, got n_tokens={n_tokens}")
  return [tok.img_start_id] + [tok.img_pad_id] * n_tokens + [tok.img_end_id]


def encode_with_images(tok: qtok.Tokenizer, text: str, *, allowed_special: qtok.AllowedSpecial = "all",
                       n_image_tokens: int = IMAGE_TOKENS, path_bytes: bool = False) -> EncodedText:
  """Encodes text and rewrites every `<img>PATH</img>` into a fixed-size image span, like the reference tokenizer.

  Args:
    tok: any `Tokenizer`.
    text: text with `<img>PATH</img>` tags (e.g. from `from_list_format`).
    allowed_special: as `Tokenizer.encode`; `<img>` and `</img>` must be allowed for images to be found.
    n_image_tokens: slots per image (256 for Qwen-VL; tiny models may use fewer).
    path_bytes: write the path's UTF-8 bytes as ids 0–255 into the first slots and pad with `<imgpad>`, exactly
      the reference's ids (a path longer than the span is then an error). Off (default): all slots `<imgpad>`.
  Returns:
    `EncodedText(ids, image_paths)`.
  Raises:
    ValueError on an unclosed `<img>`, an empty path, special tokens inside a path, or an `<imgpad>` outside an
    image span (it would take an image feature the pipeline does not provide).
  """
  ids = tok.encode(text, allowed_special=allowed_special)
  special_ids = frozenset(tok.special_tokens.values())
  out: list[int] = []
  paths: list[str] = []
  end = 0
  while True:
    start = _find(ids, tok.img_start_id, end)
    _check_no_pad(tok, ids[end:len(ids) if start < 0 else start], text)
    if start < 0:
      out.extend(ids[end:])
      break
    out.extend(ids[end:start])
    stop = _find(ids, tok.img_end_id, start + 1)
    if stop < 0:
      raise ValueError(f"unclosed <img> (image {len(paths) + 1}) in {_excerpt(text, 0)}")
    inner = ids[start + 1:stop]
    if any(i in special_ids for i in inner):
      raise ValueError(f"image {len(paths) + 1}: special tokens inside <img>…</img> in {_excerpt(text, 0)}")
    path = tok.decode(inner, errors="strict")
    _check_path(path, f"image {len(paths) + 1}")
    paths.append(path)
    if path_bytes:
      raw = list(path.encode("utf-8"))
      if len(raw) > n_image_tokens:
        raise ValueError(f"image path {path!r} is {len(raw)} bytes, longer than the {n_image_tokens}-slot span")
      out.append(tok.img_start_id)
      out.extend(raw + [tok.img_pad_id] * (n_image_tokens - len(raw)))
      out.append(tok.img_end_id)
    else:
      out.extend(image_span_ids(tok, n_image_tokens))
    end = stop + 1
  return EncodedText(out, paths)


def decode_with_images(tok: qtok.Tokenizer, ids: Sequence[int], image_paths: Sequence[str] | None = None, *,
                       skip_special_tokens: bool = False, errors: str = "replace") -> str:
  """Inverse of `encode_with_images`: every closed image span becomes `<img>PATH</img>` again.

  The path of a span is read from its path bytes when it has some (reference ids), else taken from `image_paths`
  in order (empty when `image_paths` is None). With `skip_special_tokens` the tags are dropped and the path
  text stays, as the reference's decode.
  """
  ids = [int(i) for i in ids]
  pieces: list[str] = []
  paths = list(image_paths) if image_paths is not None else None
  image_index = 0
  end = 0
  while True:
    start = _find(ids, tok.img_start_id, end)
    stop = _find(ids, tok.img_end_id, start + 1) if start >= 0 else -1
    if stop < 0:
      pieces.append(tok.decode(ids[end:], skip_special_tokens=skip_special_tokens, errors=errors))
      break
    pieces.append(tok.decode(ids[end:start], skip_special_tokens=skip_special_tokens, errors=errors))
    inner = ids[start + 1:stop]
    n_bytes = _find(inner, tok.img_pad_id, 0)
    n_bytes = len(inner) if n_bytes < 0 else n_bytes
    if n_bytes:
      path = bytes(min(max(i, 0), 255) for i in inner[:n_bytes]).decode("utf-8", errors=errors)
    elif paths is not None:
      if image_index >= len(paths):
        raise ValueError(f"ids hold more image spans than the {len(paths)} image_paths given")
      path = paths[image_index]
    else:
      path = ""
    image_index += 1
    pieces.append(path if skip_special_tokens else qtok.IMG_START + path + qtok.IMG_END)
    end = stop + 1
  return "".join(pieces)


# ----------------------------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BoxRef:
  """One parsed box: `box` = (x1, y1, x2, y2) integers in [0, 1000); `ref` the phrase right before it, or None."""
  box: tuple[int, int, int, int]
  ref: str | None = None


def box_to_text(box: Sequence[int], ref: str | None = None) -> str:
  """`<ref>ref</ref><box>(x1,y1),(x2,y2)</box>` (the ref part only when given) for a normalized box."""
  x1, y1, x2, y2 = _check_box(box)
  text = f"{qtok.BOX_START}({x1},{y1}),({x2},{y2}){qtok.BOX_END}"
  return text if ref is None else qtok.REF_START + ref + qtok.REF_END + text


def quad_to_text(quad: Sequence[int]) -> str:
  """`<quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>` for 8 normalized coordinates."""
  coords = _check_coords(quad, 8, "quad")
  points = ",".join(f"({coords[i]},{coords[i + 1]})" for i in range(0, 8, 2))
  return qtok.QUAD_START + points + qtok.QUAD_END


def normalize_box(box: Sequence[float], width: float, height: float, *, clip: bool = False
                  ) -> tuple[int, int, int, int]:
  """Pixel box (x1, y1, x2, y2), inclusive-exclusive, in a `width` x `height` image → integers in [0, 1000).

  Each coordinate maps to `floor(1000 * v / size)`, clipped to 999 (so the right/bottom image edge is 999).
  Raises ValueError on a box outside the image or with x1 > x2 or y1 > y2, unless `clip` (then coordinates are
  clamped into the image first; an inverted box still raises).
  """
  if not (width > 0 and height > 0):
    raise ValueError(f"image size must be positive, got width={width}, height={height}")
  if len(box) != 4 or not all(_is_real(v) for v in box):
    raise ValueError(f"a box is 4 finite numbers (x1, y1, x2, y2), got {box!r}")
  x1, y1, x2, y2 = (float(v) for v in box)
  if clip:
    x1, x2 = (min(max(v, 0.0), width) for v in (x1, x2))
    y1, y2 = (min(max(v, 0.0), height) for v in (y1, y2))
  if x1 > x2 or y1 > y2:
    raise ValueError(f"box {tuple(box)} has x1 > x2 or y1 > y2")
  if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
    raise ValueError(f"box {tuple(box)} lies outside the {width}x{height} image (pass clip=True to clamp)")
  def scale(v, size):
    return min(int(math.floor(BOX_RANGE * v / size)), BOX_RANGE - 1)
  return scale(x1, width), scale(y1, height), scale(x2, width), scale(y2, height)


def denormalize_box(box: Sequence[int], width: float, height: float, *, convention: str = "draw"
                    ) -> tuple[float, float, float, float]:
  """Normalized box → pixels.

  convention="draw": `int(v / 1000 * size)`, ints (the reference's `draw_bbox_on_latest_picture`).
  convention="eval": `v / 999 * size`, floats (the official grounding evaluation, `evaluate_grounding.py`).
  """
  if convention not in ("draw", "eval"):
    raise ValueError(f"convention must be 'draw' or 'eval', got {convention!r}")
  x1, y1, x2, y2 = _check_coords(box, 4, "box")
  if convention == "draw":
    return (int(x1 / BOX_RANGE * width), int(y1 / BOX_RANGE * height),
            int(x2 / BOX_RANGE * width), int(y2 / BOX_RANGE * height))
  d = BOX_RANGE - 1
  return x1 / d * width, y1 / d * height, x2 / d * width, y2 / d * height


def parse_box(content: str) -> tuple[int, int, int, int]:
  """The content of one `<box>…</box>`, `(x1,y1),(x2,y2)`, as 4 ints. Raises MalformedBoxError."""
  # The reference strips every parenthesis and splits on commas; so do we, then validate what it does not.
  fields = content.replace("(", "").replace(")", "").split(",")
  if len(fields) != 4:
    raise MalformedBoxError(f"box {content!r} does not have 4 coordinates")
  coords = []
  for field in fields:
    field = field.strip()
    if not re.fullmatch(r"[0-9]{1,9}", field):
      raise MalformedBoxError(f"box {content!r}: {field!r} is not a non-negative integer")
    coords.append(int(field))
  try:
    return _check_box(coords)
  except MalformedBoxError as e:
    raise MalformedBoxError(f"box {content!r}: {e}") from None


def parse_boxes(text: str, *, strict: bool = True, chain_refs: bool = False) -> list[BoxRef]:
  """All boxes of a generated answer, each with the ref that immediately precedes it (stripped), or None.

  strict=True: a malformed box, or an unclosed tag, raises MalformedBoxError / ValueError.
  strict=False (evaluation): malformed boxes are skipped and an unclosed tag ends the parse; never raises on
    any string.
  chain_refs: a box right after another box (nothing between them) takes that box's ref, for one phrase with
    several boxes; the reference (`_fetch_all_box_with_ref`) and evaluation give it None.
  """
  if strict:
    segments = to_list_format(text)
  else:
    segments = _lenient_list_format(text)
  out: list[BoxRef] = []
  previous = None  # (segment index, ref) of the last parsed box
  for i, seg in enumerate(segments):
    if "box" not in seg:
      continue
    try:
      box = parse_box(seg["box"])
    except MalformedBoxError:
      if strict:
        raise
      continue
    ref = segments[i - 1]["ref"].strip() if i > 0 and "ref" in segments[i - 1] else None
    if ref is None and chain_refs and previous is not None and previous[0] == i - 1:
      ref = previous[1]
    previous = (i, ref)
    out.append(BoxRef(box, ref))
  return out


def strip_grounding(text: str) -> str:
  """Removes box/quad markup and keeps ref phrases (the TUTORIAL's cleanup for display)."""
  return re.sub(r"<ref>(.*?)</ref>(?:<box>.*?</box>)*(?:<quad>.*?</quad>)*", r"\1", text, flags=re.DOTALL)


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------

def _lenient_list_format(text: str) -> list[dict[str, str]]:
  try:
    return to_list_format(text)
  except ValueError:
    # Cut at the first unclosed start tag: everything after it is an incomplete generation.
    text = unicodedata.normalize("NFC", text)
    pos = 0
    while (m := _START_RE.search(text, pos)) is not None:
      stop = text.find(_TAGS[_KEY_OF_START[m.group()]][1], m.end())
      if stop < 0:
        return to_list_format(text[:m.start()])
      pos = stop + len(_TAGS[_KEY_OF_START[m.group()]][1])
    raise AssertionError("unreachable: to_list_format failed without an unclosed tag")


def _check_box(box: Sequence) -> tuple[int, int, int, int]:
  x1, y1, x2, y2 = _check_coords(box, 4, "box")
  if x1 > x2 or y1 > y2:
    raise MalformedBoxError(f"box ({x1},{y1}),({x2},{y2}) has x1 > x2 or y1 > y2")
  return x1, y1, x2, y2


def _check_coords(coords: Sequence, n: int, what: str) -> tuple[int, ...]:
  if isinstance(coords, (str, bytes)) or not isinstance(coords, Sequence) or len(coords) != n:
    raise MalformedBoxError(f"a {what} is {n} integer coordinates, got {coords!r}")
  out = []
  for v in coords:
    if not _is_real(v) or float(v) != int(v):
      raise MalformedBoxError(f"{what} {tuple(coords)}: coordinates must be integers in [0, {BOX_RANGE}) "
                              "(use normalize_box for pixel coordinates)")
    v = int(v)
    if not 0 <= v < BOX_RANGE:
      raise MalformedBoxError(f"{what} {tuple(coords)}: coordinate {v} is outside [0, {BOX_RANGE})")
    out.append(v)
  return tuple(out)


def _is_real(v) -> bool:
  try:
    return not isinstance(v, (bool, str, bytes)) and math.isfinite(float(v))
  except (TypeError, ValueError):
    return False


def _check_path(path, where: str) -> None:
  if not isinstance(path, str) or not path:
    raise ValueError(f"{where}: an image path must be a non-empty str, got {path!r}")
  if qtok.IMG_START in path or qtok.IMG_END in path:
    raise ValueError(f"{where}: image path {path!r} contains an image tag")


def _check_no_pad(tok: qtok.Tokenizer, ids: Sequence[int], text: str) -> None:
  if tok.img_pad_id in ids:
    raise ValueError(f"{qtok.IMG_PAD} outside an <img>…</img> span in {_excerpt(text, text.find(qtok.IMG_PAD))}")


def _find(ids: list[int], value: int, start: int) -> int:
  try:
    return ids.index(value, start)
  except ValueError:
    return -1


def _excerpt(text: str, at: int, width: int = 60) -> str:
  lo = max(at - width // 2, 0)
  return repr(("…" if lo else "") + text[lo:lo + width] + ("…" if lo + width < len(text) else ""))
