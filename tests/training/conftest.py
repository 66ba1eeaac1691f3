"""Fixtures of the training tests: a persistent compilation cache and one reference training run.

The train step of even the tiny model takes tens of seconds to compile on a 2-core CPU, and several tests compile
the very same step (uninterrupted vs resumed runs, in-process and in subprocesses). A compilation cache shared by
this test directory makes the repeats cheap; it is a pure cache, so results are unaffected.
"""
import jax
import pytest

from qwenvl_jax.training import train
from tests.training.helpers import read_losses, small_config


@pytest.fixture(scope="session")
def compile_cache_dir(tmp_path_factory) -> str:
  """A persistent compilation cache for this test session (also handed to subprocesses via the environment)."""
  path = str(tmp_path_factory.mktemp("jax_compile_cache"))
  previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
              jax.config.jax_persistent_cache_min_entry_size_bytes)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield path
  jax.config.update("jax_compilation_cache_dir", previous[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", previous[2])



@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, compile_cache_dir):
  """(workdir, TrainResult, {step: loss}) of one uninterrupted stage-2 `helpers.SMALL` run (24 steps)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = train(small_config(2, workdir))
  return workdir, result, read_losses(workdir)
