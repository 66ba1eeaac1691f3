"""Resumable training checkpoints: an async Orbax `CheckpointManager` over params, optimizer state, data iterator.

Layout of `<workdir>/checkpoints/<step>/`:
  params/      the nested dict of model parameters: a standalone Orbax PyTree checkpoint, the same format as the
               converter's params checkpoints, so `qwenvl_jax.checkpoint.restore_params` reads it (inference,
               evaluation, or starting the next stage)
  opt_state/   the optax state (frozen parameters have none)
  data/        the grain iterator state, one file per process
  meta/        JSON: step, the config fingerprint, wall time

Saving is asynchronous (the arrays are copied off the device, then written in the background while training continues);
the manager keeps the newest N, the loop decides when to save. `save(force=True)` is used for the final and the SIGTERM
checkpoint. Restores go straight into the target shardings, so no host ever holds the whole model.

Paths go through `etils.epath` (as Orbax does), so a `gs://` workdir or `trainer:gs://...` init spec is used as
given; local paths are made absolute. Returned paths are strings.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from typing import Any, Callable

from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

from qwenvl_jax import errors, tree_paths
from qwenvl_jax.checkpoint import orbax_store, run_layout
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
    self._saving: int | None = None   # the step of the save in flight (or last started)
    self._failed = False
    # Orbax logs each failing background thread's traceback at ERROR (hundreds of lines for one full disk); the
    # failure is raised, once and clearly, by `check_for_errors` / `save` / `wait` instead.
    self._log_filter = _OrbaxErrorFilter()
    logging.getLogger("absl").addFilter(self._log_filter)

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
    try:
      started = self.manager.save(step, args=args, force=force)  # first waits for the previous save
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise bare Exceptions)
      raise self._save_failed(e, self._saving if self._saving is not None else step) from e
    self._saving = step
    return started

  def check_for_errors(self) -> None:
    """Raises `CheckpointSaveError` as soon as a background save has failed (cheap: call it every step)."""
    try:
      self.manager.check_for_errors()
      # orbax 0.12's check_for_errors does not look at the manager's own save-finalize thread, where a failed
      # async write ends up; its exception is re-raised by wait_until_finished, which returns at once for a
      # finished thread.
      finalize = getattr(self.manager, "_finalize_thread", None)
      if finalize is not None and finalize.map(lambda t: t is not None and not t.is_alive() and
                                               t.exception is not None):
        self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e, self._saving) from e

  def _save_failed(self, error: Exception, step: int | None) -> "CheckpointSaveError":
    self._failed = True
    cause = _root_cause(error)
    intact = [s for s in self.all_steps() if s != step]
    kept = (f"the earlier checkpoints (steps {', '.join(map(str, intact))}) are intact" if intact
            else "no earlier checkpoint exists")
    return CheckpointSaveError(
        f"saving checkpoint step {step} to {self.directory} failed: {cause}; {kept}",
        "free space or use a --workdir on another disk, then rerun the same command to resume"
        if _is_disk_full(error) else "rerun the same command to resume from the latest intact checkpoint")

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

  def restore_latest_intact(self, target: TrainState, data_iterator, warn: Callable[[str], None]
                            ) -> tuple[int, TrainState] | None:
    """Restores the newest checkpoint that reads back, setting damaged newer ones aside; None without any.

    A checkpoint that fails to restore (a truncated or missing array file, unreadable metadata) while an older one
    restores is damaged: it is renamed to `<step>.damaged` in the same folder (never deleted: it is the user's,
    and a later save of the same step must not collide with it), and `warn` gets one line naming it.

    Raises:
      the newest checkpoint's own error when no checkpoint restores (a model/optimizer mismatch fails them all).
    """
    steps = sorted(self.all_steps(), reverse=True)
    if steps:
      self._check_process_count(steps[0])
      self._check_params_shapes(steps[0], target.params)
    failures: list[tuple[int, Exception]] = []
    for step in steps:
      try:
        state = self.restore(step, target, data_iterator)
      except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise bare Exceptions)
        failures.append((step, e))
        continue
      for bad, error in failures:
        moved = self._set_aside(bad)
        warn(f"checkpoint {self.directory}/{bad} is damaged ({_first_line(error)}); resuming from step {step} "
             f"instead; the damaged one is kept as {moved}")
      if failures:
        self.manager.reload()
      return step, state
    if failures:
      step, error = failures[0]
      raise errors.UserError(
          f"no checkpoint in {self.directory} restores; the latest, step {step}: {_first_line(error)}",
          "move the checkpoints away to start over, or use another --workdir") from error
    return None

  def _check_process_count(self, step: int) -> None:
    """Raises errors.ConfigError when `step` was saved by another number of processes than this run has: each
    process's data-iterator position is saved on its own (`data/process_<i>-of-<n>.json`). The restore failed with
    "process_0-of-1.json does not exist" and a hint to move the checkpoints away, or, with an older checkpoint of
    this process count (a run resumed on more hosts), set the newer ones aside as damaged and resumed from it."""
    try:
      names = [p.name for p in (epath.Path(self.directory) / str(step) / "data").iterdir()]
    except OSError:
      return  # a damaged checkpoint: restore_latest_intact deals with it
    counts = {int(m.group(1)) for m in map(re.compile(r"process_\d+-of-(\d+)\.json").fullmatch, names) if m}
    if len(counts) != 1 or jax.process_count() in counts:
      return
    saved = counts.pop()
    raise errors.ConfigError(
        f"checkpoint {self.directory}/{step} was saved by {saved} processes and this run has "
        f"{jax.process_count()}: the data pipeline's position is saved per process",
        f"resume it with {saved} processes (hosts, or config.distributed.num_processes={saved}); or start a new "
        f"--workdir from its weights with --config.init=trainer:{os.path.dirname(self.directory)}@{step}")

  def _check_params_shapes(self, step: int, params: Any) -> None:
    """Raises errors.ConfigError when the parameters stored at `step` are not those `params` (this config's
    abstract ones) has: names or shapes differ, as after `--config.resume=force` with another `lora.rank`. The
    restore failed on the first array with a tensorstore message cut mid-word, among ~400 lines of its reads'
    tracebacks. Metadata that does not read back is damage, left to the restore (which falls back past it)."""
    try:
      stored = orbax_store.ParamReader(epath.Path(self.directory) / str(step) / "params").shapes
    except Exception:  # pylint: disable=broad-except  (orbax/tensorstore raise bare Exceptions)
      return
    expected = {k: (tuple(x.shape), x.dtype) for k, x in tree_paths.flatten(params).items()}
    problems = orbax_store.tree_problems(stored, expected)
    if problems:
      raise errors.ConfigError(
          f"checkpoint {self.directory}/{step} holds other parameters than this config builds: "
          + "; ".join(problems),
          "--config.resume=force continues a run with a changed config, but not one that changes the parameters "
          "(model, lora.rank, lora.targets, ...): resume with the run's own config, or train this one in "
          "another --workdir")

  def _set_aside(self, step: int) -> str:
    """Renames `<step>/` to `<step>.damaged[-k]/` (process 0; every process waits for it)."""
    directory = epath.Path(self.directory)
    target = directory / f"{step}.damaged"
    k = 0
    while target.exists():
      k += 1
      target = directory / f"{step}.damaged-{k}"
    if jax.process_index() == 0:
      (directory / str(step)).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"qwenvl_set_aside_{step}")
    return os.fspath(target)

  def wait(self) -> None:
    """Blocks until every started save is durable on disk; raises `CheckpointSaveError` if one failed."""
    self.manager.wait_until_finished()
    self.check_for_errors()

  def close(self) -> None:
    try:
      self.manager.wait_until_finished()
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      if not self._failed:  # a failure already reported is not raised (and logged) a second time
        raise
    finally:
      logging.getLogger("absl").removeFilter(self._log_filter)


class CheckpointSaveError(errors.UserError):
  """A checkpoint could not be written (disk full, no permission, ...); earlier checkpoints are untouched."""


class _OrbaxErrorFilter:
  """Drops orbax's own ERROR records (tracebacks of failed background saves); the trainer reports them once."""

  def filter(self, record) -> bool:
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in (record.pathname or ""))


