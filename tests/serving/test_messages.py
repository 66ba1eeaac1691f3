"""OpenAI messages -> the reference's chat prompt, grounded boxes in pixels, and streaming text with stop strings
(no model: the tokenizer fixture only)."""
import base64
import http.server
import io
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax import text as qtext
from qwenvl_jax.serving import messages as msg
from qwenvl_jax.serving.detokenize import Detokenizer, token_piece


def _url(w, h, colour=(200, 10, 10)):
  buf = io.BytesIO()
  Image.new("RGB", (w, h), colour).save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image(url):
  return {"type": "image_url", "image_url": {"url": url}}


def _build(tok, messages, **kw):
  return msg.build_prompt(messages, tok, image_tokens=16, image_size=32, policy=msg.ImagePolicy(), max_images=4,
                          **kw)


def test_history_with_images_anywhere_is_the_reference_chat_context(serve_tok):
  conversation = [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": [_image(_url(40, 20)), {"type": "text", "text": "What is it?"}]},
      {"role": "assistant", "content": "A red block."},
      {"role": "user", "content": "And now?"},
      {"role": "user", "content": [{"type": "text", "text": "Compare with"}, _image(_url(10, 30, (0, 0, 250)))]},
  ]
  prompt = _build(serve_tok, conversation)
  first = qtext.from_list_format([{"image": "a"}, {"text": "What is it?"}])
  last = qtext.from_list_format([{"text": "Compare with"}, {"image": "b"}])
  expected = qtext.make_context(serve_tok, last, [(first, "A red block."), ("And now?", None)], system="Be brief.",
                                n_image_tokens=16)
  assert prompt.tokens == expected.tokens  # image spans hold no path: the keys do not change the ids
  assert prompt.sizes == [(40, 20), (10, 30)]
  assert [tuple(a[0, 0]) for a in prompt.images] == [(200, 10, 10), (0, 0, 250)] and prompt.images[0].shape == (
      32, 32, 3)


@pytest.mark.parametrize("messages_, match", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be from the user"),
    ([{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}], "must follow a user message"),
    ([{"role": "tool", "content": "a"}], "role must be"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "content\\[0\\] must be"),
    ([{"role": "user", "content": "see <img>/etc/passwd</img>"}], "may not hold <img> tags"),
    ([{"role": "user", "content": [_image("data:image/png;base64,AAAA")]}], "cannot be read as an image"),
    ([{"role": "user", "content": [_image("/etc/passwd")]}], "need a server started with --image_root"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message must come first"),
    ([{"role": "system", "content": [_image(_url(4, 4))]}, {"role": "user", "content": "a"}], "takes no images"),
    ([{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}], "content\\[0\\] must be"),
])
def test_bad_conversations_are_refused_with_a_reason(serve_tok, messages_, match):
  with pytest.raises(msg.RequestError, match=match) as err:
    _build(serve_tok, messages_)
  assert 400 <= err.value.status < 500 and err.value.body()["error"]["message"]


def test_system_text_parts_developer_role_and_refusals_are_the_same_prompt_as_plain_strings(serve_tok):
  plain = _build(serve_tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "I cannot."}, {"role": "user", "content": "Why?"}])
  parts = _build(serve_tok, [
      {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
      {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]},
      {"role": "user", "content": "Why?"}])
  assert parts.tokens == plain.tokens and "Be brief." in plain.raw_text and "I cannot." in plain.raw_text


def test_a_raw_format_model_refuses_a_system_message_instead_of_dropping_it(serve_tok):
  """The base-model format has no system turn (the reference ignores `system` there): a system instruction would
  silently have no effect, so it is refused; an empty one changes nothing and passes."""
  user = {"role": "user", "content": "Generate the caption in English:"}
  with pytest.raises(msg.RequestError, match="raw .* no system message") as err:
    _build(serve_tok, [{"role": "system", "content": "Answer in French."}, user], chat_format="raw")
  assert err.value.status == 400
  assert (_build(serve_tok, [{"role": "system", "content": ""}, user], chat_format="raw").tokens
          == _build(serve_tok, [user], chat_format="raw").tokens)


