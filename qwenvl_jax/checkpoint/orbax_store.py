"""The params checkpoint: a standalone Orbax PyTree checkpoint of our parameter tree, written block by block.

Layout (what the trainer's "init from", inference and eval read): one Orbax `PyTreeCheckpointHandler` directory
(`_METADATA`, `_CHECKPOINT_METADATA`, `manifest.ocdbt`, `d/`, OCDBT + zarr) whose tree is the plain nested dict
of the model's `nnx.Param` values, keyed by the NNX attribute path (`{"llm": {"blocks": {"mlp": {"w1":
{"kernel": [L, D, F]}}}}}`, DESIGN §2.2), stored in the source dtype (bf16 for the released weights).
`restore_params(path, abstract_state, shardings)` restores it directly sharded onto any mesh and casts to the
abstract state's dtypes; `ocp.StandardCheckpointer().restore(path, target)` reads it as well.

Why a custom Orbax TypeHandler: Orbax saves a leaf from an array that is whole in host memory, and the largest
stacked parameter (`llm.blocks.mlp.w1.kernel`, 32 x 4096 x 11008 bf16) alone is 2.7 GiB, so assembling each
stacked parameter before saving cannot stay under a 3 GiB peak. `StreamedArray` is a leaf that only describes
the array (shape, dtype, a write block shape) and produces its blocks on demand; its handler opens the same
TensorStore spec Orbax's own numpy handler would (so the result is an ordinary Orbax checkpoint, typed
`np.ndarray` in `_METADATA`) and writes one block at a time, one parameter after another. The zarr chunk shape
is the block shape (one layer of a stacked parameter, a band of rows of an embedding), so a block is encoded and
committed as soon as it is written and never waits in a cache for its neighbours; at most two blocks are alive
(one being written while the next is read and transposed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import glob
import logging
import os
import pathlib
import re
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx
from orbax.checkpoint._src import asyncio_utils
from orbax.checkpoint._src.futures import future as ocp_future
from orbax.checkpoint._src.path import atomicity as ocp_atomicity
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import type_handler_registry
from orbax.checkpoint._src.serialization import type_handlers
from orbax.checkpoint._src.serialization import types as ocp_types

from qwenvl_jax import errors
from qwenvl_jax.tree_paths import flatten

Index = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class StreamedArray:
  """An array that exists only as the blocks `blocks()` yields: (index into the full array, numpy block)."""

  shape: tuple[int, ...]
  dtype: np.dtype
  write_shape: tuple[int, ...]  # block (and zarr chunk) shape; blocks must tile the array on this grid
  blocks: Callable[[], Iterable[tuple[Index, np.ndarray]]]

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def ndim(self) -> int:
    return len(self.shape)


def _start_write(store: ts.TensorStore, index: Index, block: np.ndarray) -> ts.Future:
  """Starts writing `block` at `store[index]`; the future ends once it is written. Blocks are fresh arrays never
  touched again, so TensorStore may keep a reference instead of copying."""
  return store[index].write(block, can_reference_source_data_indefinitely=True)


class _StreamedArrayHandler(type_handlers.NumpyHandler):
  """Writes `StreamedArray` leaves in Orbax's numpy format, one block at a time, one leaf after another."""

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  async def _write_all(self, values, infos, args):
    for value, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      spec = ts_utils.build_array_write_spec(
          info=info, arg=arg, global_shape=value.shape, local_shape=value.write_shape,
          dtype=np.dtype(value.dtype), use_ocdbt=info.is_ocdbt_checkpoint,
          process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint))
      store = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
      pending = None
      try:
        for index, block in value.blocks():
          if block.dtype != np.dtype(value.dtype):
            raise ValueError(f"{info.name}: a block has dtype {block.dtype}, expected {np.dtype(value.dtype)}")
          # One write in flight while the next block is produced: reading/transposing overlaps compression, and
          # memory stays bounded by two blocks.
          write = _start_write(store, index, block)
          if pending is not None:
            await pending
          pending = write
      except BaseException:
        # The write in flight ends before the error leaves: else it went on writing into the temporary folder
        # that `save_params` removes, and made it again.
        if pending is not None:
          with contextlib.suppress(Exception):
            await pending
        raise
      if pending is not None:
        await pending

  async def serialize(self, values, infos, args=None):
    args = args or [ocp_types.SaveArgs()] * len(values)
    ocp_types.check_input_arguments(values, infos, args)
    return [ocp_future.CommitFutureAwaitingContractedSignals(self._write_all(values, infos, args),
                                                              name="streamed_array")]


