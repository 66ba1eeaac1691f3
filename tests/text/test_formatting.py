"""Tests of the list format, image spans, box conversions and the grounding-answer parser."""
import unicodedata

import hypothesis
import hypothesis.strategies as st
import pytest

from qwenvl_jax.text import formatting as fmt

# ------------------------------------------------------------------------------------------------ list format


def test_from_list_format_reference_form():
  items = [{"image": "a.jpg"}, {"image": "dir/b.png"}, {"text": "Compare them."},
           {"ref": "the cat", "box": [[10, 20, 300, 400], [0, 0, 999, 999]]}, {"box": [[1, 2, 3, 4]]}]
  assert fmt.from_list_format(items) == (
      "Picture 1:<img>a.jpg</img>\nPicture 2:<img>dir/b.png</img>\nCompare them."
      "<ref>the cat</ref><box>(10,20),(300,400)</box><box>(0,0),(999,999)</box><box>(1,2),(3,4)</box>")


def test_picture_numbering_restarts_per_call_and_readme_variant():
  items = [{"image": "x.jpg"}, {"text": "hi"}]
  assert fmt.from_list_format(items) == fmt.from_list_format(items) == "Picture 1:<img>x.jpg</img>\nhi"
  assert fmt.from_list_format(items, picture_prefix=fmt.PICTURE_PREFIX_README) == "Picture 1: <img>x.jpg</img>\nhi"


def test_quad_extension():
  text = fmt.from_list_format([{"ref": "sign", "quad": [[1, 2, 3, 4, 5, 6, 7, 8]]}])
  assert text == "<ref>sign</ref><quad>(1,2),(3,4),(5,6),(7,8)</quad>"


@pytest.mark.parametrize("item, match", [
    ({"image": ""}, "non-empty"),
    ({"image": "a<img>b"}, "image tag"),
    ({"ref": "x"}, "keys"),
    ({"text": "a", "image": "b"}, "keys"),
    ({"box": [[1, 2, 3]]}, "4 integer"),
    ({"box": [[1.5, 2, 3, 4]]}, "integers"),
    ({"box": [[1, 2, 3, 1000]]}, "outside"),
    ({"box": [[5, 2, 3, 4]]}, "x1 > x2"),
    ({"box": []}, "non-empty"),
    ("text", "not a dict"),
])
def test_from_list_format_errors_name_the_element(item, match):
  with pytest.raises(ValueError, match=match) as info:
    fmt.from_list_format([{"text": "ok"}, item])
  assert "element 1" in str(info.value)


def test_to_list_format():
  text = "Picture 1:<img>a.jpg</img>\n<ref>the dog</ref><box>(1,2),(3,4)</box>and<quad>(1,1),(2,2),(3,3),(4,4)</quad>"
  assert fmt.to_list_format(text) == [
      {"text": "Picture 1:"}, {"image": "a.jpg"}, {"text": "\n"}, {"ref": "the dog"}, {"box": "(1,2),(3,4)"},
      {"text": "and"}, {"quad": "(1,1),(2,2),(3,3),(4,4)"}]
  # A tag's content runs to its own end tag, as the reference.
  assert fmt.to_list_format("<ref>a<box>b</box></ref>") == [{"ref": "a<box>b</box>"}]
  assert fmt.to_list_format("") == []
  with pytest.raises(ValueError, match="unclosed <box>"):
    fmt.to_list_format("x<box>(1,2),(3,4)")


# ------------------------------------------------------------------------------------------------ image spans


def test_image_span_finds_closed_spans_only():
  """The one `<img>` regex the data records, draw and generate share: lazy, multi-line, blind to an unclosed tag."""
  text = "Picture 1:<img>a.png</img>\nPicture 2:<img>dir/b\nc.jpg</img> and <img>unclosed"
  assert fmt.IMAGE_SPAN.findall(text) == ["a.png", "dir/b\nc.jpg"]
  assert fmt.IMAGE_SPAN.sub("<img></img>", text).count("<img></img>") == 2
  assert fmt.IMAGE_SPAN.findall(fmt.from_list_format([{"image": "x.png"}, {"image": "y.png"}])) == ["x.png", "y.png"]