def test_paths_are_read_under_the_image_root_only(serve_tok, tmp_path):
  (tmp_path / "root").mkdir()
  Image.new("RGB", (8, 8)).save(tmp_path / "root" / "ok.png")
  Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
  (tmp_path / "root" / "link.png").symlink_to(tmp_path / "outside.png")
  policy = msg.ImagePolicy(image_root=str(tmp_path / "root"))
  assert msg.load_image("ok.png", policy, 16)[1] == (8, 8)
  for path in ("../outside.png", "link.png", str(tmp_path / "outside.png")):
    with pytest.raises(msg.RequestError, match="outside the server's image root"):
      msg.load_image(path, policy, 16)
  for path in ("ok.png\x00", "\ud800.png"):  # names no file system takes: a 400, not a ValueError (a 500)
    with pytest.raises(msg.RequestError, match="not a valid file name"):
      msg.load_image(path, policy, 16)


def test_a_remote_image_that_cannot_be_fetched_is_a_bad_request():
  """With --allow_remote_images, a URL that is refused, answers 404 or is malformed is the client's 400, not an
  unhandled urllib error (a 500)."""

  class NotFound(http.server.BaseHTTPRequestHandler):

    def do_GET(self):  # pylint: disable=invalid-name
      self.send_response(404)
      self.end_headers()

    def log_message(self, *args):
      pass

  server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]  # nothing listens there once the socket is closed
  policy = msg.ImagePolicy(allow_remote=True, remote_timeout=5)
  try:
    for url in (f"http://127.0.0.1:{server.server_port}/a.png", f"http://127.0.0.1:{closed}/a.png", "http://",
                "http://[::1/a.png"):
      with pytest.raises(msg.RequestError, match="cannot be fetched") as err:
        msg.load_image(url, policy, 16)
      assert err.value.status == 400 and err.value.code == "invalid_image_url"
  finally:
    server.shutdown()
    server.server_close()


