"""`pip install .` works from anywhere: the wheel holds everything the library needs (rule tables, defaults,
presets), and from a directory outside the checkout, with `python -I` (so neither the checkout nor PYTHONPATH is on
the path), the installed package plans and trains a few steps of a thin config file of the user's own.

Offline: the wheel is built without build isolation and installed without dependencies into a venv that sees the
system's site-packages (where jax, flax, ... already are)."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

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


def _run(args, cwd, env, timeout=600):
  proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc.stdout


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> pathlib.Path:
  """The package's wheel, built offline from a copy of the sources."""
  root = tmp_path_factory.mktemp("wheel")
  src = root / "src"  # a copy, so building never writes build/ or *.egg-info into the checkout
  src.mkdir()
  shutil.copy(REPO_ROOT / "pyproject.toml", src)
  shutil.copy(REPO_ROOT / "requirements.txt", src)  # the wheel's dependencies (pyproject: dynamic)
  shutil.copytree(REPO_ROOT / "qwenvl_jax", src / "qwenvl_jax", ignore=shutil.ignore_patterns("__pycache__"))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", str(root / "dist"), str(src)], cwd=root, env=env)
  wheel, = (root / "dist").glob("qwenvl_jax-*.whl")
  return wheel


@pytest.fixture(scope="module")
def venv_python(built_wheel, tmp_path_factory) -> pathlib.Path:
  """A venv over the system site-packages with the freshly built wheel installed (no dependencies)."""
  root = tmp_path_factory.mktemp("venv")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(root / "venv")], cwd=root,
       env=env)
  python = root / "venv" / "bin" / "python"
  _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
        str(built_wheel)], cwd=root, env=env)
  return python


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
def test_installed_wheel_plans_and_trains_from_another_directory(venv_python, tmp_path):
  work = tmp_path / "elsewhere"
  work.mkdir()
  (work / "my_stage1.py").write_text(USER_CONFIG)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  where = _run([str(venv_python), "-I", "-c",
                "import importlib.resources as r, json, qwenvl_jax, qwenvl_jax.sharding as s; "
                "page = (r.files('qwenvl_jax.serving') / 'static' / 'index.html').is_file(); "
                "print(json.dumps([qwenvl_jax.__file__, s.load_rules('fsdp_tp')[0], page]))"], cwd=work, env=env)
  installed, first_rule, page = json.loads(where.strip().splitlines()[-1])
  assert pathlib.Path(installed).is_relative_to(venv_python.parent.parent), installed
  assert not pathlib.Path(installed).is_relative_to(REPO_ROOT) and first_rule == ["act_batch", ["data", "fsdp"]]
  assert page  # package data (the chat page) is in the wheel

  plan = _run([str(venv_python), "-I", "-m", "qwenvl_jax.plan", "--config=my_stage1.py"], cwd=work, env=env)
  assert "model tiny" in plan and "trained in stage 1" in plan

  flags = [f"--config.{k}={v}" for k, v in SMALL.items()]
  _run([str(venv_python), "-I", "-m", "qwenvl_jax.train", "--config=my_stage1.py", "--workdir=run", *flags],
       cwd=work, env=env)
  losses = [json.loads(line)["loss"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
  assert len(losses) == 2 and all(loss > 0 for loss in losses)
  assert (work / "run" / "checkpoints" / "2").is_dir()