def _registry():
  return type_handler_registry.create_type_handler_registry(
      (jax.Array, type_handlers.ArrayHandler()),
      (np.ndarray, type_handlers.NumpyHandler()),
      (StreamedArray, _StreamedArrayHandler()),
  )


def _resolve(path: str | os.PathLike) -> epath.Path:
  """Local paths made absolute; URLs (gs://...) kept as given, which pathlib would turn into local paths."""
  text = os.fspath(path)
  return epath.Path(text) if "://" in text else epath.Path(pathlib.Path(text).absolute())


def is_params_dir(path: str | os.PathLike) -> bool:
  """Whether `path` (local or a URL) holds an Orbax PyTree checkpoint: its `_METADATA` file."""
  return (_resolve(path) / "_METADATA").is_file()


def _settled(handler: ocp.PyTreeCheckpointHandler) -> ocp.PyTreeCheckpointHandler:
  """`handler`, whose blocking `save` returns or raises only once every write it started has ended.

  Orbax's own `save` waits on the commit futures one after another and raises at the first that fails, while the
  others (another leaf's TensorStore write, the metadata) still write into the temporary folder; removing that
  folder then races them: `Directory not empty` replaces the real error, or a late write makes the folder again.
  (Measured with `_StreamedArrayHandler`'s own write left in flight, the same race: 13 of 160 failed saves, four
  at a time on 2 cores, left the folder or lost their error.) The first failure is raised; Orbax's threads log
  each. Ctrl-C is not held up: the rest of a long conversion is not waited for. The method is replaced on the
  instance, so the handler stays Orbax's own type, which `_CHECKPOINT_METADATA` records and Orbax's argument
  registry knows (a subclass would have to be registered, and would be named in every checkpoint)."""

  async def save_and_settle(directory, *args, **kwargs):
    futures = await handler.async_save(directory, *args, **kwargs) or []
    failures = []
    for f in futures:
      try:
        f.result()
      except Exception as e:  # pylint: disable=broad-except  (the first is raised below)
        failures.append(e)
    if failures:
      raise failures[0]

  handler.save = lambda directory, *args, **kwargs: asyncio_utils.run_sync(
      save_and_settle(directory, *args, **kwargs))
  return handler


def _leftovers(path: epath.Path, pattern: str, before: set, checkpointer: ocp.Checkpointer,
               error: BaseException) -> list[epath.Path]:
  """What a failed `save_params` to `path` wrote and should remove: its `pattern` temporary folders that were not
  there `before` (Orbax's local mode: a folder renamed to `path` at the end); in Orbax's commit-file mode (GCS),
  `path` itself, unless Orbax refused it for existing (another run's) or it was already marked complete."""
  found = sorted(set(path.parent.glob(pattern)) - before)
  in_place = isinstance(checkpointer.get_temporary_path(path), ocp_atomicity.CommitFileTemporaryPath)
  refused = isinstance(error, ValueError) and "already exists" in str(error)
  if in_place and not refused and path.is_dir() and not (path / ocp_atomicity.COMMIT_SUCCESS_FILE).exists():
    found.append(path)
  return found


def save_params(path: str | os.PathLike, tree: Mapping[str, Any], *, custom_metadata: dict | None = None) -> None:
  """Saves a nested dict of `StreamedArray` / numpy / jax arrays as a params checkpoint at `path` (new dir)."""
  path = _resolve(path)
  if path.exists():
    raise FileExistsError(f"{path} exists; refusing to overwrite it (choose a new output directory)")
  handler = _settled(ocp.PyTreeCheckpointHandler(type_handler_registry=_registry()))
  # A save that fails (a source that does not read back, Ctrl-C) left what it wrote behind, and a retry was refused
  # ("exists"): removed (`_leftovers`), nothing else is.
  pattern = glob.escape(path.name) + ".orbax-checkpoint-tmp*"
  before = set(path.parent.glob(pattern)) if path.parent.exists() else set()
  with ocp.Checkpointer(handler) as checkpointer:
    try:
      checkpointer.save(path, args=ocp.args.PyTreeSave(dict(tree), custom_metadata=custom_metadata))
    except BaseException as e:
      if jax.process_index() == 0 and path.parent.exists():
        for leftover in _leftovers(path, pattern, before, checkpointer, e):
          try:
            leftover.rmtree(missing_ok=True)
          except OSError as cleanup:  # the error that stopped the save is the one to report; this is only logged
            logging.warning("could not remove what the failed save wrote, %s: %s", leftover, cleanup)
      raise


