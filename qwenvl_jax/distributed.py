"""Multi-process start-up shared by every job (train, evaluate, serve): the one `distributed` config block and
`initialize`, which calls `jax.distributed.initialize()` when the config or the launcher says so.

A bottom-layer module (it imports only JAX and ml_collections) so that training, evaluation and inference all
start processes the same way without importing one another.
"""

from __future__ import annotations

import os

import jax
import ml_collections

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
  """
  mode = dist.initialize
  if mode not in ("auto", "yes", "no"):
    raise ValueError(f"config.distributed.initialize must be 'auto', 'yes' or 'no', got {mode!r}")
  if jax.distributed.is_initialized():
    return
  if dist.coordinator:
    if dist.num_processes < 1 or not 0 <= dist.process_id < dist.num_processes:
      raise ValueError(f"config.distributed: process_id={dist.process_id} and num_processes={dist.num_processes} "
                       "must satisfy 0 <= process_id < num_processes")
    jax.distributed.initialize(coordinator_address=dist.coordinator, num_processes=dist.num_processes,
                               process_id=dist.process_id)
  elif mode == "yes" or (mode == "auto" and env_says_multiprocess()):
    jax.distributed.initialize()
