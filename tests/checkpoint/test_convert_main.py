"""`python -m qwenvl_jax.convert`: both directions from the command line, and flag errors."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[2]


def _convert(*flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "qwenvl_jax.convert", *flags], env=env, capture_output=True,
                        text=True, timeout=600, cwd=REPO)


def test_command_line_round_trip(tmp_path, qwenvl_checkpoint):
  from qwenvl_jax.model import tiny
  src, state = qwenvl_checkpoint(tiny(), fmt="bin")
  run = _convert("--mode=torch_to_orbax", "--preset=tiny", f"--src={src}", f"--dst={tmp_path / 'orbax'}")
  assert run.returncode == 0, run.stderr[-3000:]
  run = _convert("--mode=orbax_to_torch", "--preset=tiny", "--image_size=224", f"--src={tmp_path / 'orbax'}",
                 f"--dst={tmp_path / 'export'}")
  assert run.returncode == 0, run.stderr[-3000:]
  out = {}
  for f in (tmp_path / "export").glob("*.safetensors"):
    out.update(load_file(str(f)))
  assert sorted(out) == sorted(state)
  assert all(torch.equal(out[k].view(torch.int16), state[k].view(torch.int16)) for k in state)
  run = _convert("--mode=init_from_pretrained", "--preset=tiny", f"--openclip={src}", f"--dst={tmp_path / 'i'}")
  assert run.returncode != 0 and "--qwen7b" in run.stderr
