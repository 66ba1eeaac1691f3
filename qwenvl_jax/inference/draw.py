"""Drawing the boxes of a grounded answer on the latest picture (the reference's `draw_bbox_on_latest_picture`).

The picture is the last `<img>PATH</img>` found in the response, else in the queries of the history from newest to
oldest (the reference looks at the response first, then the user turns). Boxes are `<box>(x1,y1),(x2,y2)</box>`
on the [0, 1000) grid and become pixels as `int(v / 1000 * size)` (SPEC §4.6; the official grounding evaluation
divides by 999 instead). A box is labelled with the `<ref>` right before it. The reference picks a random colour
per ref and downloads the SimSun font; here colours come from a fixed palette (reproducible images) and the text
uses PIL's default font. Saving never replaces an existing file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from qwenvl_jax import new_files
from qwenvl_jax import text as qtext
from qwenvl_jax.data import images as image_lib

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40))


def latest_image(response: str, history: Sequence[tuple[str, str | None]] = ()) -> str | None:
  """Path of the latest picture: the last image of `response`, else of the newest history query that has one."""
  for q in [response] + [q for q, _ in reversed(list(history))]:
    # IMAGE_SPAN rather than `to_list_format`: generated text may hold unclosed tags, which must not raise here.
    paths = qtext.IMAGE_SPAN.findall(q)
    if paths:
      return paths[-1]
  return None


def draw_boxes(image: Image.Image, boxes: Sequence[qtext.BoxRef], *, line_width: int | None = None
               ) -> Image.Image:
  """A copy of `image` (RGB) with each box drawn and labelled with its ref; one colour per distinct ref."""
  out = image.convert("RGB").copy()
  w, h = out.size
  draw = ImageDraw.Draw(out)
  width = line_width or max(1, round(min(w, h) / 200))
  font = ImageFont.load_default(size=max(10, min(w, h) // 30))
  colours: dict[str | None, tuple[int, int, int]] = {}
  colour = PALETTE[0]
  for item in boxes:
    if item.ref is not None or not colours:
      colour = colours.setdefault(item.ref, PALETTE[len(colours) % len(PALETTE)])
    x1, y1, x2, y2 = qtext.denormalize_box(item.box, w, h, convention="draw")
    draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
    if item.ref:
      draw.text((x1 + width, y1 + width), item.ref, fill=colour, font=font)
  return out


def draw_bbox_on_latest_picture(response: str, history: Sequence[tuple[str, str | None]] = (), *,
                                image_root: str | None = None) -> Image.Image | None:
  """The latest picture with the boxes of `response` drawn, or None when the answer has no box or no picture
  is found. Malformed boxes in the answer are skipped (generated text is not trusted)."""
  boxes = qtext.parse_boxes(response, strict=False)
  if not boxes:
    return None
  path = latest_image(response, history)
  if path is None:
    return None
  if image_root and not os.path.isabs(path):
    path = os.path.join(image_root, path)
  return draw_boxes(image_lib.open_image(path), boxes)


def save_new_png(image: Image.Image, path: str | os.PathLike) -> None:
  """Writes a PNG at `path`, which must not exist (FileExistsError otherwise, checked atomically); a write that
  fails leaves no file."""
  with new_files.open_new(path, binary=True) as f:
    image.save(f, format="PNG")
