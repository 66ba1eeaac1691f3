"""Tests of the SentencePiece backend: a tiny model is trained in a temporary directory."""
import unicodedata

import hypothesis
import hypothesis.strategies as st
import pytest
import sentencepiece as spm

from qwenvl_jax.text import SentencePieceTokenizer
from qwenvl_jax.text import Tokenizer
from qwenvl_jax.text import tokenizer as qtok
from qwenvl_jax.text import train_sentencepiece

SURFACES = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<ref>", "</ref>", "<box>", "</box>", "<quad>",
            "</quad>", "<img>", "</img>", "<imgpad>"]


def test_same_special_surface_as_qwen(sp_tok):
  assert isinstance(sp_tok, Tokenizer)
  assert sorted(sp_tok.special_tokens) == sorted(SURFACES)
  for surface in SURFACES:
    ids = sp_tok.encode(surface)
    assert ids == [sp_tok.special_tokens[surface]]
    assert sp_tok.decode(ids) == surface
  attrs = {"eod_id": "<|endoftext|>", "im_start_id": "<|im_start|>", "im_end_id": "<|im_end|>",
           "ref_start_id": "<ref>", "ref_end_id": "</ref>", "box_start_id": "<box>", "box_end_id": "</box>",
           "quad_start_id": "<quad>", "quad_end_id": "</quad>", "img_start_id": "<img>", "img_end_id": "</img>",
           "img_pad_id": "<imgpad>"}
  for attr, surface in attrs.items():
    assert getattr(sp_tok, attr) == sp_tok.special_tokens[surface]
  assert len(set(sp_tok.special_tokens.values())) == len(SURFACES)
  assert 300 < sp_tok.vocab_size <= 500


def test_newline_is_one_token(sp_tok):
  # ChatML and finetune.py's label layout rely on "\n" being a single token.
  assert len(sp_tok.encode("\n")) == 1


def test_allowed_and_disallowed_special(sp_tok):
  text = "<|im_start|>user\nhi<ref>x</ref><|endoftext|>"
  ids = sp_tok.encode(text)
  assert ids[0] == sp_tok.im_start_id and ids[-1] == sp_tok.eod_id
  plain = sp_tok.encode(text, allowed_special=())
  assert not set(plain) & set(sp_tok.special_tokens.values())
  assert sp_tok.decode(plain) == text
  only_vl = sp_tok.encode(text, allowed_special=set(qtok.IMAGE_ST))
  assert sp_tok.ref_start_id in only_vl and sp_tok.im_start_id not in only_vl and sp_tok.eod_id not in only_vl
  with pytest.raises(ValueError, match="im_start"):
    sp_tok.encode(text, allowed_special=(), disallowed_special="all")


def test_skip_special_tokens(sp_tok):
  ids = sp_tok.encode("<|im_start|>user\nred<imgpad><|im_end|>")
  assert sp_tok.decode(ids, skip_special_tokens=True) == "user\nred"


def test_decode_rejects_unknown_ids(sp_tok):
  with pytest.raises(ValueError, match=str(sp_tok.vocab_size)):
    sp_tok.decode([sp_tok.vocab_size])


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.text(max_size=100))
def test_round_trip_arbitrary_text(sp_tok, text):
  nfc = unicodedata.normalize("NFC", text)
  assert sp_tok.decode(sp_tok.encode(text)) == nfc
  assert sp_tok.decode(sp_tok.encode(text, allowed_special=())) == nfc


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(st.lists(st.sampled_from(["a", " ", "  ", "\n", "7", "红色", "\u2581", "<img>", "<imgpad>", "é",
                                            "<|extra_0|>", "\t"]), max_size=30))
def test_round_trip_with_specials(sp_tok, pieces):
  text = "".join(pieces)
  ids = sp_tok.encode(text)
  assert sp_tok.decode(ids) == text
  assert ids.count(sp_tok.img_pad_id) == text.count("<imgpad>")


def test_corpus_compresses(sp_tok, tiny_corpus):
  # The trained pieces are used: an in-domain sentence takes far fewer ids than its bytes.
  sentence = tiny_corpus(1, seed=123)[0]
  assert len(sp_tok.encode(sentence)) < len(sentence.encode()) / 2


def test_extra_tokens_and_overwrite(tmp_path, tiny_corpus):
  prefix = tmp_path / "with_extras"
  path = train_sentencepiece(tiny_corpus(300), prefix, vocab_size=400, num_extra_tokens=3)
  tok = SentencePieceTokenizer(path)
  assert tok.encode("<|extra_2|>") == [tok.special_tokens["<|extra_2|>"]]
  with pytest.raises(FileExistsError, match="with_extras.model"):
    train_sentencepiece(tiny_corpus(300), prefix, vocab_size=400)
  train_sentencepiece(tiny_corpus(300), prefix, vocab_size=400, overwrite=True)
  assert "<|extra_2|>" not in SentencePieceTokenizer(path).special_tokens


def test_unigram_model(tmp_path, tiny_corpus):
  tok = SentencePieceTokenizer(train_sentencepiece(tiny_corpus(500), tmp_path / "uni", 400, model_type="unigram"))
  text = "<|im_start|>a red circle 红色<|im_end|>"
  assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kwargs, match", [
    ({"vocab_size": 200}, "too small"),
    ({"model_type": "word"}, "model_type"),
    ({"num_extra_tokens": -1}, "num_extra_tokens"),
])
def test_train_rejects_bad_arguments(tmp_path, kwargs, match, tiny_corpus):
  args = {"vocab_size": 400} | kwargs
  with pytest.raises(ValueError, match=match):
    train_sentencepiece(tiny_corpus(50), tmp_path / "m", **args)


def test_train_rejects_empty_corpus(tmp_path):
  with pytest.raises(ValueError, match="no non-empty"):
    train_sentencepiece(["", ""], tmp_path / "m", 400)


def test_model_without_specials_is_rejected(tmp_path, tiny_corpus):
  prefix = str(tmp_path / "plain")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(tiny_corpus(300)), model_prefix=prefix, vocab_size=400,
                                 hard_vocab_limit=False, byte_fallback=True, minloglevel=2)
  with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
    SentencePieceTokenizer(prefix + ".model")


def test_missing_and_corrupt_model(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent.model"):
    SentencePieceTokenizer(tmp_path / "absent.model")
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model"):
    SentencePieceTokenizer(bad)


def test_picklable_for_data_workers(sp_tok):
  import pickle
  clone = pickle.loads(pickle.dumps(sp_tok))
  text = "<|im_start|>user\nPicture 1:<img>a.jpg</img>\na red circle<|im_end|>"
  assert clone.encode(text) == sp_tok.encode(text) and clone.img_pad_id == sp_tok.img_pad_id


_SETS = st.sampled_from(["all", (), tuple(qtok.IMAGE_ST), ("<|im_start|>", "<imgpad>")])


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(st.lists(st.sampled_from(["a", " ", "<", ">", "红", "<|im_start|>", "<|im_end|>", "<img>",
                                            "<imgpad>", "</img>", "<im", "\n"]), max_size=20).map("".join),
                  _SETS, _SETS)
def test_special_semantics_match_qwen(sp_tok, qwen_tok, text, allowed, disallowed):
  def specials_or_error(tok):
    try:
      ids = tok.encode(text, allowed_special=allowed, disallowed_special=disallowed)
    except ValueError:
      return "raised"
    inverse = {i: s for s, i in tok.special_tokens.items()}
    return [inverse[i] for i in ids if i in inverse]
  assert specials_or_error(sp_tok) == specials_or_error(qwen_tok)
