"""Multi-process start-up shared by the jobs that span hosts (train, evaluate): the one `distributed` config block and
`initialize`, which calls `jax.distributed.initialize()` when the config or the launcher says so.

A bottom-layer module (it imports only JAX, flax's `traverse_util`, ml_collections and `errors`) so that training,
evaluation and inference all start processes the same way without importing one another.
"""

from __future__ import annotations

import os
import sys
import threading

import jax
import ml_collections

from qwenvl_jax import errors

# Environment variables that mean "this process is one of several" for launchers JAX auto-detects.
_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS",
                     "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def default_config() -> ml_collections.ConfigDict:
  """The `distributed` block of every job config (`config.distributed`), with its defaults."""
  c = ml_collections.ConfigDict()
  c.initialize = "auto"    # auto (detect a TPU pod / SLURM / MPI launcher) | yes | no
  c.coordinator = ""       # host:port to start processes by hand (then num_processes, process_id)
  c.num_processes = 1
  c.process_id = 0
  c.initialization_timeout = 300   # seconds for every process to join; then each one says so and exits
  return c


def env_says_multiprocess() -> bool:
  """True when a launcher JAX auto-detects has started this process as one of several."""
  for name in _MULTIPROCESS_ENV:
    value = os.environ.get(name, "")
    if name == "TPU_WORKER_HOSTNAMES":
      if len([h for h in value.split(",") if h]) > 1:
        return True
    elif name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
      if value.isdigit() and int(value) > 1:
        return True
    elif value:
      return True
  return False