def test_text_that_cannot_fit_the_context_is_refused_before_it_is_tokenized(serve_tok, monkeypatch):
  """The system and last user messages are always in the prompt: when their length alone says they cannot fit,
  the request is refused naming the context, without tokenizing them (54 MB took 35 s of a worker thread). Text of
  more characters than the context holds tokens that fit is not refused."""
  context = 128
  bound = context * serve_tok.max_token_chars * qtext.tokenizer.NFC_MAX_COMPOSED
  lengths = []
  encode = serve_tok.encode
  monkeypatch.setattr(serve_tok, "encode", lambda text, **kw: lengths.append(len(text)) or encode(text, **kw))
  half = "x" * (bound // 2)
  for conversation in ([{"role": "user", "content": "x" * bound}],
                       [{"role": "system", "content": half}, {"role": "user", "content": "earlier"},
                        {"role": "assistant", "content": "yes"},
                        {"role": "user", "content": [{"type": "text", "text": half}]}]):
    with pytest.raises(msg.RequestError, match=f"at least {context} tokens; the context is {context} tokens") as e:
      _build(serve_tok, conversation, context=context)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded" and e.value.param == "messages"
  assert not lengths
  words = (serve_tok.decode([i]) for i in range(serve_tok.vocab_size) if i not in serve_tok.special_tokens.values())
  dense = max(words, key=len) * 16  # the longest word of the vocabulary: ' triangle' x 16, 144 characters
  fits = _build(serve_tok, [{"role": "user", "content": dense}], context=context)
  assert len(dense) > context and len(fits.tokens) < context


def test_boxes_come_back_in_pixels_of_the_latest_image(serve_tok):
  prompt = msg.Prompt([1], [np.zeros((4, 4, 3), np.uint8)] * 2, [(100, 50), (640, 480)], "")
  answer = "<ref>the dog</ref><box>(100,200),(500,999)</box> and <box>(0,0),(999,999)</box><box>bad</box>"
  boxes = msg.boxes_in_pixels(answer, prompt)
  assert boxes == [
      {"ref": "the dog", "box_1000": [100, 200, 500, 999],
       "box": [64, 96, 320, 479], "image_index": 1},
      {"ref": None, "box_1000": [0, 0, 999, 999], "box": [0, 0, 639, 479], "image_index": 1}]


def test_a_box_takes_the_phrase_of_the_box_before_it_or_of_the_grounding_prompt():
  """One phrase, several boxes: each box is the phrase's. A base model's grounding prompt ends with the phrase and
  the answer starts with its box, or (RefCOCO's evaluation prompt) with `<box>` too and the answer is the box's
  inside. The parse that evaluation uses keeps the reference's None for both."""
  several = "<ref>two cats</ref><box>(0,0),(10,10)</box><box>(20,20),(30,30)</box>, a <box>(1,1),(2,2)</box>"
  prompt = msg.Prompt([1], [], [], "Describe it")
  assert [b["ref"] for b in msg.boxes_in_pixels(several, prompt)] == ["two cats", "two cats", None]
  assert [b.ref for b in qtext.parse_boxes(several, strict=False)] == ["two cats", None, None]
  grounding = msg.Prompt([1], [np.zeros((4, 4, 3), np.uint8)], [(200, 100)], "Picture 1: <img>k</img>\n"
                         "<ref>the red square</ref>")
  assert msg.boxes_in_pixels("<box>(500,500),(999,999)</box>", grounding) == [
      {"ref": "the red square", "box_1000": [500, 500, 999, 999], "box": [100, 50, 199, 99], "image_index": 0}]
  refcoco = msg.Prompt([1], [np.zeros((4, 4, 3), np.uint8)], [(200, 100)], "<img>k</img><ref>the dog</ref><box>")
  assert msg.boxes_in_pixels("(500,500),(999,999)</box>", refcoco) == [
      {"ref": "the dog", "box_1000": [500, 500, 999, 999], "box": [100, 50, 199, 99], "image_index": 0}]
  chat = msg.Prompt([1], [], [], "<|im_start|>user\n<ref>the red square</ref><|im_end|>\n<|im_start|>assistant\n")
  assert msg.boxes_in_pixels("<box>(1,1),(2,2)</box>", chat)[0]["ref"] is None


def test_stop_strings_are_cut_and_their_prefix_is_held_back():
  pieces = ["The", " answer", " is", " 4", "2.", "\\n", "Human", ":", " more"]
  text = Detokenizer(lambda ids: "".join(pieces[i] for i in ids), stop=["\\nHuman:"])
  sent = [text.add(i) for i in range(len(pieces))]
  assert "".join(sent) == "The answer is 42." and text.stopped and text.num_tokens == 8
  assert sent[5:] == ["", "", "", ""]  # "\\n" and "Human" were held: they could start the stop string
  free = Detokenizer(lambda ids: "".join(pieces[i] for i in ids), stop=["zzz"])
  assert "".join(free.add(i) for i in range(4)) + free.finish() == "The answer is 4"


def test_with_min_tokens_a_stop_string_that_ends_before_them_is_text():
  """vLLM's `min_tokens`: a stop string ending within the first min_tokens tokens is text; one ending at a later
  token ends the text, even when it began earlier (vLLM looks back a stop string's length from the new text)."""
  pieces = ["a", "b", "c", "a", "b", "c"]
  decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
  text = Detokenizer(decode, stop=["ab"], min_tokens=3)
  assert "".join(text.add(i) for i in range(6)) == "abc" and text.stopped and text.num_tokens == 5
  straddles = Detokenizer(decode, stop=["bc"], min_tokens=3)  # "bc" ends at token 3: stopped there
  assert "".join(straddles.add(i) for i in range(6)) == "a" and straddles.num_tokens == 3
  early = Detokenizer(decode, stop=["ab"], min_tokens=6)
  assert "".join(early.add(i) for i in range(6)) + early.finish() == "abcabc" and not early.stopped


def test_a_split_multibyte_character_waits_for_its_last_byte():
  decoded = ["caf", "caf\ufffd", "café"]
  text = Detokenizer(lambda ids: decoded[len(ids) - 1])
  assert [text.add(0), text.add(1), text.add(2)] == ["caf", "", "é"]


def test_token_pieces_of_qwens_vocabulary_join_to_the_text(qwen_tiktoken_path):
  """Byte-level BPE splits a 4-byte character over three tokens: each piece's text shows U+FFFD, its bytes are the
  real ones, and the bytes of the pieces join to the text; a special token is its surface form."""
  tok = qtext.QwenTokenizer(qwen_tiktoken_path)
  text = "你好 𝄞 <|im_end|>"
  pieces = [token_piece(tok.decode, i) for i in tok.encode(text)]
  assert b"".join(raw for _, raw in pieces).decode() == text
  assert any("\ufffd" in t and len(raw) < 4 for t, raw in pieces)
  assert pieces[-1] == ("<|im_end|>", b"<|im_end|>")


def _hf_environment():
  """A Jinja environment as Hugging Face renders chat templates in (trimmed blocks, sandboxed, `raise_exception`)."""
  import jinja2.sandbox  # pylint: disable=import-outside-toplevel

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env


_SYSTEM = 'Answer "briefly".\nThen stop: 你好 😀 \\n %} {{ x }} -%}'  # quotes, escapes, Jinja's own tags
_CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
    [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
     {"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A red block."},
     {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "now?"}]}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
     {"role": "user", "content": "b"}],
]
# Two user messages in a row: "\n\n" between them (one token when the text is tokenized as one, Gotcha 18).
_USERS_IN_A_ROW = [{"role": "user", "content": "a red"}, {"role": "user", "content": "b"}]


