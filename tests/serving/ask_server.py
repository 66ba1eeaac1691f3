"""`python -m tests.serving.ask_server OUT FLAG...`: a user's server session as a command of a background job
(tests/background.py), so that a server's start-up and warm-up (most of such a test) run on the core the other tests
leave idle.

Starts `python -m qwenvl_jax.serve FLAG...` as `serve_cli` does, reads /health, asks the chat conversations of
`conversations()` all at once (greedy: they share the decode steps of one batch), reads /health again, stops the
server with Ctrl-C pressed twice while a request is still open (`serve_cli` checks the forced stop), and writes
{"health", "answers", "after"} to OUT, a JSON file; its server's log goes beside it. A failed check exits non-zero
with its traceback, which the test that waits for the job shows.
"""
import base64
import concurrent.futures
import io
import json
import pathlib
import sys

import numpy as np
import requests
from PIL import Image

from tests.serving.conftest import serve_cli


def png(seed: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def conversations() -> list[list[dict]]:
  """OpenAI chat messages per case; the last carries an image (`png(5)`) as a data URL."""
  url = "data:image/png;base64," + base64.b64encode(png(5)).decode()
  return [
      [{"role": "user", "content": "Describe a red circle."}],
      [{"role": "user", "content": "Where is the blue square?"}],
      [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                    {"type": "text", "text": "What is in the picture?"}]}],
  ]


def main(out: pathlib.Path, flags: list[str]) -> None:
  max_tokens = next(int(f.split("=", 1)[1]) for f in flags if f.startswith("--max_tokens_limit="))
  with serve_cli(flags, out.parent, open_request_at_exit=True) as url:
    health = requests.get(url + "/health", timeout=10).json()

    def ask(messages):
      r = requests.post(url + "/v1/chat/completions", timeout=300, json={
          "messages": messages, "max_tokens": max_tokens, "temperature": 0})
      r.raise_for_status()
      return r.json()["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      answers = list(pool.map(ask, conversations()))
    after = requests.get(url + "/health", timeout=10).json()
  out.write_text(json.dumps({"health": health, "answers": answers, "after": after}))


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]), sys.argv[2:])
