"""`python -m qwenvl_jax.serve --quantize=int8|int4 --kv_cache_dtype=int8` over real HTTP (the CLI in a subprocess
on a local port): concurrent greedy answers equal, token for token, `inference.chat` (the batch `Generator`) on
the same random weights quantized the same way with the same KV cache dtype, and /health shows the stored dtypes.
"""
import base64
import concurrent.futures
import io

import numpy as np
import pytest
import requests
from PIL import Image

from qwenvl_jax import inference, sharding
from qwenvl_jax import text as qtext
from qwenvl_jax.data.synthetic import synthetic_corpus
from qwenvl_jax.inference import loading, model_source
from qwenvl_jax.text import train_sentencepiece
from tests.serving.conftest import serve_cli

pytestmark = pytest.mark.slow  # a server subprocess per case (start-up + warm-up): tens of seconds on 2 cores
MAX_TOKENS = 16
GROUP = 32  # int4 group: the tiny preset's contracted axes are 16..128 wide


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory) -> str:
  return str(train_sentencepiece(synthetic_corpus(300), tmp_path_factory.mktemp("qserve_sp") / "tiny",
                                 vocab_size=400))


def _png(seed: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _conversations():
  """(OpenAI messages, the same query in the reference's list format) per case; one carries an image."""
  image = _png(5)
  url = "data:image/png;base64," + base64.b64encode(image).decode()
  return [
      ([{"role": "user", "content": "Describe a red circle."}],
       qtext.from_list_format([{"text": "Describe a red circle."}])),
      ([{"role": "user", "content": "Where is the blue square?"}],
       qtext.from_list_format([{"text": "Where is the blue square?"}])),
      ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What is in the picture?"}]}],
       (image, "What is in the picture?")),
  ]


def _reference(sp_file, quantize, kv_cache_dtype, tmp_path) -> list[str]:
  source = model_source.resolve(None, model="tiny", tokenizer=sp_file)
  tok, _, mesh, rules, model = loading.load_source(source, dtype="float32", seed=0, quantize=quantize,
                                                   group_size=GROUP)
  gen = inference.chat_generation_config(tok, max_new_tokens=MAX_TOKENS)
  answers = []
  with sharding.use_rules(mesh, rules):
    generator = inference.Generator(model, kv_cache_dtype=kv_cache_dtype)
    for _, query in _conversations():
      if isinstance(query, tuple):  # the image goes through a file, as the reference's list format names it
        image, text = query
        (tmp_path / "pic.png").write_bytes(image)
        query = qtext.from_list_format([{"image": "pic.png"}, {"text": text}])
      answer, _ = inference.chat.chat(generator, tok, query, [], gen=gen, image_root=str(tmp_path))
      answers.append(answer)
  return answers


@pytest.mark.parametrize("quantize,kv_cache_dtype", [("int8", "int8"), ("int4", None)])
def test_quantized_server_answers_as_generate_with_the_same_weights_and_cache(sp_file, tmp_path, quantize,
                                                                             kv_cache_dtype):
  flags = ["--model=tiny", f"--tokenizer={sp_file}", "--dtype=float32", "--num_slots=4", "--context=128",
           "--buckets=64", "--max_images=1", "--prefill_batch=2", f"--max_tokens_limit={MAX_TOKENS}",
           f"--quantize={quantize}", f"--kv_cache_dtype={kv_cache_dtype or 'auto'}"]
  flags += [f"--group_size={GROUP}"] if quantize == "int4" else []  # int8 weights have no groups (refused)
  # The reference runs in this process while the server subprocess starts and compiles (both mostly
  # single-threaded compiles: overlapped on 2 cores, the case took 27 s one after the other).
  reference = []
  with concurrent.futures.ThreadPoolExecutor(1) as background:
    def start():
      reference.append(background.submit(_reference, sp_file, quantize, kv_cache_dtype, tmp_path))
    # Stopped while a request is still open: the forced stop of a second Ctrl-C is checked here too.
    with serve_cli(flags, tmp_path, while_starting=start, open_request_at_exit=True) as url:
      health = requests.get(url + "/health", timeout=10).json()
      assert quantize in health["weight_dtypes"]
      assert health["kv_cache_dtype"] == (kv_cache_dtype or "float32")
      assert health["attention"] == "xla"  # serve's default (--attention=splash on a TPU)

      def ask(messages):
        r = requests.post(url + "/v1/chat/completions", timeout=120, json={
            "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]

      # All at once: they share the decode steps (and the int8 cache) of one batch.
      with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(ask, [m for m, _ in _conversations()]))
      after = requests.get(url + "/health", timeout=10).json()
    expected = reference[0].result()
  assert [a.strip() for a in answers] == expected
  assert all(expected) and len(set(expected)) > 1  # real, different answers: the comparison means something
  assert after["compilations"]["backend_compiles_after_warmup"] == 0
