"""`python -m qwenvl_jax.plan`: parameter counts of the configured model, without allocating it."""

import os
import subprocess
import sys

import pytest

from qwenvl_jax import plan
from qwenvl_jax.model import qwen_vl_7b
from tests.planning.conftest import requires_libtpu


def test_cli_prints_reference_counts_for_the_full_model():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "qwenvl_jax.plan", "--config=configs/stage2.py:model=qwen_vl_7b"],
                       capture_output=True, text=True, env=env, check=True, timeout=300).stdout
  assert "9,656,935,168" in out  # total
  assert "7,721,324,544" in out  # LLM
  assert "1,842,770,688" in out and "92,839,936" in out  # ViT trunk + adapter = 1,935,610,624 visual
  assert "448 px" in out


def test_stage_trainable_counts():
  counts = plan.trainable_counts(qwen_vl_7b())
  fixed_pos_embed = 256 * 4096  # the resampler's sin-cos table, fixed in the reference (requires_grad False)
  assert counts[1] == 1_935_610_624 - fixed_pos_embed  # stage 1: ViT + adapter, LLM frozen
  assert counts[2] == 9_656_935_168 - fixed_pos_embed  # stage 2: everything else
  assert counts[3] == 7_721_324_544 + 76_054_528  # stage 3 (fix_vit): LLM + resampler incl. pos_embed


@requires_libtpu
@pytest.mark.slow
def test_cli_plans_a_tiny_stage_for_a_small_tpu_topology():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "qwenvl_jax.plan", "--config=configs/stage1.py:model=tiny",
                        "--topology=v5e:2x2"], capture_output=True, text=True, env=env, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "compiling the train step" in out.stdout
  assert "fits" in out.stdout.lower() and "mfu" in out.stdout.lower(), out.stdout[-2000:]