def param_shapes(state: nnx.State) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Dotted path -> (shape, dtype) of every parameter of an (abstract or concrete) NNX state."""
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flatten(nnx.to_pure_dict(state)).items()}


class ParamReader:
  """Reads single parameters (or slices of them) of a params checkpoint without restoring the tree."""

  def __init__(self, path: str | os.PathLike):
    self.path = _resolve(path)
    if not is_params_dir(self.path):
      raise FileNotFoundError(f"{self.path} is not an Orbax PyTree checkpoint (no _METADATA)")
    with _damaged_is_a_user_error(self.path):
      meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.path))
    self._use_zarr3 = bool(meta.use_zarr3)
    self._ocdbt = type_handlers.is_ocdbt_checkpoint(epath.Path(self.path))
    self.custom_metadata = dict(meta.custom_metadata or {})
    self.shapes = {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in flatten(meta.tree).items()}
    self._context = ts_utils.get_ts_context(use_ocdbt=self._ocdbt)
    self._open: dict[str, ts.TensorStore] = {}

  def _store(self, name: str) -> ts.TensorStore:
    if name not in self.shapes:
      raise KeyError(f"parameter {name!r} is not in the checkpoint {self.path}")
    if name not in self._open:
      info = ocp_types.ParamInfo(name=name, parent_dir=epath.Path(self.path), is_ocdbt_checkpoint=self._ocdbt,
                                 use_zarr3=self._use_zarr3, ts_context=self._context)
      spec = ts_utils.build_array_read_spec(info, use_ocdbt=self._ocdbt).json
      self._open[name] = ts.open(spec, open=True, context=self._context).result()
    return self._open[name]

  def read(self, name: str, index: Index = ()) -> np.ndarray:
    """`param[index]` as a numpy array in the stored dtype."""
    with _damaged_is_a_user_error(self.path):
      return np.asarray(self._store(name)[index].read().result())


def check_tree(stored: Mapping[str, tuple[tuple[int, ...], Any]], expected: Mapping[str, tuple[tuple[int, ...], Any]],
               where: str) -> None:
  """Raises a ValueError naming every missing, unexpected or mis-shaped parameter."""
  problems = tree_problems(stored, expected)
  if problems:
    raise errors.ConfigError(f"{where} does not match the model: " + "; ".join(problems),
                             hint="the weights are another model's: name its preset (--model / --preset), "
                                  "or the run directory they come from")


def tree_problems(stored: Mapping[str, tuple[tuple[int, ...], Any]],
                  expected: Mapping[str, tuple[tuple[int, ...], Any]]) -> list[str]:
  """The missing, unexpected and mis-shaped parameters of `stored` against `expected` (dotted path -> (shape,
  dtype)), each kind as one phrase naming its first three; [] when the two match."""
  missing = sorted(set(expected) - set(stored))
  unexpected = sorted(set(stored) - set(expected))
  misshaped = sorted(f"{k}: stored {stored[k][0]}, model {expected[k][0]}"
                     for k in set(stored) & set(expected) if tuple(stored[k][0]) != tuple(expected[k][0]))
  return [f"{kind} ({len(items)}): {items[:3]}" + (f" and {len(items) - 3} more" if len(items) > 3 else "")
          for kind, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]


def restore_params(path: str | os.PathLike, abstract_state: nnx.State, shardings: nnx.State) -> nnx.State:
  """Restores a params checkpoint directly into `shardings`, cast to the dtypes of `abstract_state`.

  Args:
    path: the params checkpoint directory (from `qwenvl_jax.convert` or `save_params`).
    abstract_state: the model's abstract `nnx.State` (`sharding.abstract_model(...)[1]`).
    shardings: NamedShardings of the same structure (`sharding.state_shardings(abstract_state, rules, mesh)`).

  Returns:
    An `nnx.State` like `abstract_state` holding the restored, sharded jax.Arrays.
  """
  path = _resolve(path)
  reader = ParamReader(path)
  check_tree(reader.shapes, param_shapes(abstract_state), f"checkpoint {path}")
  values = nnx.to_pure_dict(abstract_state)
  specs = nnx.to_pure_dict(shardings)
  target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), values, specs)
  restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape,
                                                             dtype=t.dtype), target)
  with _damaged_is_a_user_error(path), ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
  state = jax.tree.map(lambda x: x, abstract_state)
  nnx.replace_by_pure_dict(state, restored)
  return state


_MUTED = [0]  # reports `_mute_dangling_reads` dropped: they stop once the reads left in flight have ended


def _wait_for_dangling_reads(quiet_s: float = 0.3, most_s: float = 5.0) -> None:
  """After a failed restore: waits (0.5 s at least, `most_s` at most) until no read left in flight has ended
  for `quiet_s`, collecting the failed ones, so that the error line is the command's last output."""
  deadline = time.monotonic() + most_s
  time.sleep(0.5)
  seen = -1
  while seen != _MUTED[0] and time.monotonic() < deadline:
    seen = _MUTED[0]
    gc.collect()
    time.sleep(quiet_s)


