"""Reading image fields of every supported kind, decoding (corrupt and truncated files), storage encoding."""
import base64
import http.server
import io
import threading

import PIL.Image
import pytest

from qwenvl_jax.cleaning import images
from tests.cleaning.cases import GREEN, encode

_READ = dict(max_bytes=1 << 20, timeout_s=1.0)


def test_read_every_kind_of_field(tmp_path):
  data = encode(color=GREEN)
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "g.jpg").write_bytes(data)
  b64 = base64.b64encode(data).decode()
  fields = [
      data,
      bytearray(data),
      memoryview(data),
      "sub/g.jpg",                                   # relative to root
      str(tmp_path / "sub" / "g.jpg"),               # absolute
      {"bytes": data, "path": "ignored.jpg"},        # Hugging Face datasets layout, bytes win
      {"bytes": None, "path": "sub/g.jpg"},
      {"bytes": b64},                                # JSON carries base64
      f"data:image/jpeg;base64,{b64}",
  ]
  for field in fields:
    assert images.read_image_bytes(field, root=str(tmp_path), **_READ) == data, field


@pytest.mark.parametrize("field, message", [
    ("missing.jpg", "cannot read"),
    ("", "empty or unsupported"),
    (12, "unsupported image field of type int"),
    (b"", "0 bytes"),
    ({"path": ""}, "neither bytes nor path"),
    ({"bytes": "not base64!"}, "invalid base64"),
    ("data:image/png,rawtext", "not base64"),
    ("http://127.0.0.1:9/x.jpg", "cannot fetch"),
    (b"x" * 2000, "over max_image_bytes=1000"),
])
def test_read_failures_are_image_read_errors(tmp_path, field, message):
  with pytest.raises(images.ImageReadError, match=message):
    images.read_image_bytes(field, root=str(tmp_path), max_bytes=1000, timeout_s=1.0)


def test_decode_full_image_and_its_format():
  decoded = images.decode_image(encode(size=(120, 100), fmt="PNG"), max_pixels=10**6)
  assert (decoded.width, decoded.height, decoded.format) == (120, 100, "PNG")


@pytest.mark.parametrize("data", [
    b"definitely not an image",
    b"\x89PNG\r\n\x1a\n" + b"\x00" * 20,
    encode(size=(300, 300))[:300],   # a truncated JPEG: the header reads, the pixels do not
    encode(size=(300, 300), fmt="PNG")[:200],
])
def test_corrupt_or_truncated_images_are_decode_errors(data):
  with pytest.raises(images.ImageDecodeError, match="cannot decode"):
    images.decode_image(data, max_pixels=10**6)


def test_pixel_budget_is_checked_before_decoding():
  with pytest.raises(images.ImageDecodeError, match="120x100 image is over max_image_pixels=11999"):
    images.decode_image(encode(size=(120, 100)), max_pixels=11_999)
  assert images.decode_image(encode(size=(120, 100)), max_pixels=12_000).width == 120


@pytest.mark.parametrize("fmt, mode, kept_as_is", [
    ("JPEG", "RGB", True),
    ("PNG", "RGB", True),
    ("JPEG", "L", False),
    ("PNG", "RGBA", False),
    ("PNG", "P", False),
    ("GIF", "RGB", False),
    ("WEBP", "RGB", False),
    ("BMP", "RGB", False),
])
def test_storage_keeps_rgb_jpeg_png_and_converts_the_rest(fmt, mode, kept_as_is):
  data = encode(size=(64, 48), fmt=fmt, mode=mode)
  stored = images.encode_for_storage(images.decode_image(data, max_pixels=10**6), max_side=None, jpeg_quality=90)
  assert (stored == data) is kept_as_is
  with PIL.Image.open(io.BytesIO(stored)) as image:
    assert image.mode == "RGB" and image.size == (64, 48)
    assert image.format == (fmt if kept_as_is else "JPEG")


def test_storage_downscales_long_side():
  decoded = images.decode_image(encode(size=(300, 100)), max_pixels=10**6)
  stored = images.encode_for_storage(decoded, max_side=150, jpeg_quality=90)
  with PIL.Image.open(io.BytesIO(stored)) as image:
    assert image.size == (150, 50)
  assert images.encode_for_storage(decoded, max_side=300, jpeg_quality=90) == decoded.data


def test_describe_never_dumps_bytes():
  assert images.describe(b"abc") == "<3 bytes>"
  assert images.describe({"bytes": b"abcd", "path": "x.jpg"}) == "{bytes: <4 bytes>, path: x.jpg}"
  assert images.describe("data:image/png;base64," + "A" * 500).endswith("...")


def test_read_from_a_local_http_server(tmp_path):
  data = encode(color=GREEN)
  (tmp_path / "g.jpg").write_bytes(data)
  agents = []

  class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, directory=str(tmp_path), **kwargs)

    def do_GET(self):
      agents.append(self.headers.get("User-Agent"))
      super().do_GET()

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    url = f"http://127.0.0.1:{server.server_port}"
    assert images.read_image_bytes(f"{url}/g.jpg", root="/", **_READ) == data
    assert "qwenvl-jax-clean" in agents[0]
    with pytest.raises(images.ImageReadError, match="404"):
      images.read_image_bytes(f"{url}/missing.jpg", root="/", **_READ)
    with pytest.raises(images.ImageReadError, match="over max_image_bytes"):
      images.read_image_bytes(f"{url}/g.jpg", root="/", max_bytes=100, timeout_s=1.0)
  finally:
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("fmt, mode", [("PNG", "I;16"), ("JPEG", "CMYK"), ("PNG", "LA"), ("PNG", "P"),
                                       ("TIFF", "RGBA"), ("PNG", "1")])
def test_every_mode_decodes_to_rgb(fmt, mode):
  decoded = images.decode_image(encode(size=(40, 30), fmt=fmt, mode=mode), max_pixels=10**6)
  assert decoded.mode == mode and decoded.image.mode == "RGB" and decoded.image.size == (40, 30)
