"""`python -m qwenvl_jax.evaluate` as a user runs it: a mistake in the config or the data is one `error:` line (plus a
hint) and exit 2, before the model loads, and leaves nothing behind (no `OUT.partial/`, no stray folder)."""
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys

from qwenvl_jax.data.synthetic import synthetic_record

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = str(REPO_ROOT / "configs" / "eval" / "ocrvqa_val.py")


def _evaluate(cwd, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  return subprocess.run([sys.executable, "-m", "qwenvl_jax.evaluate", f"--config={CONFIG}", *flags], env=env,
                        cwd=cwd, capture_output=True, text=True, timeout=300)


def test_mistakes_that_were_tracebacks_or_silent_are_one_line_and_exit_2(tmp_path):
  (tmp_path / "data" / "img").mkdir(parents=True)
  synthetic_record(0, task="grounding", image_size=32).images[0].save(tmp_path / "data" / "img" / "a.png")
  data = tmp_path / "data" / "val.jsonl"
  data.write_text(json.dumps({"question_id": 1, "image": "img/a.png", "question": "What?", "answer": "a"}) + "\n")
  (tmp_path / "empty.jsonl").write_text("")
  out = "--config.output=out/o.json"
  good = f"--config.data_path={data}"
  cases = [  # (flags, what the error line says, what the hint line says)
      (["--config.data_path=empty.jsonl", out], "the evaluation data empty.jsonl holds no examples", None),
      ([good, out, "--config.few_shot=-2"], "config.few_shot=-2 must be an integer >= 0", None),
      ([good, "--config.output=gs://bucket/o.json"], "the results file gs://bucket/o.json is a URL", "gcsfuse"),
      ([good, out, "--config.image_size=-1"], "config.image_size=-1 must be a positive integer", None),
      ([good, out, "--config.quantize_group_size=0"], "config.quantize_group_size=0 must be an integer >= 1", None),
      ([good, out], "example 1 (image img/a.png): image file not found: img/a.png",
       f"pass --config.image_root={tmp_path / 'data'}"),
  ]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # each is a JAX start-up: overlap two
    procs = list(pool.map(lambda case: _evaluate(tmp_path, *case[0]), cases))
  for (flags, message, hint), proc in zip(cases, procs):
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, (flags, proc.stderr[-3000:])
    assert len(lines) in (1, 2) and lines[0].startswith("error: ") and message in lines[0], (flags, proc.stderr)
    if hint:
      assert lines[1].startswith("  hint: ") and hint in lines[1], (flags, proc.stderr)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty.jsonl", "out"]  # no gs:/ folder
  assert list((tmp_path / "out").iterdir()) == []  # no o.json.partial/ left behind