def _mute_dangling_reads() -> Callable[[], None]:
  """Drops what Python reports of orbax's reads left in flight by a failed restore, until the returned function is
  called (a restore that succeeded; a failed one leaves it on: the reports come up to the interpreter's exit). As
  those reads end they call back into orbax's event loop, closed by then ("Event loop is closed"), and their
  failed coroutines and tasks are collected later; each printed a traceback, hundreds of lines around the one
  error line (measured: a tiny run's checkpoint with truncated files, 22 to 2,500 lines by timing). Every other
  unraisable exception and asyncio log record passes."""
  previous = sys.unraisablehook

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    closed = str(unraisable.exc_value) == "Event loop is closed"
    if not closed and (code is None or "orbax" not in code.co_filename):
      previous(unraisable)
    else:
      _MUTED[0] += 1

  def dangling(record) -> bool:
    # A read's task names orbax, the array index, or only tensorstore's spec (a task wrapping a zarr open).
    message = record.getMessage()
    return not ("never retrieved" in message
                and any(word in message for word in ("orbax", "reading array index", "tensorstore")))

  sys.unraisablehook = hook
  log = logging.getLogger("asyncio")
  log.addFilter(dangling)

  def unmute() -> None:
    if sys.unraisablehook is hook:
      sys.unraisablehook = previous
    log.removeFilter(dangling)

  return unmute


# tensorstore's statuses of a file that is cut short, corrupt or gone; any other failure (permissions, a network
# error, memory, a bug) keeps its own traceback.
_DAMAGE_STATUSES = ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND")


@contextlib.contextmanager
def _damaged_is_a_user_error(path: str):
  """Reads of the params checkpoint `path` inside: a truncated, corrupt or missing file (tensorstore's
  `_DAMAGE_STATUSES`) is one line naming the checkpoint and tensorstore's reason, not orbax's traceback (the
  trainer sets such a step aside instead; `generate`, `serve` and `evaluate` stop)."""
  unmute = _mute_dangling_reads()
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise bare Exceptions)
    reason = _storage_reason(e)
    if isinstance(e, (errors.UserError, OSError)) or not reason.startswith(_DAMAGE_STATUSES):
      unmute()
      raise
    _wait_for_dangling_reads()
    raise errors.InputFormatError(f"checkpoint {path} does not read back, it is damaged or incomplete: {reason}",
                                  hint="convert it again, or use a run's earlier step (RUN/checkpoints/STEP)") from e
  unmute()


def _storage_reason(error: BaseException) -> str:
  """The line of `error` or its causes that says what storage failed (tensorstore's `OUT_OF_RANGE: ...`-style
  status), else the first line of `error`; at most 300 characters."""
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  lines = [line.strip(": ") for e in chain for line in str(e).splitlines() if line.strip(": ")]
  status = next((line for line in lines if re.match(r"[A-Z][A-Z_]{3,}: ", line)), None)
  return (status or (lines[0] if lines else type(chain[0]).__name__))[:300]


def load_model(path: str | os.PathLike, cfg, mesh: jax.sharding.Mesh, rules) -> nnx.Module:
  """A `QwenVL(cfg)` whose parameters are restored from `path`, sharded on `mesh` under the logical `rules`."""
  from qwenvl_jax import sharding  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.model import QwenVL  # pylint: disable=import-outside-toplevel
  graphdef, abstract_state = sharding.abstract_model(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
  shardings = sharding.state_shardings(abstract_state, rules, mesh)
  return nnx.merge(graphdef, restore_params(path, abstract_state, shardings))
