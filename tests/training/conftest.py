"""Fixtures of the training tests: one reference training run (compiled through the session's compilation cache,
tests/conftest.py, so resumed runs and subprocesses reuse its step)."""
import pytest

from qwenvl_jax.training import train
from tests.training.helpers import read_losses, small_config


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, compile_cache_dir):
  """(workdir, TrainResult, {step: loss}) of one uninterrupted stage-2 `helpers.SMALL` run (24 steps)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = train(small_config(2, workdir))
  return workdir, result, read_losses(workdir)
