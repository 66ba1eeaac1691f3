"""Resumable training checkpoints: an async Orbax `CheckpointManager` over params, optimizer state, data iterator.

Layout of `<workdir>/checkpoints/<step>/`:
  params/      the nested dict of model parameters: a standalone Orbax PyTree checkpoint, the same format as the
               converter's params checkpoints, so `qwenvl_jax.checkpoint.restore_params` reads it (inference,
               evaluation, or starting the next stage)
  opt_state/   the optax state (frozen parameters have none)
  data/        the grain iterator state, one file per process
  meta/        JSON: step, the config fingerprint, wall time

Saving is asynchronous (the arrays are copied off the device, then written in the background while training
continues); the manager keeps the newest N, the loop decides when to save. `save(force=True)` is used for the final and the
SIGTERM checkpoint. Restores go straight into the target shardings, so no host ever holds the whole model.

Paths go through `etils.epath` (as Orbax does), so a `gs://` workdir or `trainer:gs://...` init spec is used as
given; local paths are made absolute. Returned paths are strings.
"""

from __future__ import annotations

import os
import time
from typing import Any

from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

from qwenvl_jax.training import workdir as workdir_lib
from qwenvl_jax.training.step import TrainState

_ITEMS = ("params", "opt_state", "data", "meta")


def _absolute(path: str) -> epath.Path:
  """`path` as an epath: a local path made absolute, a URL (`gs://bucket/dir`) kept as given."""
  return epath.Path(workdir_lib.absolute(path))


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs with shardings for a tree of jax.Arrays or ShapeDtypeStructs (empty nodes kept)."""
  def leaf(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(leaf, tree)


class Checkpointer:
  """Saves and restores `TrainState` + data-iterator state under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    self.directory = os.fspath(_absolute(workdir) / "checkpoints")
    # The loop decides when to save (every N steps, at the end, on a stop request); the manager keeps N.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_iterator, meta: dict, *, force: bool = True) -> bool:
    """Starts an async save of `step`; returns whether one was started."""
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(dict(meta, step=int(step), time=time.time())),
    )
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, target: TrainState, data_iterator) -> TrainState:
    """Restores `step` into the shardings and dtypes of `target` (concrete or abstract) and the iterator in place.

    Raises:
      ValueError: the stored tree does not match the model/optimizer (a different model or stage config).
    """
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(target.params)),
        opt_state=ocp.args.StandardRestore(_abstract(target.opt_state)),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
    )
    try:
      restored = self.manager.restore(step, args=args)
    except (ValueError, KeyError) as e:
      raise ValueError(f"checkpoint {self.directory}/{step} does not match this model and optimizer: {e}") from e
    sharding = getattr(target.step, "sharding", None)
    step_array = jax.device_put(jax.numpy.asarray(step, jax.numpy.int32), sharding)
    return TrainState(step_array, restored["params"], restored["opt_state"])

  def wait(self) -> None:
    """Blocks until every started save is durable on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def resolve_params_checkpoint(spec: str) -> str:
  """The params directory that `config.init` names.

  `trainer:WORKDIR[@STEP]` → `WORKDIR/checkpoints/<STEP or latest>/params` (another stage's run);
  `params:PATH` → PATH (a converted checkpoint from `python -m qwenvl_jax.convert`).
  """
  kind, _, arg = spec.partition(":")
  if not arg:
    raise ValueError(f"config.init={spec!r}: expected 'trainer:WORKDIR[@STEP]' or 'params:PATH'")
  if kind == "params":
    path = _absolute(arg)
    if not path.is_dir():
      raise FileNotFoundError(f"config.init={spec!r}: {arg} is not a directory")
    return os.fspath(path)
  if kind == "trainer":
    workdir, _, step = arg.partition("@")
    directory = _absolute(workdir) / "checkpoints"
    if not directory.is_dir():
      raise FileNotFoundError(f"config.init={spec!r}: no checkpoints under {directory}")
    steps = sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit() and (d / "params").is_dir())
    if not steps:
      raise FileNotFoundError(f"config.init={spec!r}: {directory} holds no finished checkpoint")
    chosen = int(step) if step else steps[-1]
    if chosen not in steps:
      raise FileNotFoundError(f"config.init={spec!r}: no step {chosen} in {directory} (steps: {steps})")
    return os.fspath(directory / str(chosen) / "params")
  raise ValueError(f"config.init={spec!r}: expected 'trainer:WORKDIR[@STEP]' or 'params:PATH'")
