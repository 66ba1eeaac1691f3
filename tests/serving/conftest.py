"""Shared fixtures of the serving tests: a tiny float32 model, one started engine, and one real HTTP server
(uvicorn on a free local port, in a thread of the test process) for the whole session.

Few shapes keep warm-up short on a 2-core CPU: 4 slots, a 512-token context (room for a long answer that is still
running when its client leaves), prompt buckets 64 and 512, up to 2 images per request and 2 requests per prefill.
"""
import contextlib
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from flax import nnx

from qwenvl_jax.data.synthetic import synthetic_corpus
from qwenvl_jax.model import QwenVL, tiny
from qwenvl_jax.serving import Engine
from qwenvl_jax.serving import api, messages
from qwenvl_jax.text import SentencePieceTokenizer, train_sentencepiece
from tests.training import helpers

MODEL_NAME = "tiny-test"
MAX_TOKENS_LIMIT = 400


@pytest.fixture(scope="session")
def serve_tok(tmp_path_factory) -> SentencePieceTokenizer:
  path = train_sentencepiece(synthetic_corpus(300), tmp_path_factory.mktemp("serve_sp") / "tiny", vocab_size=400)
  return SentencePieceTokenizer(path)


@pytest.fixture(scope="session")
def serve_model(serve_tok) -> QwenVL:
  return QwenVL(tiny(dtype="float32", remat_policy="none", image_pad_id=serve_tok.img_pad_id), rngs=nnx.Rngs(0))


def chat_stops(tok):
  return [tok.eod_id, tok.im_end_id, tok.im_start_id]


@pytest.fixture(scope="session")
def engine(serve_model, serve_tok):
  eng = Engine(serve_model, num_slots=4, context=512, max_images=2, prefill_batch=2, buckets=(64,),
               stop_ids=chat_stops(serve_tok), vocab_limit=serve_tok.vocab_size)
  eng.start()
  yield eng
  eng.shutdown()


Server = api.ThreadedServer


@contextlib.contextmanager
def client_reading_nothing(port: int, request: bytes):
  """A raw socket with a 4 KiB receive buffer that sends `request` to 127.0.0.1:`port` and reads nothing until the
  test reads it: the server's writes soon wait on full socket buffers."""
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(request)
    yield s


def read_until_closed(s: socket.socket, timeout: float = 60) -> bytes:
  """Everything the server sends on `s` until it closes the connection (a server that never does, or waits for
  more of the request, leaves a read hanging for `timeout` seconds: a socket.timeout fails the test)."""
  s.settimeout(timeout)
  data = b""
  while chunk := s.recv(1 << 20):
    data += chunk
  return data


def wait_until(condition, timeout: float = 60) -> None:
  """Polls `condition()` every 50 ms until it is true or `timeout` seconds have passed (the caller asserts)."""
  deadline = time.monotonic() + timeout
  while not condition() and time.monotonic() < deadline:
    time.sleep(0.05)


def _refuses(port: int) -> bool:
  """Whether nothing listens on the local `port` any more."""
  try:
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
  except ConnectionRefusedError:
    return True
  except OSError:  # a timeout or a reset: the server still has the port
    pass
  return False


@pytest.fixture(scope="session")
def image_root(tmp_path_factory):
  return tmp_path_factory.mktemp("image_root")


@pytest.fixture(scope="session")
def server(engine, serve_tok, image_root):
  config = api.ServerConfig(model_name=MODEL_NAME, max_tokens_limit=MAX_TOKENS_LIMIT,
                            images=messages.ImagePolicy(max_bytes=200_000, max_pixels=1024 * 1024,
                                                        image_root=str(image_root)))
  srv = Server(api.create_app(engine, serve_tok, config))
  yield srv
  srv.stop()


@pytest.fixture(scope="session")
def http():
  with requests.Session() as s:
    yield s


@contextlib.contextmanager
def serve_cli(flags: list[str], log_dir, timeout: float = 600, while_starting=None, open_request_at_exit=False):
  """`python -m qwenvl_jax.serve FLAGS` on a free local port; yields its base URL once /health is ok, then stops it
  as a user at its terminal would, with Ctrl-C pressed twice (uvicorn's graceful stop, then its forced one: 0.2 s
  apart, or once the first has closed the listening socket when a request is held open), and checks that it exits
  without a traceback (a KeyboardInterrupt used to print one from JAX's atexit hook). Its output goes to
  `log_dir`/serve.log (shown when it dies before it is up).
  `while_starting()`, if given, is called once the process is started, before waiting for it (to overlap work of
  the test's own with its start-up; after the fork, so no thread of it is running when the child is forked).
  `open_request_at_exit`: a request is still being received when Ctrl-C is pressed (its body half sent), so the
  graceful stop waits for it and the second Ctrl-C is the forced stop, which must exit at once (130), quietly
  (the forced stop used to log a traceback for each open request and exit 0)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  log = pathlib.Path(log_dir) / "serve.log"
  # SIGINT as a terminal leaves it (pytest may run with it ignored, which a child would inherit).
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl_jax.serve", f"--port={port}"] + flags,
                            env=helpers.subprocess_env(devices=1), cwd=helpers.REPO, stdout=out, stderr=out,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  url = f"http://127.0.0.1:{port}"
  try:
    if while_starting is not None:
      while_starting()
    deadline = time.monotonic() + timeout
    while True:
      assert proc.poll() is None, log.read_text()[-3000:]
      try:
        if requests.get(url + "/health", timeout=2).json()["status"] == "ok":
          break
      except requests.ConnectionError:
        pass
      assert time.monotonic() < deadline, "the server did not come up"
      time.sleep(0.5)
    yield url
    held = None
    if open_request_at_exit:
      held = socket.create_connection(("127.0.0.1", port), timeout=30)
      held.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")
      assert held.recv(100).startswith(b"HTTP/1.1 100 ")  # the server waits for the body now
      held.sendall(b"{")
  except BaseException:
    proc.kill()
    proc.wait(30)
    raise
  try:
    proc.send_signal(signal.SIGINT)
    if held is not None:  # the second Ctrl-C must come after the first was handled (two pending merge into one):
      wait_until(lambda: _refuses(port), timeout=30)  # the stopping server has closed its listening socket
    else:
      time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(60)
  finally:
    proc.kill()
    if held is not None:
      held.close()
  text = log.read_text()
  # 0: stopped by the first Ctrl-C; 130, or killed by SIGINT (-2) during the interpreter's last teardown, where
  # Python has reset the handler: the second Ctrl-C cut the clean-up (a shell reports both as 130).
  assert code in ((130, -signal.SIGINT) if open_request_at_exit else (0, 130, -signal.SIGINT)), (code, text[-3000:])
  assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
  assert code != 0 or text.rstrip().endswith("stopped"), text[-3000:]