def test_image_span_ids(any_tok):
  span = fmt.image_span_ids(any_tok)
  assert len(span) == 258
  assert span[0] == any_tok.img_start_id and span[-1] == any_tok.img_end_id
  assert set(span[1:-1]) == {any_tok.img_pad_id}
  assert len(fmt.image_span_ids(any_tok, 4)) == 6
  with pytest.raises(ValueError):
    fmt.image_span_ids(any_tok, 0)


def test_encode_with_images(any_tok):
  text = fmt.from_list_format([{"image": "a.jpg"}, {"text": "two "}, {"image": "路径/b.png"}]) + "done"
  enc = fmt.encode_with_images(any_tok, text, n_image_tokens=8)
  assert enc.image_paths == ["a.jpg", "路径/b.png"]
  ids = enc.ids
  assert ids.count(any_tok.img_start_id) == 2 and ids.count(any_tok.img_pad_id) == 16
  first = ids.index(any_tok.img_start_id)
  assert ids[:first] == any_tok.encode("Picture 1:")
  assert ids[first:first + 10] == fmt.image_span_ids(any_tok, 8)
  assert any_tok.decode(ids[first + 10:]).startswith("\ntwo Picture 2:")
  assert fmt.decode_with_images(any_tok, ids, enc.image_paths) == text
  assert fmt.decode_with_images(any_tok, ids) == text.replace("a.jpg", "").replace("路径/b.png", "")


def test_encode_with_images_path_bytes_reproduces_reference(any_tok):
  enc = fmt.encode_with_images(any_tok, "<img>ab.jpg</img>x", n_image_tokens=10, path_bytes=True)
  # The reference writes the path's UTF-8 bytes as ids 0-255, then pads.
  assert enc.ids[:12] == [any_tok.img_start_id, 97, 98, 46, 106, 112, 103] + [any_tok.img_pad_id] * 4 + [
      any_tok.img_end_id]
  assert fmt.decode_with_images(any_tok, enc.ids) == "<img>ab.jpg</img>x"
  assert fmt.decode_with_images(any_tok, enc.ids, skip_special_tokens=True) == "ab.jpgx"
  with pytest.raises(ValueError, match="longer than"):
    fmt.encode_with_images(any_tok, "<img>" + "a" * 11 + "</img>", n_image_tokens=10, path_bytes=True)


@pytest.mark.parametrize("text, match", [
    ("<img>a.jpg", "unclosed <img>"),
    ("<img></img>", "non-empty"),
    ("<img>a<ref>b</img>", "special tokens inside"),
    ("x<imgpad>y", "outside an <img>"),
])
def test_encode_with_images_errors(any_tok, text, match):
  with pytest.raises(ValueError, match=match):
    fmt.encode_with_images(any_tok, text)


def test_image_tags_not_allowed_stay_text(any_tok):
  enc = fmt.encode_with_images(any_tok, "<img>a.jpg</img>", allowed_special=())
  assert enc.image_paths == [] and any_tok.img_start_id not in enc.ids


def test_decode_with_images_needs_enough_paths(any_tok):
  ids = fmt.encode_with_images(any_tok, "<img>a</img><img>b</img>", n_image_tokens=2).ids
  with pytest.raises(ValueError, match="more image spans"):
    fmt.decode_with_images(any_tok, ids, ["a"])


# ------------------------------------------------------------------------------------------------ boxes


