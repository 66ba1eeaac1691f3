"""Our tokenizers (the `tokenizers` library fed the checkpoint's files) against transformers' CLIPTokenizer and
BertTokenizer, and BERT also against transformers' pure-Python BertTokenizerLegacy, on the tests' own vocabularies.
"""
import shutil

import pytest
import transformers
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from qwenvl_jax.clip import CheckpointError, load_tokenizer
from tests.clip.checkpoints import write_bert_vocab, write_clip_vocab

CLIP_TEXTS = ["a red square on the table", "The  GREEN\tgrass!!", "it's a cat's dog, isn't it? 42 cats",
              "café naïve ÉCOLE", "", "red " * 100, "unknown wörds ☃ and 红色"]
BERT_TEXTS = ["一只红色的狗在沙滩上", "Red CATS on the 草地。", "reds photos", "照片" * 40, "", "unknown ☃ words",
              "Café,naïve!"]


@pytest.fixture(scope="module")
def clip_vocab(tmp_path_factory):
  folder = tmp_path_factory.mktemp("clip_vocab")
  write_clip_vocab(folder)
  return folder


@pytest.fixture(scope="module")
def bert_vocab(tmp_path_factory):
  folder = tmp_path_factory.mktemp("bert_vocab")
  write_bert_vocab(folder)
  return folder


def test_clip_bpe_matches_transformers_and_truncates_to_77(clip_vocab):
  ours = load_tokenizer(clip_vocab, "clip", 77)
  theirs = transformers.CLIPTokenizer.from_pretrained(clip_vocab)
  want = theirs(CLIP_TEXTS, truncation=True, max_length=77)["input_ids"]
  got = ours.encode(CLIP_TEXTS)
  assert got == want
  bos, eos = theirs.bos_token_id, theirs.eos_token_id
  assert all(ids[0] == bos and ids[-1] == eos for ids in got)
  assert len(got[5]) == 77 and got[5][1:76] == got[5][1:2] * 75  # "red</w>" 75 times between BOS and EOS
  # Whole-word merges of the vocabulary ("table" is not one: "b l" of "blue" outranks "ta b").
  assert got[0][:6] == [bos, *theirs.convert_tokens_to_ids(["a</w>", "red</w>", "square</w>", "on</w>", "the</w>"])]


def test_clip_tokenizer_json_is_used_when_present(clip_vocab, tmp_path):
  # transformers writes tokenizer.json; without vocab.json/merges.txt only that file can be what we read.
  transformers.CLIPTokenizer.from_pretrained(clip_vocab).save_pretrained(tmp_path)
  for name in ("vocab.json", "merges.txt"):
    (tmp_path / name).unlink(missing_ok=True)
  assert (tmp_path / "tokenizer.json").is_file()
  assert load_tokenizer(tmp_path, "clip", 77).encode(CLIP_TEXTS) == load_tokenizer(clip_vocab, "clip",
                                                                                     77).encode(CLIP_TEXTS)


def test_bert_wordpiece_matches_transformers_and_the_python_reference(bert_vocab):
  ours = load_tokenizer(bert_vocab, "chinese_clip", 52)
  got = ours.encode(BERT_TEXTS)
  for reference in (transformers.BertTokenizer.from_pretrained(bert_vocab),
                    BertTokenizerLegacy(str(bert_vocab / "vocab.txt"), do_lower_case=True)):
    assert got == reference(BERT_TEXTS, truncation=True, max_length=52)["input_ids"], type(reference).__name__
  cls, sep = 2, 3
  assert all(ids[0] == cls and ids[-1] == sep for ids in got)
  assert len(got[3]) == 52
  assert ours.encode(["红色的狗"])[0][1:-1] == [ours._tok.token_to_id(c) for c in "红色的狗"]


def test_padding_puts_ids_first_and_masks_the_rest(clip_vocab):
  tok = load_tokenizer(clip_vocab, "clip", 77)
  encoded = tok.encode(["a red cat", ""])
  ids, mask = tok.pad(encoded, 16)
  assert ids.shape == (2, 16) and ids.dtype.name == "int32"
  assert mask.sum(axis=1).tolist() == [len(e) for e in encoded]
  assert ids[0, :len(encoded[0])].tolist() == encoded[0] and (ids[0, len(encoded[0]):] == tok.pad_id).all()
  with pytest.raises(ValueError, match="does not fit"):
    tok.pad(encoded, 2)


def test_missing_tokenizer_files_are_a_checkpoint_error(clip_vocab, tmp_path):
  with pytest.raises(CheckpointError, match="no tokenizer"):
    load_tokenizer(tmp_path, "clip", 77)
  shutil.copy(clip_vocab / "vocab.json", tmp_path / "vocab.json")
  with pytest.raises(CheckpointError, match="vocab.json \\+ merges.txt"):
    load_tokenizer(tmp_path, "clip", 77)
  (tmp_path / "vocab.txt").write_text("[PAD]\n[CLS]\n[SEP]\na\n")
  with pytest.raises(CheckpointError, match="UNK"):
    load_tokenizer(tmp_path, "chinese_clip", 52)
