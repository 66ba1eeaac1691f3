"""`python -m qwenvl_jax.evaluate` as a user runs it: a mistake in the config or the data is one `error:` line (plus a
hint) and exit 2, before the model loads, and leaves nothing behind (no `OUT.partial/`, no stray folder)."""
import json
import pathlib
import sys

from qwenvl_jax.data.synthetic import synthetic_record
from tests import background
from tests.training import helpers

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = str(REPO_ROOT / "configs" / "eval" / "ocrvqa_val.py")


_OUT = "--config.output=out/o.json"
_GOOD = "--config.data_path={folder}/data/val.jsonl"
_CASES = [  # (flags, what the error line says, what the hint line says; {folder}: the job's folder)
    (["--config.data_path=empty.jsonl", _OUT], "the evaluation data empty.jsonl holds no examples", None),
    ([_GOOD, _OUT, "--config.few_shot=-2"], "config.few_shot=-2 must be an integer >= 0", None),
    ([_GOOD, "--config.output=gs://bucket/o.json"], "the results file gs://bucket/o.json is a URL", "gcsfuse"),
    ([_GOOD, _OUT, "--config.image_size=-1"], "config.image_size=-1 must be a positive integer", None),
    ([_GOOD, _OUT, "--config.quantize_group_size=0"], "config.quantize_group_size=0 must be an integer >= 1", None),
    ([_GOOD, _OUT, "--config.attention=splash"], "--config.attention=splash is a TPU kernel, but JAX runs on 'cpu'",
     "omit --config.attention"),
    ([_GOOD, _OUT], "example 1 (image img/a.png): image file not found: img/a.png",
     "pass --config.image_root={folder}/data"),
]


def _mistakes(folder):
  """One `python -m qwenvl_jax.evaluate` per case of `_CASES` (a JAX start-up each) in `folder`: commands of a job
  registered in tests/background.py, which runs them from the session's start on the core the other tests leave
  idle."""
  (folder / "data" / "img").mkdir(parents=True)
  synthetic_record(0, task="grounding", image_size=32).images[0].save(folder / "data" / "img" / "a.png")
  (folder / "data" / "val.jsonl").write_text(
      json.dumps({"question_id": 1, "image": "img/a.png", "question": "What?", "answer": "a"}) + "\n")
  (folder / "empty.jsonl").write_text("")
  env = helpers.subprocess_env()
  return [background.Command([sys.executable, "-m", "qwenvl_jax.evaluate", f"--config={CONFIG}",
                              *(flag.format(folder=folder) for flag in flags)], env, folder, check=False)
          for flags, _, _ in _CASES]


mistakes = background.finished_work(__name__, "mistakes", _mistakes)


def test_mistakes_that_were_tracebacks_or_silent_are_one_line_and_exit_2(mistakes):
  folder, procs = mistakes
  assert len(procs) == len(_CASES)
  for (flags, message, hint), proc in zip(_CASES, procs):
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, (flags, proc.stderr[-3000:])
    assert len(lines) in (1, 2) and lines[0].startswith("error: ") and message in lines[0], (flags, proc.stderr)
    if hint:
      hint = hint.format(folder=folder)
      assert lines[1].startswith("  hint: ") and hint in lines[1], (flags, proc.stderr)
  assert sorted(p.name for p in folder.iterdir()) == ["data", "empty.jsonl", "out"]  # no gs:/ folder
  assert list((folder / "out").iterdir()) == []  # no o.json.partial/ left behind
