"""The one `distributed` config block and the start-up decision (the real two-process start is exercised by
tests/training/test_train.py and tests/evaluation/test_runner.py). The two-process starts that must be refused run
as a background job from the session's start (tests/background.py, tests/together.py)."""
import pathlib

import pytest

from qwenvl_jax import distributed, errors
from tests import background, together
from tests.training import helpers


def test_default_block_and_bad_mode():
  c = distributed.default_config()
  assert dict(c) == {"initialize": "auto", "coordinator": "", "num_processes": 1, "process_id": 0,
                     "initialization_timeout": 300}
  c.initialize = "maybe"
  # A ConfigError (one line from the CLIs), not a bare ValueError and its traceback.
  with pytest.raises(errors.ConfigError, match="'auto', 'yes' or 'no'"):
    distributed.initialize(c)


@pytest.mark.parametrize("block,message", [
    ({"coordinator": "localhost:1", "num_processes": 2, "process_id": 2}, "0 <= process_id < num_processes"),
    ({"initialize": "no", "initialization_timeout": 0}, "initialization_timeout=0"),  # checked before any start
])
def test_a_bad_block_is_a_config_error(block, message):
  c = distributed.default_config()
  c.update(block)
  with pytest.raises(errors.ConfigError, match=message):
    distributed.initialize(c)


def _refusals(folder):
  """Three two-process starts the trainer must refuse, each a tests/together.py command of a job registered in
  tests/background.py (run from the session's start on the core the other tests leave idle): process 1 never
  started; the two started with different learning rates; a mesh whose tensor axis spans both processes."""
  return [background.Command(together.write_spec(folder / name, processes), helpers.subprocess_env(devices=2))
          for name, processes in (
              ("never_joins", helpers.processes_of_two(folder / "never_joins" / "run",
                                                       **{"distributed.initialization_timeout": 2})[:1]),
              ("different_flags", _with_lr(folder / "different_flags" / "run")),
              ("mesh", helpers.processes_of_two(folder / "mesh" / "run", **{"mesh.ici.fsdp": 1,
                                                                          "mesh.ici.tensor": 4})))]


def _with_lr(workdir) -> list[dict]:
  """Both processes of a run (tests/together.py's spec entries), process i at the i-th learning rate of (3e-3,
  1e-5)."""
  return [{"argv": helpers.process_of_two(workdir, i, "{free_port}", **{"optimizer.lr": lr}),
           "env": helpers.subprocess_env(devices=2), "cwd": helpers.REPO} for i, lr in enumerate((3e-3, 1e-5))]


refusals = background.finished_work(__name__, "refusals", _refusals)


def _refused(refusals, name) -> tuple[dict, list[str], pathlib.Path]:
  folder, procs = refusals
  assert [p.returncode for p in procs] == [0, 0, 0], [p.stderr[-3000:] for p in procs]
  return (*together.read_result(folder / name), folder / name / "run")


@pytest.mark.multiprocess
def test_a_process_that_never_joins_is_one_line_after_the_timeout(refusals):
  """Process 1 is never started: process 0 used to wait JAX's 300 s in silence, then abort from C++ ("Fatal
  Python error: Aborted", status 134, a stack dump blaming "another task")."""
  result, (err,), run = _refused(refusals, "never_joins")
  assert result["codes"] == [2], err[-3000:]
  assert "Fatal Python error" not in err and "Traceback" not in err, err[-3000:]
  assert err.strip().splitlines()[0].startswith(
      "error: process 0 of 2: not every process joined the coordinator localhost:"), err[-3000:]
  # JAX would wait 300 s; a niced process on a loaded machine starts slowly.
  assert "within 2 s" in err and result["seconds"][0] < 200, result
  assert not run.exists()


@pytest.mark.multiprocess
def test_processes_started_with_different_flags_are_refused_on_every_process(refusals):
  """Process 1 got another learning rate: it used to fail its own config check alone (min_lr > lr) while process
  0 waited two minutes for it and died with a traceback; a learning rate both accept trained each process's shard
  of the parameters at its own rate without a word."""
  result, errs, run = _refused(refusals, "different_flags")
  for code, err in zip(result["codes"], errs):
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert "error: the 2 processes were started with different configs: process(es) 1 differ from process 0" in err
  assert "(this is process 1: optimizer.lr: 0.003 on process 0, 1e-05 here)" in errs[1]
  assert not run.exists()


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


@pytest.mark.multiprocess
def test_a_mesh_that_does_not_split_the_batch_by_process_is_refused_before_anything_is_written(refusals):
  """The tensor axis over both processes' devices leaves the batch in one part that both processes hold, while
  each reads only its own half of the rows: it failed at the first batch with JAX's "Invalid host data" traceback
  (setup.check_batch checked only that the batch divides over the data-parallel devices)."""
  result, errs, run = _refused(refusals, "mesh")
  for code, err in zip(result["codes"], errs):
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert "error: mesh {'data': 1, 'fsdp': 1, 'tensor': 4}: the batch is split into 1 part(s) over the mesh axes " \
           "data x fsdp, which does not give each of the 2 processes rows of its own" in err, err[-3000:]
  assert not run.exists()