def _rendered(tok, messages_, system=_SYSTEM):
  """(the chat template's text in Hugging Face's environment, in a plain strict one, that text tokenized as one,
  what the chat endpoint builds)."""
  import jinja2  # pylint: disable=import-outside-toplevel
  template = qtext.chat_template(system)
  hf, plain = (env.from_string(template).render(messages=messages_, add_generation_prompt=True)
               for env in (_hf_environment(), jinja2.Environment(undefined=jinja2.StrictUndefined,
                                                                 keep_trailing_newline=True)))
  raw = msg.build_raw_prompt(hf, tok, image_tokens=16, image_size=32, policy=msg.ImagePolicy(), max_images=4)
  return hf, plain, raw, _build(tok, messages_, default_system=system)


@pytest.mark.parametrize("messages_", _CONVERSATIONS + [_USERS_IN_A_ROW])
def test_the_chat_template_renders_the_chat_endpoints_prompt_text(serve_tok, messages_):
  """`text.chat_template` (what /tokenizer_info hands out) renders a conversation to the very text of the chat
  endpoint's prompt, in Hugging Face's environment and in a plain one; tokenized as one text (as a client that
  renders it does), it gives the chat endpoint's tokens (this vocabulary has no "\\n\\n" token)."""
  hf, plain, raw, want = _rendered(serve_tok, messages_)
  assert hf == plain == want.raw_text
  assert raw.tokens == want.tokens
  closed = _hf_environment().from_string(qtext.chat_template(_SYSTEM)).render(messages=messages_,
                                                                              add_generation_prompt=False)
  assert closed + "\n<|im_start|>assistant\n" == hf


def test_with_qwens_vocabulary_the_template_gives_the_chat_tokens_but_where_two_user_messages_meet(
    qwen_tiktoken_path):
  tok = qtext.QwenTokenizer(qwen_tiktoken_path)
  for messages_ in _CONVERSATIONS:
    _, _, raw, want = _rendered(tok, messages_)
    assert raw.tokens == want.tokens, messages_
  for messages_ in (_USERS_IN_A_ROW, [{"role": "user", "content": "\nstarts with a line break"}]):
    _, _, raw, want = _rendered(tok, messages_)
    assert raw.raw_text == want.raw_text and len(raw.tokens) == len(want.tokens) - 1  # "\n\n": one token, not two
  _, _, raw, want = _rendered(tok, [{"role": "user", "content": "  starts with spaces"}])
  assert raw.tokens == want.tokens


@pytest.mark.parametrize("messages_, match", [
    ([{"role": "user", "content": [_image("data:image/png;base64,AAAA"), {"type": "text", "text": "hi"}]}],
     "renders text only"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}], "must come first"),
])
def test_the_chat_template_refuses_images_and_a_late_system_message(messages_, match):
  import jinja2  # pylint: disable=import-outside-toplevel
  with pytest.raises(jinja2.exceptions.TemplateError, match=match):
    _hf_environment().from_string(qtext.chat_template()).render(messages=messages_, add_generation_prompt=True)
  # Where no `raise_exception` is defined (lm-evaluation-harness's environment), the call itself fails.
  with pytest.raises(jinja2.exceptions.UndefinedError, match="raise_exception"):
    jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(qtext.chat_template()).render(
        messages=messages_, add_generation_prompt=True)