def initialize(dist: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize()` when the config or the launcher environment says the run is multi-process.

  `dist` is a `default_config()` block: `coordinator` (+ `num_processes`, `process_id`) names the coordinator
  explicitly (e.g. processes on one machine); `initialize` = 'auto' (detect a TPU pod / SLURM / MPI launcher),
  'yes' or 'no'. Must run before anything touches a JAX backend. A no-op when JAX is already initialized.

  A process that is never started (or a coordinator that is never reached) made JAX wait its 300 s and then abort
  the process from C++ ("Fatal Python error: Aborted", a stack dump that blames "another task"). Here the wait is
  `dist.initialization_timeout` seconds, after which the process prints one `error:` line and exits with status 2.

  Raises:
    errors.ConfigError: a bad `initialize` mode, `process_id` / `num_processes` or timeout.
  """
  mode = dist.initialize
  if mode not in ("auto", "yes", "no"):
    raise errors.ConfigError(f"config.distributed.initialize must be 'auto', 'yes' or 'no', got {mode!r}")
  timeout = dist.get("initialization_timeout", 300)
  if not isinstance(timeout, int) or timeout < 1:
    raise errors.ConfigError(f"config.distributed.initialization_timeout={timeout!r} must be a whole number of "
                             "seconds >= 1")
  if jax.distributed.is_initialized():
    return
  if dist.coordinator:
    if dist.num_processes < 1 or not 0 <= dist.process_id < dist.num_processes:
      raise errors.ConfigError(f"config.distributed: process_id={dist.process_id} and num_processes="
                               f"{dist.num_processes} must satisfy 0 <= process_id < num_processes")
    where = (f"process {dist.process_id} of {dist.num_processes}: not every process joined the coordinator "
             f"{dist.coordinator}")
    kwargs = dict(coordinator_address=dist.coordinator, num_processes=dist.num_processes,
                  process_id=dist.process_id)
  elif mode == "yes" or (mode == "auto" and env_says_multiprocess()):
    where, kwargs = "not every process of the launcher's job joined its coordinator", {}
  else:
    return
  # JAX's own deadline is set past ours, so that the watchdog, not an abort, ends a start that never completes.
  watchdog = threading.Timer(timeout, _give_up, args=(f"{where} within {timeout} s",))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(initialization_timeout=timeout + 30, **kwargs)
  finally:
    watchdog.cancel()


def _give_up(message: str) -> None:
  """Ends the process from the watchdog thread: one line and status 2 (nothing has been written yet)."""
  print(errors.format_user_error(errors.ConfigError(
      message, hint="start every process with the same coordinator and num_processes and its own process_id; "
      "config.distributed.initialization_timeout sets the wait")), file=sys.stderr, flush=True)
  os._exit(errors.USER_ERROR_EXIT_CODE)  # pylint: disable=protected-access  (the main thread is inside JAX's wait)


# Keys that may differ between the processes of one run: each process's own index, and the coordinator's address
# (process 0 may name it localhost:PORT where the others name its host; a real mismatch fails at the join).
_PER_PROCESS_KEYS = ("distributed.process_id", "distributed.coordinator")
_checks = [0]  # how many configs this process has compared (each comparison uses keys of its own)
# Digests every process agreed on: the entry point compares before it builds its evaluator and the trainer again
# with the same config; that second call only publishes this process's digest and waits for no other. A process
# whose config changed in between (on it alone) then finds the others' agreed digests and fails at once, rather
# than waiting out the timeout for processes that did not wait for it.
_agreed: set[str] = set()


def check_same_config(config: ml_collections.ConfigDict) -> None:
  """Refuses, on every process alike, a multi-process run whose processes were started with different configs.

  Different flags on different hosts (a learning rate, a step count, a workdir, a mesh) are a run that hangs in a
  collective, fails on one host only (the others then wait minutes for it) or, worse, trains each host's shard of
  the parameters with other settings without a word. Each process publishes a digest of its config (all but
  `_PER_PROCESS_KEYS`) in JAX's coordination service, process 0 its whole config; every process
  compares them and raises the same error, naming the processes that differ, and each of those its differing keys.
  Needs no device (it runs before the backend starts); a no-op with one process.

  Raises:
    errors.ConfigError: the configs differ, or a process did not publish its own in time.
  """
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top  (no public accessor)
  state = jax_distributed.global_state
  if state.client is None or not state.num_processes or state.num_processes < 2:
    return
  import hashlib  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  me, count = state.process_id, state.num_processes
  mine = _flat(json.loads(config.to_json()))
  text = json.dumps(mine, sort_keys=True)
  digest = hashlib.sha256(text.encode()).hexdigest()
  prefix = f"qwenvl_config/{_checks[0]}"
  _checks[0] += 1
  state.client.key_value_set(f"{prefix}/digest/{me}", digest)
  if digest in _agreed:
    return
  if me == 0:
    state.client.key_value_set(f"{prefix}/config", text)
  timeout_ms = 1000 * int(config.distributed.get("initialization_timeout", 300))
  digests = []
  for i in range(count):
    try:
      digests.append(state.client.blocking_key_value_get(f"{prefix}/digest/{i}", timeout_ms))
    except Exception as e:  # pylint: disable=broad-except  (JAX's runtime error: DEADLINE_EXCEEDED)
      raise errors.ConfigError(
          f"process {i} of {count} did not publish its config within {timeout_ms // 1000} s (did it stop on an "
          f"error of its own? its log says why): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
  differ = [i for i, d in enumerate(digests) if d != digests[0]]
  if not differ:
    _agreed.add(digest)
    return
  detail = ""
  if me in differ:
    first = json.loads(state.client.blocking_key_value_get(f"{prefix}/config", timeout_ms))
    keys = sorted(k for k in set(first) | set(mine) if first.get(k, "<absent>") != mine.get(k, "<absent>"))
    shown = "; ".join(f"{k}: {first.get(k, '<absent>')!r} on process 0, {mine.get(k, '<absent>')!r} here"
                      for k in keys[:5])
    detail = f" (this is process {me}: {shown}{'; ...' if len(keys) > 5 else ''})"
  raise errors.ConfigError(
      f"the {count} processes were started with different configs: process(es) "
      f"{', '.join(map(str, differ))} differ from process 0{detail}",
      hint="start every process with the same --config, --workdir and --config.* flags (only "
           "config.distributed.process_id, and the coordinator's spelling, may differ)")


def _flat(tree: dict) -> dict:
  """{'a.b': leaf} of a nested dict, without the `_PER_PROCESS_KEYS`."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top  (only multi-process runs need it)
  return {k: v for k, v in traverse_util.flatten_dict(tree, sep=".").items() if k not in _PER_PROCESS_KEYS}