def _root_cause(error: BaseException) -> str:
  """The innermost OSError of the chain as 'strerror (path)', else the error's first line."""
  seen, e = set(), error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.strerror:
      return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    e = e.__cause__ or e.__context__
  if _is_disk_full(error):  # tensorstore reports a full disk as RESOURCE_EXHAUSTED, without an errno
    return "No space left on device (tensorstore: RESOURCE_EXHAUSTED)"
  return _first_line(error)


def _is_disk_full(error: BaseException) -> bool:
  seen, e = set(), error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "RESOURCE_EXHAUSTED" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200] if text else ''}"


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
    workdir, step = run_layout.split_step(arg)
    if step and not step.isdigit():
      raise ValueError(f"config.init={spec!r}: the step after '@' must be a number (trainer:WORKDIR@STEP)")
    directory = _absolute(workdir) / "checkpoints"
    if not directory.is_dir():
      raise FileNotFoundError(f"config.init={spec!r}: no checkpoints under {directory}")
    steps = run_layout.finished_steps(workdir)
    if not steps:
      raise FileNotFoundError(f"config.init={spec!r}: {directory} holds no finished checkpoint")
    chosen = int(step) if step else steps[-1]
    if chosen not in steps:
      raise FileNotFoundError(f"config.init={spec!r}: no step {chosen} in {directory} (steps: {steps})")
    return os.fspath(directory / str(chosen) / "params")
  raise ValueError(f"config.init={spec!r}: expected 'trainer:WORKDIR[@STEP]' or 'params:PATH'")
