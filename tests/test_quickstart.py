"""The README's quick start, run as written: its chat (`generate`) and evaluate commands, parsed from README.md so
the documentation cannot drift from what works, against a tiny training run of the default stage-2 config.

The run is the session's `uninterrupted` run (tests/conftest.py: `tests/training/helpers.SMALL`, 56 px, 24 steps, the
reference of the training tests), standing in for the README's `runs/stage2`: only the run directory and the
results path of the commands are replaced.
"""
import concurrent.futures
import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from qwenvl_jax.data.synthetic import synthetic_record
from tests.training.helpers import REPO, subprocess_env

README = REPO / "README.md"
RUN_DIR = "runs/stage2"   # what the quick start trains into and then chats with and evaluates


def quickstart_commands() -> dict[str, list[str]]:
  """module ('train', 'generate', ...) -> argv of its `python -m qwenvl_jax.<module>` line in the README's
  "Quick start" section (the first fenced bash block lines; `#` comments dropped)."""
  text = README.read_text(encoding="utf-8")
  section = re.search(r"^## Quick start\b.*?(?=^## )", text, flags=re.S | re.M)
  assert section, "README.md has no '## Quick start' section"
  commands = {}
  for line in re.findall(r"^python -m qwenvl_jax\.\S.*$", section.group(0), flags=re.M):
    argv = shlex.split(line, comments=True)
    commands.setdefault(argv[2].removeprefix("qwenvl_jax."), argv)
  return commands


@pytest.fixture(scope="module")
def trained_run(uninterrupted):
  """A finished tiny stage-2 run directory (config.json, tokenizer.model, checkpoints/24)."""
  workdir, _, _ = uninterrupted
  return workdir


def _run_readme_command(argv: list[str], run_dir: pathlib.Path, tmp_path: pathlib.Path) -> str:
  """Runs one README command from the repository root with the run directory (and a results path) swapped in;
  returns its stdout after checking the exit status."""
  assert any(RUN_DIR in a for a in argv), f"the README command {argv} does not use the run directory {RUN_DIR}"
  argv = [a.replace(RUN_DIR, str(run_dir)) for a in argv]
  argv = [re.sub(r"^--config\.output=.*", f"--config.output={tmp_path / 'results' / 'out.json'}", a) for a in argv]
  proc = subprocess.run([sys.executable] + argv[1:], cwd=REPO, env=subprocess_env(devices=1), capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
  return proc.stdout


def test_quickstart_lists_every_journey_as_one_command():
  commands = quickstart_commands()
  assert {"train", "generate", "evaluate", "serve"} <= set(commands), sorted(commands)
  assert commands["train"][3:] == ["--config=configs/stage2.py"]  # the embedded default, no data to fetch


def test_the_readme_image_is_a_held_out_synthetic_scene():
  """The chat command's picture is what `synthetic_sets` would draw (evaluation seed), not a stale file."""
  image_args = [a for a in quickstart_commands()["generate"] if a.startswith("--image=")]
  assert image_args, "the chat command names no image"
  path = REPO / image_args[0].split("=", 1)[1]
  from PIL import Image  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  drawn = synthetic_record(3, task="caption", image_size=448, seed=12345).images[0]
  np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(drawn.convert("RGB")))


@pytest.mark.slow
def test_readme_chat_and_evaluate_commands_work_on_a_trained_run(trained_run, tmp_path):
  commands = quickstart_commands()
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # each is a process start and a compile: overlap them
    answer, printed = pool.map(lambda name: _run_readme_command(commands[name], trained_run, tmp_path),
                               ("generate", "evaluate"))
  assert answer.strip(), "generate printed no answer"
  score = re.search(r"^flickr cider (\S+)", printed, flags=re.M)
  assert score, f"evaluate printed no score: {printed!r}"
  saved = json.loads((tmp_path / "results" / "out.json").read_text())
  assert saved["score"] == pytest.approx(float(score.group(1))) and saved["score"] >= 0.0
  assert saved["config"]["data_path"] == "synthetic" and saved["num_examples"] > 0
