"""The one `distributed` config block and the start-up decision (the real two-process start is exercised by
tests/training/test_train.py and tests/evaluation/test_runner.py)."""
import pytest

from qwenvl_jax import distributed


def test_default_block_and_bad_mode():
  c = distributed.default_config()
  assert dict(c) == {"initialize": "auto", "coordinator": "", "num_processes": 1, "process_id": 0}
  c.initialize = "maybe"
  with pytest.raises(ValueError, match="'auto', 'yes' or 'no'"):
    distributed.initialize(c)


@pytest.mark.parametrize("env,expected", [
    ({}, False), ({"SLURM_NTASKS": "1"}, False), ({"SLURM_NTASKS": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "a"}, False), ({"TPU_WORKER_HOSTNAMES": "a,b"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, True)])
def test_launcher_detection(monkeypatch, env, expected):
  for name in distributed._MULTIPROCESS_ENV:  # pylint: disable=protected-access
    monkeypatch.delenv(name, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert distributed.env_says_multiprocess() is expected


def test_auto_mode_without_a_launcher_stays_single_process():
  c = distributed.default_config()
  c.initialize = "no"
  distributed.initialize(c)  # must not try to reach a coordinator
