"""Tests of the Qwen tiktoken tokenizer against the real vocabulary.

Expected ids come from outside the code under test: ids published with Qwen's chat template (the ChatML system
turn), the SPEC's special-token table, and ranks read directly from the vocabulary file by this test.
"""
import base64
import unicodedata

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from qwenvl_jax.text import QwenTokenizer
from qwenvl_jax.text import Tokenizer
from qwenvl_jax.text import tokenizer as qtok


@pytest.fixture(scope="module")
def file_ranks(qwen_tiktoken_path) -> dict[bytes, int]:
  """The vocabulary file parsed independently of the code under test."""
  ranks = {}
  for line in qwen_tiktoken_path.read_bytes().splitlines():
    token, rank = line.split()
    ranks[base64.b64decode(token)] = int(rank)
  return ranks


def test_published_ids(qwen_tok):
  # The ChatML system turn as published with Qwen's chat template.
  skeleton = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
  assert qwen_tok.encode(skeleton) == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
  assert qwen_tok.encode("\n") == [198]
  assert qwen_tok.encode("system") == [8948]
  assert qwen_tok.encode("user") == [872]
  assert qwen_tok.encode("assistant") == [77091]


def test_special_token_table(qwen_tok):
  # SPEC §3.1: 151643 BPE ranks, then endoftext, im_start, im_end, 205 extras, then the nine VL tags.
  specials = qwen_tok.special_tokens
  assert len(specials) == 3 + 205 + 9
  assert specials["<|endoftext|>"] == 151643
  assert specials["<|im_start|>"] == 151644
  assert specials["<|im_end|>"] == 151645
  assert specials["<|extra_0|>"] == 151646
  assert specials["<|extra_204|>"] == 151850
  vl = ["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"]
  assert [specials[t] for t in vl] == list(range(151851, 151860))
  assert qwen_tok.vocab_size == 151860
  attrs = ["eod_id", "im_start_id", "im_end_id", "ref_start_id", "ref_end_id", "box_start_id", "box_end_id",
           "quad_start_id", "quad_end_id", "img_start_id", "img_end_id", "img_pad_id"]
  assert [getattr(qwen_tok, a) for a in attrs] == [151643, 151644, 151645] + list(range(151851, 151860))
  for surface, i in specials.items():
    assert qwen_tok.encode(surface) == [i]
  assert isinstance(qwen_tok, Tokenizer)


def test_chinese_sentence(qwen_tok, file_ranks):
  text = "你好，世界！今天天气很好。"
  ids = qwen_tok.encode(text)
  assert ids[0] == 108386  # "你好", a widely published Qwen id
  assert file_ranks["你好".encode()] == 108386
  # Every id is a vocabulary entry and their bytes concatenate to the UTF-8 of the text.
  inverse = {r: b for b, r in file_ranks.items()}
  assert b"".join(inverse[i] for i in ids) == text.encode()
  assert qwen_tok.decode(ids) == text


def test_digits_are_split_singly(qwen_tok, file_ranks):
  ids = qwen_tok.encode("2024 12345")
  expected = ([file_ranks[d.encode()] for d in "2024"] + [file_ranks[b" "]]
              + [file_ranks[d.encode()] for d in "12345"])
  assert ids == expected
  assert [file_ranks[str(d).encode()] for d in range(10)] == list(range(15, 25))
  # The only multi-digit tokens of the vocabulary are full-width ones; a cl100k-style \p{N}{1,3} pre-tokenizer
  # would emit them whole, Qwen's single-digit \p{N} never does.
  assert "１０".encode() in file_ranks
  assert qwen_tok.encode("１０") == [file_ranks["１".encode()], file_ranks["０".encode()]]


def test_box_string(qwen_tok, file_ranks):
  ids = qwen_tok.encode("<ref>a dog</ref><box>(123,456),(789,999)</box>")
  r = lambda s: file_ranks[s.encode()]  # noqa: E731
  assert ids[0] == 151851
  assert qwen_tok.decode(ids[1:ids.index(151852)]) == "a dog"
  box = ids[ids.index(151853):]
  assert box == ([151853, r("("), r("1"), r("2"), r("3"), r(","), r("4"), r("5"), r("6"), r("),("),
                  r("7"), r("8"), r("9"), r(","), r("9"), r("9"), r("9"), r(")"), 151854])