def test_normalize_box():
  assert fmt.normalize_box((0, 0, 640, 480), 640, 480) == (0, 0, 999, 999)
  assert fmt.normalize_box((64, 48, 320, 240), 640, 480) == (100, 100, 500, 500)
  assert fmt.normalize_box((0.99, 0, 1.01, 1), 1000, 1000) == (0, 0, 1, 1)  # floor
  assert fmt.normalize_box((-5, -1, 700, 500), 640, 480, clip=True) == (0, 0, 999, 999)
  for bad, match in [((0, 0, 641, 10), "outside"), ((10, 0, 5, 10), "x1 > x2"), ((0, 0, 1), "4 finite"),
                     ((0, 0, float("nan"), 1), "4 finite")]:
    with pytest.raises(ValueError, match=match):
      fmt.normalize_box(bad, 640, 480)
  with pytest.raises(ValueError, match="positive"):
    fmt.normalize_box((0, 0, 1, 1), 0, 10)


def test_denormalize_box_conventions():
  # Drawing divides by 1000 and truncates (draw_bbox_on_latest_picture); the grounding eval divides by 999.
  assert fmt.denormalize_box((100, 200, 999, 500), 640, 480) == (64, 96, 639, 240)
  x1, y1, x2, y2 = fmt.denormalize_box((0, 999, 999, 333), 640, 480, convention="eval")
  assert (x1, y1, x2) == (0.0, 480.0, 640.0) and y2 == pytest.approx(333 / 999 * 480)
  with pytest.raises(ValueError, match="convention"):
    fmt.denormalize_box((0, 0, 1, 1), 10, 10, convention="pixels")


@hypothesis.given(w=st.integers(1, 5000), h=st.integers(1, 5000), data=st.data())
def test_normalize_then_draw_is_within_one_step(w, h, data):
  xs = sorted(data.draw(st.floats(0, w), label="xs") for _ in range(2))
  ys = sorted(data.draw(st.floats(0, h), label="ys") for _ in range(2))
  box = fmt.normalize_box((xs[0], ys[0], xs[1], ys[1]), w, h)
  assert all(0 <= v < 1000 for v in box)
  back = fmt.denormalize_box(box, w, h)
  for orig, new, size in zip((xs[0], ys[0], xs[1], ys[1]), back, (w, h, w, h)):
    assert abs(orig - new) <= 2 * size / 1000 + 1


# ------------------------------------------------------------------------------------------------ answer parser


def test_parse_boxes_reference_ref_rule():
  answer = "Here<ref> the dog</ref><box>(1,2),(30,40)</box><box>(5,6),(7,8)</box> and <box>(0,0),(999,999)</box>"
  assert fmt.parse_boxes(answer) == [fmt.BoxRef((1, 2, 30, 40), "the dog"), fmt.BoxRef((5, 6, 7, 8), None),
                                     fmt.BoxRef((0, 0, 999, 999), None)]
  assert fmt.parse_boxes("<box>( 1, 2 ),( 3 , 4)</box>") == [fmt.BoxRef((1, 2, 3, 4))]
  assert fmt.parse_boxes("no boxes") == []


@pytest.mark.parametrize("answer", [
    "<box>(1,2),(3)</box>", "<box>(a,2),(3,4)</box>", "<box>(1,2),(3,1000)</box>", "<box>(9,2),(3,4)</box>",
    "<box>(-1,2),(3,4)</box>", "<box></box>", "<box>(1.5,2),(3,4)</box>",
])
def test_parse_boxes_malformed(answer):
  with pytest.raises(fmt.MalformedBoxError, match="box"):
    fmt.parse_boxes(answer)
  assert fmt.parse_boxes(answer + "<ref>ok</ref><box>(1,1),(2,2)</box>", strict=False) == [
      fmt.BoxRef((1, 1, 2, 2), "ok")]


def test_parse_boxes_unclosed():
  answer = "<ref>a</ref><box>(1,2),(3,4)</box><ref>b</ref><box>(5,6),(7"
  with pytest.raises(ValueError, match="unclosed"):
    fmt.parse_boxes(answer)
  assert fmt.parse_boxes(answer, strict=False) == [fmt.BoxRef((1, 2, 3, 4), "a")]


_TAGGY = st.lists(st.sampled_from(list("<>/()，,0123456789 abx") + ["<box>", "</box>", "<ref>", "</ref>", "<img>",
                                                                   "</img>", "<quad>", "</quad>", "999", "1000"]),
                  max_size=40).map("".join)


