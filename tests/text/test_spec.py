"""The one tokenizer spec: qwen:PATH, sentencepiece:PATH, or a bare .tiktoken / .model file."""
import pytest

from qwenvl_jax import errors, text


@pytest.mark.parametrize("spec,expected", [
    ("qwen:/x/qwen.tiktoken", ("qwen", "/x/qwen.tiktoken")),
    ("sentencepiece:/x/sp.model", ("sentencepiece", "/x/sp.model")),
    ("/x/qwen.tiktoken", ("qwen", "/x/qwen.tiktoken")),
    ("rel/sp.model", ("sentencepiece", "rel/sp.model")),
    ("qwen:C:/odd.name", ("qwen", "C:/odd.name")),
])
def test_parse(spec, expected):
  assert text.parse_tokenizer_spec(spec) == expected


@pytest.mark.parametrize("spec,message", [("", "empty tokenizer spec"), ("qwen:", "names no file"),
                                          ("vocab.txt", "unknown tokenizer 'vocab.txt'")])
def test_bad_specs(spec, message):
  with pytest.raises(ValueError, match=message):
    text.parse_tokenizer_spec(spec)


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent.model"):
    text.load_tokenizer(f"sentencepiece:{tmp_path / 'absent.model'}")


def test_both_forms_load_the_same_sentencepiece_model(sp_tok):
  by_prefix = text.load_tokenizer(f"sentencepiece:{sp_tok.path}")
  by_extension = text.load_tokenizer(sp_tok.path)
  assert isinstance(by_prefix, text.SentencePieceTokenizer) and isinstance(by_extension, text.SentencePieceTokenizer)
  assert by_prefix.encode("a red circle") == by_extension.encode("a red circle") == sp_tok.encode("a red circle")


def test_qwen_vocabulary(qwen_tiktoken_path):
  tok = text.load_tokenizer(f"qwen:{qwen_tiktoken_path}")
  assert isinstance(tok, text.QwenTokenizer) and tok.vocab_size == 151860
  assert text.load_tokenizer(qwen_tiktoken_path).encode("hello") == tok.encode("hello")


def test_a_file_of_the_wrong_kind_is_a_user_error_naming_it(tmp_path, sp_tok):
  """generate/serve printed a 33-line traceback for these (a user mistake: one `error:` line, exit 2)."""
  bad = tmp_path / "bad.tiktoken"
  bad.write_text("abc\n")
  for spec in (str(bad), f"qwen:{sp_tok.path}"):
    with pytest.raises(errors.InputFormatError, match="is not a qwen vocabulary: corrupt vocabulary") as e:
      text.load_tokenizer(spec)
    assert "sentencepiece:PATH" in e.value.hint