def test_nfc_normalization(qwen_tok):
  decomposed = "Cafe\u0301 \u212b"  # e + combining acute; the angstrom sign
  composed = unicodedata.normalize("NFC", decomposed)
  assert composed != decomposed
  assert qwen_tok.encode(decomposed) == qwen_tok.encode(composed)
  assert qwen_tok.decode(qwen_tok.encode(decomposed)) == composed


def test_allowed_and_disallowed_special(qwen_tok):
  text = "<|im_start|>hi<ref>x</ref><|endoftext|>"
  assert qwen_tok.encode(text)[0] == 151644
  plain = qwen_tok.encode(text, allowed_special=set())
  assert not set(plain) & set(qwen_tok.special_tokens.values())
  assert qwen_tok.decode(plain) == text
  only_vl = qwen_tok.encode(text, allowed_special=set(qtok.IMAGE_ST))
  assert 151851 in only_vl and 151644 not in only_vl and 151643 not in only_vl
  with pytest.raises(ValueError, match="im_start"):
    qwen_tok.encode(text, allowed_special=set(), disallowed_special="all")
  with pytest.raises(TypeError):
    qwen_tok.encode(text, allowed_special="<ref>")


def test_no_bos_or_eos(qwen_tok):
  assert qwen_tok.encode("") == []
  assert qwen_tok.encode("a") == [64]  # 'a' = 0x61, printable ASCII ranks start at '!' = 0x21


def test_decode_skip_special_tokens(qwen_tok):
  ids = [151644, 872, 198, 151646, 108386, 151859, 151645, 151643]
  assert qwen_tok.decode(ids) == "<|im_start|>user\n<|extra_0|>你好<imgpad><|im_end|><|endoftext|>"
  assert qwen_tok.decode(ids, skip_special_tokens=True) == "user\n你好"
  assert qwen_tok.decode(np.asarray(ids, np.int32), skip_special_tokens=True) == "user\n你好"


def test_decode_rejects_unknown_ids(qwen_tok):
  with pytest.raises(ValueError, match="151860"):
    qwen_tok.decode([1, 151860])
  with pytest.raises(ValueError, match="-1"):
    qwen_tok.decode([-1])


def test_decode_invalid_utf8_replaced(qwen_tok, file_ranks):
  first_byte_of_ni = file_ranks[b"\xe4"]
  assert qwen_tok.decode([first_byte_of_ni]) == "\ufffd"
  with pytest.raises(UnicodeDecodeError):
    qwen_tok.decode([first_byte_of_ni], errors="strict")


def test_encode_batch_matches_encode(qwen_tok):
  texts = ["hello world", "你好", "e\u0301", "<|im_end|>", ""]
  assert qwen_tok.encode_batch(texts, num_threads=2) == [qwen_tok.encode(t) for t in texts]


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.text(max_size=200))
def test_round_trip(qwen_tok, text):
  nfc = unicodedata.normalize("NFC", text)
  assert qwen_tok.decode(qwen_tok.encode(text)) == nfc
  assert qwen_tok.decode(qwen_tok.encode(text, allowed_special=())) == nfc


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(st.lists(st.sampled_from(["a", " ", "\n", "1", "你", "<|im_start|>", "<box>", "é", "\t", "'s"]),
                           max_size=30))
def test_round_trip_with_specials(qwen_tok, pieces):
  text = "".join(pieces)
  ids = qwen_tok.encode(text)
  assert qwen_tok.decode(ids) == text
  assert ids.count(151644) == text.count("<|im_start|>")