@hypothesis.settings(max_examples=300)
@hypothesis.given(st.one_of(st.text(max_size=60), _TAGGY))
def test_parse_boxes_never_crashes(answer):
  lenient = fmt.parse_boxes(answer, strict=False)
  assert all(isinstance(b, fmt.BoxRef) and all(0 <= v < 1000 for v in b.box) for b in lenient)
  try:
    strict = fmt.parse_boxes(answer)
  except ValueError:
    return  # MalformedBoxError is a ValueError; an unclosed tag is a ValueError: both are clear errors
  assert strict == lenient


_REF = st.text(st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), min_size=1, max_size=20)


@hypothesis.given(st.lists(st.tuples(st.one_of(st.none(), _REF), st.lists(st.integers(0, 999), min_size=4,
                                                                          max_size=4)), max_size=5))
def test_box_to_text_then_parse_round_trip(pairs):
  expected = []
  text = "answer: "
  for ref, coords in pairs:
    box = (min(coords[0], coords[2]), min(coords[1], coords[3]), max(coords[0], coords[2]),
           max(coords[1], coords[3]))
    text += fmt.box_to_text(box, ref) + " then "
    ref_nfc = None if ref is None else unicodedata.normalize("NFC", ref).strip()
    expected.append(fmt.BoxRef(box, ref_nfc))
  assert fmt.parse_boxes(text) == expected


def test_strip_grounding():
  text = "A <ref>dog</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box> near <ref>a sign</ref><quad>(1,1),(2,2)," \
         "(3,3),(4,4)</quad>."
  assert fmt.strip_grounding(text) == "A dog near a sign."


# ------------------------------------------------------------------------------------------------ real vocabulary


def test_image_span_known_ids(qwen_tok):
  enc = fmt.encode_with_images(qwen_tok, fmt.from_list_format([{"image": "demo.jpeg"}, {"text": "Hi"}]))
  # "Picture" " " "1" ":" then <img> 256 x <imgpad> </img> "\n" "Hi".
  assert enc.ids == [24669, 220, 16, 25, 151857] + [151859] * 256 + [151858, 198, 13048]
  assert enc.image_paths == ["demo.jpeg"]


def _reference_tokenize(qwen_tiktoken_path, text):
  """SPEC §3.2 re-implemented independently: tiktoken with the SPEC's regex and special table, then every closed
  <img>…</img> token span → <img> + path bytes as ids + <imgpad> up to 256 + </img>."""
  import base64
  import tiktoken
  import unicodedata
  ranks = {base64.b64decode(t): int(r) for t, r in (l.split() for l in qwen_tiktoken_path.read_bytes().splitlines())}
  specials = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
              + ["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"])
  pat = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
         r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
  enc = tiktoken.Encoding("ref", pat_str=pat, mergeable_ranks=ranks,
                          special_tokens={s: 151643 + i for i, s in enumerate(specials)})
  ids = enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")
  out, i = [], 0
  while i < len(ids):
    if ids[i] == 151857:
      j = ids.index(151858, i)
      path = enc.decode_bytes(ids[i + 1:j])
      out += [151857] + list(path) + [151859] * (256 - len(path)) + [151858]
      i = j + 1
    else:
      out.append(ids[i])
      i += 1
  return out


def test_path_bytes_matches_reference_algorithm(qwen_tok, qwen_tiktoken_path):
  text = ("Picture 1:<img>https://example.com/图片/Cafe\u0301.jpg</img>\nPicture 2:<img>/data/b.png</img>\n"
          "比较两张图 <ref>the cat</ref><box>(1,2),(3,4)</box><|endoftext|>")
  ours = fmt.encode_with_images(qwen_tok, text, path_bytes=True)
  assert ours.ids == _reference_tokenize(qwen_tiktoken_path, text)
  assert ours.image_paths == ["https://example.com/图片/Café.jpg", "/data/b.png"]
