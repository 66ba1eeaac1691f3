"""Boxes drawn on the latest picture, with the reference's /1000 scaling; outputs are never overwritten."""
import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.inference import draw
from qwenvl_jax.text import BoxRef


def test_boxes_land_at_the_reference_pixel_positions():
  image = Image.new("RGB", (100, 50), (255, 255, 255))
  out = np.asarray(draw.draw_boxes(image, [BoxRef((100, 200, 500, 600), "cat")], line_width=1))
  # x = v / 1000 * 100, y = v / 1000 * 50: the rectangle spans x 10..50, y 10..30.
  red = list(draw.PALETTE[0])
  assert out[20, 10].tolist() == red and out[20, 50].tolist() == red  # left and right edges
  assert out[30, 30].tolist() == red and out[10, 30].tolist() == red  # bottom and top edges
  assert out[28, 30].tolist() == [255, 255, 255]                       # inside, below the label
  assert out[40, 80].tolist() == [255, 255, 255]                       # outside
  assert np.asarray(image).min() == 255  # the input is not modified


def test_one_colour_per_ref_and_unlabelled_boxes_keep_the_last():
  image = Image.new("RGB", (200, 200), (255, 255, 255))
  boxes = [BoxRef((0, 0, 100, 100), "a"), BoxRef((500, 500, 600, 600), None), BoxRef((800, 0, 900, 100), "b")]
  out = np.asarray(draw.draw_boxes(image, boxes, line_width=1))
  assert out[10, 0].tolist() == out[110, 100].tolist() == list(draw.PALETTE[0])
  assert out[10, 160].tolist() == list(draw.PALETTE[1])


def test_latest_image_prefers_the_response_then_the_newest_query():
  history = [("Picture 1:<img>a.png</img>\nhi", "ok"), ("Picture 1:<img>b.png</img>\nPicture 2:<img>c.png</img>", None)]
  assert draw.latest_image("no picture", history) == "c.png"
  assert draw.latest_image("<img>d.png</img>", history) == "d.png"
  assert draw.latest_image("x", [("y", "z")]) is None


def test_draw_on_latest_picture(tmp_path):
  path = tmp_path / "p.png"
  Image.new("RGB", (64, 64), (0, 0, 0)).save(path)
  history = [(f"<img>{path}</img>find the cat", None)]
  out = draw.draw_bbox_on_latest_picture("<ref>cat</ref><box>(0,0),(500,500)</box>", history)
  assert out is not None and np.asarray(out)[10, 0].tolist() == list(draw.PALETTE[0])
  assert draw.draw_bbox_on_latest_picture("no boxes here", history) is None
  assert draw.draw_bbox_on_latest_picture("<box>(1,2)</box> broken", history) is None
  assert draw.draw_bbox_on_latest_picture("<box>(0,0),(5,5)</box>", [("no image", None)]) is None


def test_save_new_png_never_overwrites(tmp_path):
  path = tmp_path / "out.png"
  image = Image.new("RGB", (4, 4))
  draw.save_new_png(image, path)
  assert Image.open(path).size == (4, 4)
  with pytest.raises(FileExistsError):
    draw.save_new_png(image, path)
