"""Chat: ChatML prompts with history and images, streaming, the returned history."""
import numpy as np
import pytest
from PIL import Image

from qwenvl_jax import errors
from qwenvl_jax import text as qtext
from qwenvl_jax.inference import chat


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
  path = tmp_path_factory.mktemp("chat") / "red.png"
  Image.new("RGB", (40, 30), (200, 20, 20)).save(path)
  return str(path)


def test_build_prompt_uses_make_context_and_loads_the_images(generator, sp_tok, picture):
  history = [(f"Picture 1:<img>{picture}</img>\nWhat is it?", "A red picture.")]
  prompt = chat.build_prompt(generator, sp_tok, "And now?", history)
  expected = qtext.make_context(sp_tok, "And now?", history, n_image_tokens=generator.cfg.image_tokens)
  assert prompt.context.tokens == expected.tokens
  assert prompt.context.image_paths == [picture]
  s = generator.cfg.vision.image_size
  assert len(prompt.images) == 1 and prompt.images[0].shape == (s, s, 3)
  np.testing.assert_array_equal(prompt.images[0][0, 0], [200, 20, 20])  # stretched, not cropped


def test_chat_streams_the_response_and_extends_the_history(generator, sp_tok, picture):
  gen = chat.chat_generation_config(sp_tok, max_new_tokens=5)
  history = [("Hello", "Hi.")]
  reply = chat.chat_stream(generator, sp_tok, f"Picture 1:<img>{picture}</img>\nDescribe it.", history, gen=gen)
  deltas = list(reply)
  assert "".join(deltas).strip() == reply.response
  assert 1 <= len(reply.new_tokens) <= 5 and all(t < sp_tok.vocab_size for t in reply.new_tokens)
  assert reply.history == history + [(f"Picture 1:<img>{picture}</img>\nDescribe it.", reply.response)]
  response, new_history = chat.chat(generator, sp_tok, f"Picture 1:<img>{picture}</img>\nDescribe it.", history,
                                    gen=gen)
  assert (response, new_history) == (reply.response, reply.history)  # greedy: deterministic


def test_a_misspelt_generation_setting_names_the_field_it_meant(sp_tok):
  """`chat_generation_config(tok, max_new_token=64)` was a bare TypeError from the dataclass."""
  with pytest.raises(errors.ConfigError, match="'max_new_token' is not a GenerationConfig field; did you mean "
                                               "max_new_tokens"):
    chat.chat_generation_config(sp_tok, max_new_token=64)
  with pytest.raises(errors.ConfigError,
                     match=r"'beams' is not a GenerationConfig field \(the fields: max_new_tokens,"):
    chat.chat_generation_config(sp_tok, beams=4)


def test_chat_generation_config_has_the_reference_stop_words(sp_tok):
  gen = chat.chat_generation_config(sp_tok, do_sample=True, top_p=0.3)
  assert gen.stop_words == ((sp_tok.im_end_id,), (sp_tok.im_start_id,))
  assert gen.eos_id == gen.pad_id == sp_tok.eod_id and gen.vocab_limit == sp_tok.vocab_size
  assert gen.do_sample and gen.top_p == 0.3
  raw = chat.chat_generation_config(sp_tok, "raw")
  assert raw.stop_words == (tuple(sp_tok.encode("Human:")),)


def test_a_tokenizer_bigger_than_the_model_is_an_error(generator, qwen_tiktoken_path):
  tok = qtext.QwenTokenizer(qwen_tiktoken_path)
  with pytest.raises(ValueError, match="does not belong to this model"):
    chat.build_prompt(generator, tok, "Hello")


def test_missing_image_names_the_file(generator, sp_tok, tmp_path):
  with pytest.raises(ValueError, match="nothere.png"):
    chat.build_prompt(generator, sp_tok, f"<img>{tmp_path / 'nothere.png'}</img>hi")


def test_mixed_up_arguments_are_one_line_each(generator, tiny_model, sp_tok):
  """The likely mix-ups of a library user: the model (or what `qwenvl_jax.load` returned) for the Generator, a
  spec string for the tokenizer, a dict for `gen`, an int seed for `key`, a string for the history. Each was an
  AttributeError or a JAX PRNG error from deep inside, and a string history was read one character per turn."""
  with pytest.raises(ValueError, match="chat takes a Generator as its first argument, got QwenVL"):
    chat.chat(tiny_model, sp_tok, "Hello")
  with pytest.raises(ValueError, match="chat takes a tokenizer as its second argument, got str"):
    chat.chat(generator, "sentencepiece:tok.model", "Hello")
  with pytest.raises(ValueError, match="gen must be a GenerationConfig, got dict"):
    chat.chat(generator, sp_tok, "Hello", gen={"max_new_tokens": 3})
  with pytest.raises(ValueError, match=r"key must be a JAX random key, got int 3 \(key=jax.random.key\(seed\)\)"):
    chat.chat(generator, sp_tok, "Hello", key=3)
  with pytest.raises(ValueError, match="history must be a list of .* pairs, got a str"):
    chat.chat(generator, sp_tok, "Hello", "Hi.")


def test_raw_format_refuses_history_and_system_it_would_drop(generator, sp_tok):
  """The raw (base model) prompt is the query alone: a history or system message given with it was silently
  dropped, so the answer ignored the earlier turns while the returned history claimed them (`generate` refuses
  the same for --history / --system)."""
  with pytest.raises(ValueError, match="history and system need the chatml format"):
    chat.chat(generator, sp_tok, "And?", [("Hello", "Hi.")], chat_format="raw")
  with pytest.raises(ValueError, match="history and system need the chatml format"):
    chat.chat(generator, sp_tok, "And?", system="Be brief.", chat_format="raw")
  prompt = chat.build_prompt(generator, sp_tok, "And?", chat_format="raw")
  assert prompt.context.tokens == sp_tok.encode("And?")


@pytest.mark.parametrize("query, history", [("What does <img> mean?", []),
                                            ("And now?", [("Hi", "a<imgpad>b")])])  # typed, or generated
def test_image_tags_that_cannot_be_encoded_are_one_line(generator, sp_tok, query, history):
  with pytest.raises(errors.ConfigError, match="cannot be encoded"):
    chat.build_prompt(generator, sp_tok, query, history)


def test_build_prompt_counts_the_history_turns_past_the_window(generator, sp_tok):
  history = [("first <|im_end|> question", "first answer"), ("second", "two"), ("third", "three")]
  full = chat.build_prompt(generator, sp_tok, "now", history)
  assert full.dropped_turns == 0
  newest = len(qtext.make_context(sp_tok, "now", history[-1:]).tokens)  # system + newest turn + query: fits one
  short = chat.build_prompt(generator, sp_tok, "now", history, max_window_size=newest)
  assert short.dropped_turns == 2
  assert chat.build_prompt(generator, sp_tok, "now", history, max_window_size=1).dropped_turns == 3
