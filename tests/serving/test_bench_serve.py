"""bench/bench_serve.py's client code against the session's real server: the requests it sends (streamed with
usage, then the agreement check's non-streamed ones) must be ones the API accepts, or the prepared GPU run
(bench/gpu_checks.sh) would stop half-way on an HTTP 400."""
import importlib.util
import pathlib

from tests.serving.conftest import MODEL_NAME

REPO = pathlib.Path(__file__).resolve().parents[2]


def _bench():
  spec = importlib.util.spec_from_file_location("bench_serve", REPO / "bench" / "bench_serve.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_bench_clients_requests_are_accepted_and_counted(server):
  bench = _bench()
  url = server.url + "/v1/chat/completions"
  body = bench.request_body(MODEL_NAME, "Describe the picture in detail, please.", max_tokens=6)
  results = bench._client(url, body, 2)  # pylint: disable=protected-access
  assert [tokens for _, _, tokens in results] == [6, 6]  # ignore_eos: every answer is max_tokens long
  assert all(0 < ttft <= latency for ttft, latency, _ in results)
  same, share = bench.agreement(url, body, 2)
  assert (same, share) == (2, 1.0)  # greedy float32 on CPU: batched answers are the ones given alone
