"""A small generated stage-1 input that exercises every cleaning rule, with the decision each row must get.

Each `Case` is one input row plus the outcome the test author expects for it: the rule that must reject it, or
"kept" with the cleaned caption. Two expectations are given because the pipeline tests run twice: once with the
score column ("clip", threshold 0.3) and once with the test scorer instead (`DominantColorScorer`, threshold 0.5),
which rejects captions that do not name the image's dominant colour.
"""
import base64
import gzip
import dataclasses
import io
import json
import pathlib
from typing import Any

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq

RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


def encode(size=(120, 100), color=RED, fmt="JPEG", mode="RGB") -> bytes:
  """Encoded bytes of a solid-colour image with a little noise (so JPEG sizes are realistic)."""
  rng = np.random.default_rng(sum(size) + sum(color))
  pixels = np.clip(np.array(color) + rng.integers(-10, 10, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
  image = PIL.Image.fromarray(pixels, "RGB")
  if mode != "RGB":
    image = image.convert(mode)
  out = io.BytesIO()
  image.save(out, format=fmt)
  return out.getvalue()


@dataclasses.dataclass(frozen=True)
class Case:
  """One input row, where it goes, and what must become of it."""
  name: str
  row: Any                      # dict written as one row, or a str written verbatim as a JSONL line
  with_column: str              # "kept" or the rule that rejects it in the score-column run
  with_scorer: str              # the same in the scorer run
  cleaned: str | None = None    # the caption the dataset must hold when kept
  shard: str = "a.jsonl"


def _cases(tmp: pathlib.Path) -> list[Case]:
  (tmp / "img").mkdir()
  (tmp / "img" / "red.jpg").write_bytes(encode(color=RED))
  (tmp / "img" / "blue.png").write_bytes(encode(color=BLUE, fmt="PNG"))
  (tmp / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
  (tmp / "img" / "truncated.jpg").write_bytes(encode(size=(300, 300), color=GREEN)[:400])
  absolute_green = tmp / "img" / "green.jpg"
  absolute_green.write_bytes(encode(color=GREEN))
  b64 = base64.b64encode(encode(color=BLUE)).decode()
  ok = {"clip": 0.9}
  return [
      Case("kept_path", {"text": "a red square on a table", "image": "img/red.jpg", **ok}, "kept", "kept",
           cleaned="a red square on a table"),
      Case("kept_abs_path_html", {"text": "<p>the <b>green</b> grass of a field &amp; the sky</p>",
                                  "image": str(absolute_green), **ok}, "kept", "kept",
           cleaned="the green grass of a field & the sky"),
      Case("kept_png_patterns", {"text": "a blue   sky!!! over the sea https://x.example/p.html IMG_1234.JPG",
                                 "image": "img/blue.png", **ok}, "kept", "kept", cleaned="a blue sky! over the sea"),
      Case("kept_struct_b64", {"text": "blue paint on a wall\u200b", "image": {"bytes": b64}, **ok},
           "kept", "kept", cleaned="blue paint on a wall"),
      Case("kept_chinese", {"text": "一只红色的狗在沙滩上 red", "image": "img/red.jpg", **ok}, "kept", "kept",
           cleaned="一只红色的狗在沙滩上 red"),
      Case("wrong_color", {"text": "a green square on a table", "image": "img/red.jpg", **ok}, "kept",
           "low_similarity", cleaned="a green square on a table"),
      Case("low_clip", {"text": "a red square in the dark", "image": "img/red.jpg", "clip": 0.1},
           "low_similarity", "kept", cleaned="a red square in the dark"),
      Case("bad_json", "{not json", "malformed", "malformed"),
      Case("no_image", {"text": "a red square on a table", **ok}, "malformed", "malformed"),
      Case("text_not_string", {"text": 42, "image": "img/red.jpg", **ok}, "malformed", "malformed"),
      Case("score_not_number", {"text": "a red square on a table", "image": "img/red.jpg", "clip": "high"},
           "malformed", "kept", cleaned="a red square on a table"),
      Case("too_short", {"text": "<b>red</b> http://a.example/b", "image": "img/red.jpg", **ok},
           "text_too_short", "text_too_short"),
      Case("too_long", {"text": " ".join(["red"] * 40), "image": "img/red.jpg", **ok},
           "text_too_long", "text_too_long"),
      # Fails the emoji rule and (tiny image) the size rule: the first rule in the order is the one counted.
      Case("emoji_and_small", {"text": "a red square 😀 on a table", "image": {"bytes": base64.b64encode(
          encode(size=(20, 20))).decode()}, **ok}, "emoji", "emoji"),
      Case("copyright_is_not_emoji", {"text": "a red square on a table © 2020", "image": "img/red.jpg", **ok},
           "kept", "kept", cleaned="a red square on a table © 2020"),
      Case("german", {"text": "ein roter Hund läuft über die Straße", "image": "img/red.jpg", **ok},
           "language", "language", shard="c.jsonl.gz"),
      Case("gz_kept", {"text": "red bricks of an old house", "image": "img/red.jpg", **ok}, "kept", "kept",
           cleaned="red bricks of an old house", shard="c.jsonl.gz"),
      Case("missing_file", {"text": "a red square on a table", "image": "img/missing.jpg", **ok},
           "image_unreadable", "image_unreadable"),
      Case("url_refused", {"text": "a red square on a table", "image": "http://127.0.0.1:9/red.jpg", **ok},
           "image_unreadable", "image_unreadable"),
      Case("not_an_image", {"text": "a red square on a table", "image": "img/broken.jpg", **ok},
           "image_undecodable", "image_undecodable"),
      Case("truncated", {"text": "a green square on a table", "image": "img/truncated.jpg", **ok},
           "image_undecodable", "image_undecodable"),
      # Parquet shard: images as raw bytes. A grey image has equal channels, so the test scorer calls it "red".
      Case("pq_kept_grey", {"text": "a red square on a table", "image": encode(color=RED, mode="L"), **ok},
           "kept", "kept", cleaned="a red square on a table", shard="b.parquet"),
      Case("pq_kept_rgba", {"text": "a green square on a table", "image": encode(color=GREEN, fmt="PNG",
                                                                                mode="RGBA"), **ok},
           "kept", "kept", cleaned="a green square on a table", shard="b.parquet"),
      Case("pq_wide", {"text": "a red banner on a table", "image": encode(size=(400, 100)), **ok},
           "aspect_ratio", "aspect_ratio", shard="b.parquet"),
      Case("pq_small", {"text": "a red square on a table", "image": encode(size=(90, 90)), **ok},
           "image_too_small", "image_too_small", shard="b.parquet"),
      Case("pq_garbage_bytes", {"text": "a red square on a table", "image": b"GIF89a garbage", **ok},
           "image_undecodable", "image_undecodable", shard="b.parquet"),
  ]


def write_inputs(tmp: pathlib.Path) -> list[Case]:
  """Writes the cases as a JSONL shard, a gzipped JSONL shard and a Parquet shard; returns them."""
  cases = _cases(tmp)
  by_shard: dict[str, list[Case]] = {}
  for case in cases:
    by_shard.setdefault(case.shard, []).append(case)
  for shard, shard_cases in by_shard.items():
    if ".jsonl" in shard:
      lines = [c.row if isinstance(c.row, str) else json.dumps(c.row, ensure_ascii=False) for c in shard_cases]
      data = ("\n".join(lines) + "\n").encode("utf-8")
      (tmp / shard).write_bytes(gzip.compress(data) if shard.endswith(".gz") else data)
    else:
      table = pa.table({
          "text": [c.row["text"] for c in shard_cases],
          "image": [c.row["image"] for c in shard_cases],
          "clip": [c.row["clip"] for c in shard_cases],
      })
      pq.write_table(table, tmp / shard)
  return cases


def case_ids(cases: list[Case]) -> dict[str, Case]:
  """Maps each case to the id the job gives it by default ("<shard file>:<row>": the line number from 1 in a JSONL
  shard, which the generator writes without blank lines; the row index from 0 in a Parquet shard)."""
  out, rows = {}, {}
  for case in cases:
    index = rows.get(case.shard, 0)
    rows[case.shard] = index + 1
    out[f"{case.shard}:{index if '.parquet' in case.shard else index + 1}"] = case
  return out
