"""`python -m qwenvl_jax.serve --quantize=int8|int4 --kv_cache_dtype=int8` over real HTTP (the CLI in a subprocess
on a local port): concurrent greedy answers equal, token for token, `inference.chat` (the batch `Generator`) on
the same random weights quantized the same way with the same KV cache dtype, and /health shows the stored dtypes.

Each server session (start-up, warm-up, the requests, the stop: `tests/serving/ask_server.py`) is a command of a
background job (tests/background.py) that runs from the pytest session's start on the core the other tests leave
idle; a case computes its reference in this process, then waits for what is left of its command.
"""
import json
import sys

import pytest

from qwenvl_jax import inference, sharding
from qwenvl_jax import text as qtext
from qwenvl_jax.data.synthetic import synthetic_corpus
from qwenvl_jax.inference import loading, model_source
from qwenvl_jax.text import train_sentencepiece
from tests import background
from tests.serving import ask_server
from tests.training import helpers

pytestmark = pytest.mark.slow  # a server subprocess per case (start-up + warm-up): tens of seconds on 2 cores
MAX_TOKENS = 16
GROUP = 32  # int4 group: the tiny preset's contracted axes are 16..128 wide
CASES = [("int8", "int8"), ("int4", None)]  # (--quantize, --kv_cache_dtype); one command of the job each


def _sp_file(folder) -> str:
  return str(folder / "tiny.model")


def _servers(folder):
  train_sentencepiece(synthetic_corpus(300), folder / "tiny", vocab_size=400)
  commands = []
  for quantize, kv_cache_dtype in CASES:
    flags = ["--model=tiny", f"--tokenizer={_sp_file(folder)}", "--dtype=float32", "--num_slots=4", "--context=128",
             "--buckets=64", "--max_images=1", "--prefill_batch=2", f"--max_tokens_limit={MAX_TOKENS}",
             f"--quantize={quantize}", f"--kv_cache_dtype={kv_cache_dtype or 'auto'}"]
    flags += [f"--group_size={GROUP}"] if quantize == "int4" else []  # int8 weights have no groups (refused)
    (folder / quantize).mkdir()
    commands.append(background.Command([sys.executable, "-m", "tests.serving.ask_server",
                                        str(folder / quantize / "answers.json"), *flags],
                                       helpers.subprocess_env(devices=1), check=False))
  return commands


background.register(__name__, "quantized_servers", _servers)


@pytest.fixture(scope="module")
def quantized_servers(tmp_path_factory) -> background.Job:
  """The job, started and not waited for: each case computes its reference first."""
  return background.job(__name__, "quantized_servers", tmp_path_factory.mktemp)


def _reference(sp_file, quantize, kv_cache_dtype, tmp_path) -> list[str]:
  source = model_source.resolve(None, model="tiny", tokenizer=sp_file)
  tok, _, mesh, rules, model = loading.load_source(source, dtype="float32", seed=0, quantize=quantize,
                                                   group_size=GROUP)
  gen = inference.chat_generation_config(tok, max_new_tokens=MAX_TOKENS)
  (tmp_path / "pic.png").write_bytes(ask_server.png(5))  # the reference's list format names the image's file
  answers = []
  with sharding.use_rules(mesh, rules):
    generator = inference.Generator(model, kv_cache_dtype=kv_cache_dtype)
    for (message,) in ask_server.conversations():  # the same query in the reference's list format
      parts = message["content"] if isinstance(message["content"], list) else [{"text": message["content"]}]
      query = qtext.from_list_format([{"image": "pic.png"} if p.get("type") == "image_url" else {"text": p["text"]}
                                      for p in parts])
      answer, _ = inference.chat.chat(generator, tok, query, [], gen=gen, image_root=str(tmp_path))
      answers.append(answer)
  return answers


@pytest.mark.parametrize("case", range(len(CASES)), ids=[q for q, _ in CASES])
def test_quantized_server_answers_as_generate_with_the_same_weights_and_cache(quantized_servers, tmp_path, case):
  quantize, kv_cache_dtype = CASES[case]
  expected = _reference(_sp_file(quantized_servers.folder), quantize, kv_cache_dtype, tmp_path)
  run = quantized_servers.result(commands=case + 1)[case]
  assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
  served = json.loads((quantized_servers.folder / quantize / "answers.json").read_text())
  health, after = served["health"], served["after"]
  assert quantize in health["weight_dtypes"]
  assert health["kv_cache_dtype"] == (kv_cache_dtype or "float32")
  assert health["attention"] == "xla"  # serve's default (--attention=splash on a TPU)
  assert [a.strip() for a in served["answers"]] == expected
  assert all(expected) and len(set(expected)) > 1  # real, different answers: the comparison means something
  assert after["compilations"]["backend_compiles_after_warmup"] == 0