def test_missing_vocabulary(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
    QwenTokenizer(tmp_path / "nope.tiktoken")


@pytest.mark.parametrize("content, match", [
    (b"IQ== 0\nnot-base64!! 1\n", "line 2"),
    (b"IQ== 0\nIg==\n", "line 2"),
    (b"IQ== 0\nIg== 0\n", "duplicated"),
    (b"IQ== 0\nIg== 2\n", "without gaps"),
    (b"", "no tokens"),
    (b"IQ== 0\nIg== 1\n", "151643"),
], ids=["bad-base64", "missing-rank", "duplicate", "gap", "empty", "wrong-size"])
def test_corrupt_vocabulary(tmp_path, content, match):
  path = tmp_path / "bad.tiktoken"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=match):
    QwenTokenizer(path)


def test_picklable_for_data_workers(qwen_tok):
  import pickle
  clone = pickle.loads(pickle.dumps(qwen_tok))
  text = "<|im_start|>user\nPicture 1:<img>a.jpg</img>\n你好<|im_end|>"
  assert clone.encode(text) == qwen_tok.encode(text) and clone.img_pad_id == 151859


_SPECIAL_SETS = st.sampled_from(["all", (), tuple(qtok.IMAGE_ST), ("<|im_start|>", "<imgpad>", "<|extra_1|>")])


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.lists(st.sampled_from(["a", " ", "<", "|", ">", "1", "你好", "<|im_start|>", "<|extra_1|>",
                                            "<|extra_10|>", "<img>", "<imgpad>", "</img>", "<im", "\n", "x<"]),
                           max_size=25).map("".join), _SPECIAL_SETS, _SPECIAL_SETS)
def test_special_handling_matches_tiktoken(qwen_tok, text, allowed, disallowed):
  # tiktoken's own special-token matching is the reference for the Python-side splitting.
  try:
    expected = qwen_tok.encoding.encode(text, allowed_special=set(allowed) if allowed != "all" else "all",
                                        disallowed_special=set(disallowed) if disallowed != "all" else "all")
  except ValueError:
    with pytest.raises(ValueError, match="disallowed special token"):
      qwen_tok.encode(text, allowed_special=allowed, disallowed_special=disallowed)
    return
  assert qwen_tok.encode(text, allowed_special=allowed, disallowed_special=disallowed) == expected


def test_nfc_joins_at_most_nfc_max_composed_characters():
  """`min_tokens` divides by NFC_MAX_COMPOSED: NFC must never join more characters into one, counted as code points
  or as UTF-16 units (a str holding a surrogate pair as two characters, which tiktoken joins)."""
  longest = 0
  for c in range(0x110000):
    char = chr(c)
    canonical = unicodedata.decomposition(char)
    if (canonical and not canonical.startswith("<")) or 0xAC00 <= c <= 0xD7A3:  # Hangul syllables: by rule
      parts = unicodedata.normalize("NFD", char)
      if len(parts) > 1 and unicodedata.normalize("NFC", parts) == char:
        longest = max(longest, len(parts), len(parts.encode("utf-16-le")) // 2)
  assert longest == qtok.NFC_MAX_COMPOSED


def test_max_token_chars_is_the_longest_token(any_tok):
  """No token decodes to more characters than `max_token_chars`, the bound `min_tokens` relies on (and one does)."""
  lengths = [len(any_tok.decode([i])) for i in range(any_tok.vocab_size)]
  assert max(lengths) == any_tok.max_token_chars
  text = any_tok.decode([int(np.argmax(lengths))]) * 200
  assert qtok.min_tokens(any_tok, len(text)) <= len(any_tok.encode(text))


DENSE_TEXTS = {  # texts that pack many characters into few tokens, or that NFC shortens
    "ascii": "a" * 5000, "spaces": " " * 5000, "newlines": "\n" * 5000, "specials": "<|extra_204|><imgpad>" * 300,
    "emoji": "😀" * 2000, "surrogate pairs": "\ud83d\ude00" * 2000, "cjk": "你好" * 2000,
    "nfd omega": unicodedata.normalize("NFD", "\u1faf") * 2000,
    "nfd hangul": unicodedata.normalize("NFD", "한") * 2000,
}


@pytest.mark.parametrize("name", DENSE_TEXTS)
def test_min_tokens_never_exceeds_the_tokens(any_tok, name):
  text = DENSE_TEXTS[name]
  assert qtok.min_tokens(any_tok, len(text)) <= len(any_tok.encode(text))