def test_the_compared_config_leaves_out_what_differs_per_process():
  """Each process's own index, and the coordinator's address, which process 0 may spell localhost:PORT where the
  others name its host (a real mismatch fails at the join)."""
  config = {"distributed": {"coordinator": "localhost:1234", "process_id": 1, "num_processes": 2},
            "optimizer": {"lr": 1e-3}}
  flat = distributed._flat(config)  # pylint: disable=protected-access
  assert flat == {"distributed.num_processes": 2, "optimizer.lr": 1e-3}


class _AgreeingPeer:
  """A coordination-service client whose other process published whatever this one did (the configs agree), or
  with `other` set, that digest."""

  def __init__(self, other=None):
    self.store, self.sets, self.gets, self.other = {}, [], [], other

  def key_value_set(self, key, value):
    self.sets.append(key)
    self.store[key] = value

  def blocking_key_value_get(self, key, timeout_ms):
    del timeout_ms
    self.gets.append(key)
    if self.other is not None and "/digest/1" in key:
      return self.other
    return self.store[key.replace("/digest/1", "/digest/0")]


def test_a_config_every_process_agreed_on_is_not_exchanged_again(monkeypatch):
  """`python -m qwenvl_jax.train` compares the configs before it builds its evaluator, then the trainer compares
  the same config again: that second call exchanged it a second time through the coordination service."""
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  peer = _AgreeingPeer()
  monkeypatch.setattr(distributed, "_agreed", set())  # what earlier tests agreed on is not this test's
  monkeypatch.setattr(distributed, "_checks", [0])
  monkeypatch.setattr(jax_distributed.global_state, "client", peer)
  monkeypatch.setattr(jax_distributed.global_state, "num_processes", 2)
  monkeypatch.setattr(jax_distributed.global_state, "process_id", 0)
  config = distributed.default_config()
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({"distributed": config, "lr": 1e-3})
  distributed.check_same_config(config)
  assert len(peer.sets) == 2 and len(peer.gets) == 2  # its digest and, as process 0, its whole config; both read
  distributed.check_same_config(config)
  # Published (so a process whose config changed alone finds it, instead of waiting), but nothing waited for.
  assert len(peer.sets) == 3 and peer.sets[-1] == "qwenvl_config/1/digest/0" and len(peer.gets) == 2
  config.lr = 2e-3  # another config is compared anew
  distributed.check_same_config(config)
  assert len(peer.sets) == 5 and len(peer.gets) == 4


class _Store:
  """One coordination service's key-value store seen by every simulated process; a key nobody set is the
  runtime's deadline error (a real get would block until the timeout)."""

  def __init__(self):
    self.store = {}

  def key_value_set(self, key, value):
    self.store[key] = value

  def blocking_key_value_get(self, key, timeout_ms):
    if key not in self.store:
      raise RuntimeError(f"DEADLINE_EXCEEDED: {key} after {timeout_ms} ms")
    return self.store[key]


def test_a_process_whose_config_changed_alone_after_an_agreement_fails_at_once(monkeypatch):
  """Both processes agreed on a config; process 1 compares it again (the trainer after the entry point), process 0
  compares one it changed in between. Process 1 skipped without publishing, so process 0 waited out the whole
  timeout and blamed process 1 for not publishing; it now finds process 1's digest and names the difference."""
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  service = _Store()
  monkeypatch.setattr(jax_distributed.global_state, "client", service)
  monkeypatch.setattr(jax_distributed.global_state, "num_processes", 2)
  agreed = ml_collections.ConfigDict({"distributed": distributed.default_config(), "lr": 1e-3})

  def as_process(index, config, state):
    """`check_same_config(config)` run as process `index` with that process's module state."""
    monkeypatch.setattr(jax_distributed.global_state, "process_id", index)
    monkeypatch.setattr(distributed, "_agreed", state["agreed"])
    monkeypatch.setattr(distributed, "_checks", state["checks"])
    distributed.check_same_config(config)

  states = [{"agreed": set(), "checks": [0]}, {"agreed": set(), "checks": [0]}]
  # The first comparison: process 1's digest is there before process 0 reads it (as the blocking get waits for).
  service.key_value_set("qwenvl_config/0/digest/1", _digest(agreed))
  as_process(0, agreed, states[0])
  as_process(1, agreed, states[1])
  assert states[0]["agreed"] == states[1]["agreed"] == {_digest(agreed)}
  as_process(1, agreed, states[1])  # the trainer's call on process 1: agreed, not waited for
  changed = ml_collections.ConfigDict(agreed.to_dict())
  changed.lr = 2e-3
  with pytest.raises(errors.ConfigError, match=r"process\(es\) 1 differ from process 0"):
    as_process(0, changed, states[0])


def _digest(config) -> str:
  import hashlib  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  flat = distributed._flat(json.loads(config.to_json()))  # pylint: disable=protected-access
  return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()
