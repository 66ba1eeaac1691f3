"""`pip install .` works from anywhere: the wheel holds everything the library needs (rule tables, defaults,
presets), and from a directory outside the checkout, with `python -I` (so neither the checkout nor PYTHONPATH is on
the path), the installed package plans and trains a few steps of a thin config file of the user's own.

Offline: the wheel is built without build isolation and installed without dependencies into a venv that sees the
system's site-packages (where jax, flax, ... already are)."""
import json
import os
import pathlib
import shutil
import sys

import pytest

from tests import background

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# A thin experiment file as a user would write it, over the defaults that live in the package.
USER_CONFIG = '''
from qwenvl_jax.training.stage_config import stage_config


def get_config(arg=None):
  c = stage_config(1, arg)
  c.total_steps = 2
  return c
'''
SMALL = {"res": 56, "batch_size": 2, "seq_len": 64, "max_images": 1, "log_every": 1, "checkpoint.every": 2,
         "progress_bar": False, "tensorboard": False, "data.num_workers": 0, "data.read_threads": 1,
         "synthetic_vocab_size": 400}


def _wheel_work(folder):
  """Builds the wheel offline from a copy of the sources (so building never writes build/ or *.egg-info into the
  checkout), installs it without dependencies into a venv over the system site-packages, and from a directory
  elsewhere runs the installed package with `python -I`: where it is, `plan` and `train` on the user's config.
  Registered in tests/background.py: it starts with the session at the lowest CPU priority."""
  src = folder / "src"
  src.mkdir()
  shutil.copy(REPO_ROOT / "pyproject.toml", src)
  shutil.copy(REPO_ROOT / "requirements.txt", src)  # the wheel's dependencies (pyproject: dynamic)
  shutil.copytree(REPO_ROOT / "qwenvl_jax", src / "qwenvl_jax", ignore=shutil.ignore_patterns("__pycache__"))
  work = folder / "elsewhere"
  work.mkdir()
  (work / "my_stage1.py").write_text(USER_CONFIG)
  python = folder / "venv" / "bin" / "python"
  build_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env = dict(build_env, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return [
      background.Command([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(folder / "dist"), str(src)], build_env, folder),
      background.Command([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                          str(folder / "venv")], build_env, folder),
      # The wheel just built (the only one in dist/).
      background.Command([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                          "--no-index", "-q", "--find-links", str(folder / "dist"), "qwenvl_jax"], build_env, folder),
      background.Command([str(python), "-I", "-c",
                          "import importlib.resources as r, json, qwenvl_jax, qwenvl_jax.sharding as s; "
                          "page = (r.files('qwenvl_jax.serving') / 'static' / 'index.html').is_file(); "
                          "print(json.dumps([qwenvl_jax.__file__, s.load_rules('fsdp_tp')[0], page]))"], env, work),
      background.Command([str(python), "-I", "-m", "qwenvl_jax.plan", "--config=my_stage1.py"], env, work),
      background.Command([str(python), "-I", "-m", "qwenvl_jax.train", "--config=my_stage1.py", "--workdir=run",
                          *(f"--config.{k}={v}" for k, v in SMALL.items())], env, work),
  ]


# (the job's folder, its finished commands: build, venv, install, where, plan, train, up to one that failed)
wheel_work = background.finished_work(__name__, "wheel_work", _wheel_work)


def _succeeded(proc):
  assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def built_wheel(request, tmp_path_factory) -> pathlib.Path:
  """The package's wheel, built offline from a copy of the sources (the job's first command: a test of the wheel
  alone waits for no more, and the rest is stopped when no selected test needs it)."""
  job = background.job(__name__, "wheel_work", tmp_path_factory.mktemp)
  folder, done = job.folder, job.result(commands=1)
  if not any("wheel_work" in getattr(item, "fixturenames", ()) for item in request.session.items):
    job.stop()
  _succeeded(done[0])
  wheel, = (folder / "dist").glob("qwenvl_jax-*.whl")
  return wheel


def test_the_wheel_requires_the_pinned_runtime_packages(built_wheel):
  """`pip install .` on a fresh machine must bring jax, flax, ... (the wheel declared none: the import failed)."""
  import zipfile  # pylint: disable=import-outside-toplevel
  with zipfile.ZipFile(built_wheel) as z:
    metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
  required = sorted(line.split(":", 1)[1].strip() for line in metadata.splitlines()
                    if line.startswith("Requires-Dist:"))
  pins = sorted(line.split("#")[0].strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
                if line.split("#")[0].strip())
  assert required == pins and any(p.startswith("jax==") for p in required), required


@pytest.mark.slow
def test_installed_wheel_plans_and_trains_from_another_directory(wheel_work):
  folder, done = wheel_work
  for proc in done:
    _succeeded(proc)
  _, _, _, where, plan, _ = done
  work = folder / "elsewhere"
  installed, first_rule, page = json.loads(where.stdout.strip().splitlines()[-1])
  assert pathlib.Path(installed).is_relative_to(folder / "venv"), installed
  assert not pathlib.Path(installed).is_relative_to(REPO_ROOT) and first_rule == ["act_batch", ["data", "fsdp"]]
  assert page  # package data (the chat page) is in the wheel

  assert "model tiny" in plan.stdout and "trained in stage 1" in plan.stdout

  losses = [json.loads(line)["loss"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
  assert len(losses) == 2 and all(loss > 0 for loss in losses)
  assert (work / "run" / "checkpoints" / "2").is_dir()
