"""Streaming access to PyTorch-format checkpoints: read `*.safetensors` / `pytorch_model*.bin`, write safetensors.

A checkpoint is a directory with a weight index (`model.safetensors.index.json` or `pytorch_model.bin.index.json`
naming the shard of every tensor), or a single file (`model.safetensors`, `pytorch_model.bin`, an OpenCLIP
`open_clip_pytorch_model.bin`, ...). `open_checkpoint` gives a `TensorSource`: names, shapes and dtypes come from
the file headers without touching tensor data, and `read(name, rows)` returns one tensor (or a block of its
leading rows) as a fresh numpy array. Nothing keeps a shard resident, so the memory of a conversion is bounded
by the largest block read, not by the model:

* safetensors are parsed here (the format is an 8-byte header length, a JSON header, raw little-endian data) and
  read with positioned reads into a new buffer: no mmap, so no file pages are left mapped in the process;
* `.bin` shards are opened with `torch.load(mmap=True, weights_only=True)` (zip entries are uncompressed); after a
  tensor is copied out, its pages are dropped from the private mapping with `madvise(MADV_DONTNEED)` so the
  resident set does not grow to the size of the shard.

bfloat16 is numpy's `ml_dtypes.bfloat16` throughout (bit-exact with torch.bfloat16).
`SafetensorsShardWriter` writes tensors one block at a time into `<prefix>-0000k-of-0000n.safetensors` files plus
the `<prefix>.safetensors.index.json` that transformers loads.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap
import os
import pathlib
import struct
import sys
import zipfile
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from qwenvl_jax import errors

BF16 = np.dtype(ml_dtypes.bfloat16)
_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": BF16,
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  shape: tuple[int, ...]
  dtype: np.dtype
  file: pathlib.Path


class TensorSource:
  """Read-only view of the tensors of a PyTorch-format checkpoint (one or many shard files)."""

  def __init__(self, files: Sequence["_ShardFile"], description: str):
    self.description = description
    self._files = list(files)
    self._where: dict[str, _ShardFile] = {}
    for f in self._files:
      for name in f.names():
        if name in self._where:
          raise errors.InputFormatError(f"tensor {name!r} is stored twice: in {self._where[name].path} and {f.path}")
        self._where[name] = f

  def names(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def info(self, name: str) -> TensorInfo:
    f = self._file(name)
    shape, dtype = f.meta(name)
    return TensorInfo(shape, dtype, f.path)

  def read(self, name: str, rows: slice | None = None) -> np.ndarray:
    """The tensor `name` (or `tensor[rows]`, a block of leading rows) as a new C-contiguous numpy array."""
    return self._file(name).read(name, rows)

  def _file(self, name: str) -> "_ShardFile":
    if name not in self._where:
      raise KeyError(f"tensor {name!r} is not in {self.description}")
    return self._where[name]

  def close(self) -> None:
    for f in self._files:
      f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _ShardFile:
  path: pathlib.Path

  def names(self) -> list[str]:
    raise NotImplementedError

  def meta(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
    raise NotImplementedError

  def read(self, name: str, rows: slice | None) -> np.ndarray:
    raise NotImplementedError

  def close(self) -> None:
    pass


def _row_range(shape: tuple[int, ...], rows: slice | None) -> tuple[int, int]:
  n = shape[0] if shape else 1
  if rows is None:
    return 0, n
  start, stop, step = rows.indices(n)
  if step != 1:
    raise ValueError(f"row blocks must be contiguous, got step {step}")
  return start, max(start, stop)


class _SafetensorsFile(_ShardFile):
  """One safetensors file, read with positioned reads (no mmap)."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise errors.InputFormatError(f"{path} is not a safetensors file (shorter than 8 bytes)")
      (n,) = struct.unpack("<Q", raw)
      size = os.path.getsize(path)
      if n > size - 8:
        raise errors.InputFormatError(f"{path} is not a safetensors file (header length {n} > file size {size})")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise errors.InputFormatError(f"{path} is not a safetensors file (its header is not JSON: {e})") from e
    self._data_start = 8 + n
    self._meta: dict[str, tuple[tuple[int, ...], np.dtype, int, int]] = {}
    for name, entry in header.items():
      if name == "__metadata__":
        continue
      if entry["dtype"] not in _ST_DTYPES:
        raise errors.InputFormatError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
      shape, dtype = tuple(int(d) for d in entry["shape"]), _ST_DTYPES[entry["dtype"]]
      begin, end = (int(x) for x in entry["data_offsets"])
      if self._data_start + end > size:
        raise errors.InputFormatError(
            f"{path} is truncated: tensor {name!r} ends at byte {self._data_start + end} of a {size}-byte file",
            hint="download or copy the shard again")
      if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise errors.InputFormatError(f"{path}: tensor {name!r} has inconsistent offsets {begin}..{end} for shape "
                                      f"{shape}")
      self._meta[name] = (shape, dtype, begin, end)
    self._fd = os.open(path, os.O_RDONLY)

  def names(self):
    return list(self._meta)

  def meta(self, name):
    shape, dtype, _, _ = self._meta[name]
    return shape, dtype

  def read(self, name, rows):
    shape, dtype, begin, _ = self._meta[name]
    r0, r1 = _row_range(shape, rows)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
    out = np.empty(((r1 - r0),) + shape[1:] if shape else (), dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    offset, done = self._data_start + begin + r0 * row_bytes, 0
    while done < len(view):
      n = os.preadv(self._fd, [view[done:]], offset + done)
      if n <= 0:
        raise OSError(f"{self.path}: unexpected end of file reading {name!r}")
      done += n
    return out

  def close(self):
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1


_MADV_DONTNEED = 4
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _drop_pages(address: int, nbytes: int) -> None:
  """Releases the resident pages of [address, address + nbytes) of a private read-only file mapping."""
  if _LIBC is None or nbytes <= 0:
    return
  page = mmap.PAGESIZE
  start = -(-address // page) * page
  stop = (address + nbytes) // page * page
  if stop > start:
    _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), _MADV_DONTNEED)


class _TorchBinFile(_ShardFile):
  """One `torch.save` zip file, memory-mapped by torch; tensors are copied out and their pages dropped."""

  def __init__(self, path: pathlib.Path):
    import torch  # pylint: disable=import-outside-toplevel  (only .bin checkpoints need torch)
    self._torch = torch
    self.path = path
    if not zipfile.is_zipfile(path):  # torch's own message would ask to re-save it with a zip serialization
      raise errors.InputFormatError(f"{path} is not a PyTorch checkpoint in torch.save's zip format (its format "
                                    "since PyTorch 1.6, which the released Qwen-VL weights use)",
                                    hint="a pre-1.6 file: load it and torch.save it again with a current PyTorch")
    try:
      state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or non-zip file
      raise errors.InputFormatError(f"{path} could not be read as a PyTorch state dict: "
                                    f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
      state = state["state_dict"]  # some OpenCLIP / Lightning checkpoints wrap the weights
    if not isinstance(state, Mapping):
      raise errors.InputFormatError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    self._state = {}
    for name, t in state.items():
      if not isinstance(t, torch.Tensor):
        raise errors.InputFormatError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
      self._state[name] = t

  def names(self):
    return list(self._state)

  def meta(self, name):
    t = self._state[name]
    return tuple(t.shape), _torch_to_numpy_dtype(self._torch, t.dtype, f"{self.path}: {name!r}")

  def read(self, name, rows):
    t = self._state[name]
    r0, r1 = _row_range(tuple(t.shape), rows)
    block = (t[r0:r1] if t.dim() else t).contiguous()
    out = torch_to_numpy(block, copy=True)
    _drop_pages(block.data_ptr(), block.numel() * block.element_size())
    return out

  def close(self):
    self._state = {}


def _torch_to_numpy_dtype(torch, dtype, where: str) -> np.dtype:
  table = {torch.bfloat16: BF16, torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32),
           torch.float64: np.dtype(np.float64), torch.int64: np.dtype(np.int64), torch.int32: np.dtype(np.int32),
           torch.uint8: np.dtype(np.uint8), torch.int8: np.dtype(np.int8), torch.bool: np.dtype(np.bool_)}
  if dtype not in table:
    raise ValueError(f"{where} has unsupported dtype {dtype}")
  return table[dtype]


def torch_to_numpy(t, copy: bool = True) -> np.ndarray:
  """A torch CPU tensor as numpy with the same bits (bfloat16 -> ml_dtypes.bfloat16)."""
  import torch  # pylint: disable=import-outside-toplevel
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    arr = t.view(torch.int16).numpy().view(BF16)
  else:
    arr = t.numpy()
  return np.array(arr, copy=True) if copy else arr


def _open_file(path: pathlib.Path) -> _ShardFile:
  if path.suffix == ".safetensors":
    return _SafetensorsFile(path)
  return _TorchBinFile(path)


def open_checkpoint(path: str | os.PathLike) -> TensorSource:
  """Opens a PyTorch-format checkpoint: an index + shards directory, a single-file directory, or one file."""
  path = pathlib.Path(path)
  if path.is_file():
    _refuse_one_shard(path)
    return TensorSource([_open_file(path)], str(path))
  if not path.is_dir():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  for index_name in INDEX_FILES:
    index_path = path / index_name
    if index_path.is_file():
      return _open_indexed(index_path)
  for single in SINGLE_FILES:
    if (path / single).is_file():
      return TensorSource([_open_file(path / single)], str(path / single))
  raise FileNotFoundError(f"{path} holds no PyTorch checkpoint: looked for {', '.join(INDEX_FILES + SINGLE_FILES)}")


def _refuse_one_shard(path: pathlib.Path) -> None:
  """A file that its folder's index lists as one of several shards holds only part of the model: read alone, its
  tensors were reported as dozens of "missing" ones of another model."""
  for index_name in INDEX_FILES:
    try:
      weight_map = json.loads((path.parent / index_name).read_text()).get("weight_map") or {}
      shards = set(weight_map.values())
    except (OSError, ValueError, AttributeError, TypeError):  # no readable index there: the file stands alone
      continue
    if path.name in shards and len(shards) > 1:
      raise errors.ConfigError(f"{path} is one of the {len(shards)} shards that {path.parent / index_name} lists",
                               hint=f"pass its folder {path.parent}, which reads them all")


def _open_indexed(index_path: pathlib.Path) -> TensorSource:
  try:
    index = json.loads(index_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.InputFormatError(f"{index_path} is not valid JSON ({e})",
                                  "the index of a sharded checkpoint must be the JSON file transformers wrote") from e
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise errors.InputFormatError(f"{index_path} has no weight_map")
  files = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = index_path.parent / shard
    if not shard_path.is_file():
      raise FileNotFoundError(f"{index_path} names shard {shard}, which is missing")
    files[shard] = _open_file(shard_path)
  source = TensorSource(list(files.values()), str(index_path.parent))
  problems = []
  for name, shard in weight_map.items():
    if name not in files[shard].names():
      problems.append(f"{name!r} is listed in {shard} but not stored there")
  for shard, f in files.items():
    for name in f.names():
      if weight_map.get(name) != shard:
        problems.append(f"{name!r} is stored in {shard} but the index says {weight_map.get(name)}")
  if problems:
    raise errors.InputFormatError(f"{index_path} disagrees with its shards: " + "; ".join(problems[:20]) +
                     (f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""))
  return source


@dataclasses.dataclass(frozen=True)
class TensorPlan:
  """A tensor to write: `blocks()` yields row-major consecutive blocks whose bytes concatenate to the tensor."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  blocks: Callable[[], Iterable[np.ndarray]]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def plan_shards(tensors: Sequence[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
  """Groups tensors in order into shards of at most `max_shard_bytes` (a bigger tensor gets a shard alone)."""
  shards: list[list[TensorPlan]] = [[]]
  size = 0
  for t in tensors:
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  return shards


def write_safetensors_shards(directory: pathlib.Path, tensors: Sequence[TensorPlan], *, max_shard_bytes: int,
                             prefix: str = "model") -> dict:
  """Writes `tensors` as `<prefix>-0000k-of-0000n.safetensors` + `<prefix>.safetensors.index.json`.

  Returns the index dict. Each tensor's blocks are written as they are produced (bounded memory); the byte count
  of every tensor is checked against its declared shape.
  """
  names = [t.name for t in tensors]
  if len(set(names)) != len(names):
    raise ValueError("duplicate tensor names in the export plan")
  shards = plan_shards(tensors, max_shard_bytes)
  n = len(shards)
  weight_map, total = {}, 0
  for k, shard in enumerate(shards, start=1):
    filename = f"{prefix}-{k:05d}-of-{n:05d}.safetensors"
    _write_one_shard(directory / filename, shard)
    for t in shard:
      weight_map[t.name] = filename
      total += t.nbytes
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
  return index


def _write_one_shard(path: pathlib.Path, tensors: Sequence[TensorPlan]) -> None:
  header: dict[str, object] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for t in tensors:
    dtype = np.dtype(t.dtype)
    if dtype not in _ST_NAMES:
      raise ValueError(f"cannot write tensor {t.name!r} of dtype {dtype} to safetensors")
    header[t.name] = {"dtype": _ST_NAMES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the reference writer aligns the data start to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for t in tensors:
      written = 0
      for block in _blocks_of(t):
        f.write(memoryview(block.reshape(-1).view(np.uint8)))
        written += block.nbytes
      if written != t.nbytes:
        raise ValueError(f"tensor {t.name!r}: wrote {written} bytes, expected {t.nbytes} for shape {t.shape}")


def _blocks_of(t: TensorPlan) -> Iterator[np.ndarray]:
  for block in t.blocks():
    block = np.ascontiguousarray(block)
    if block.dtype != np.dtype(t.dtype):
      raise ValueError(f"tensor {t.name!r}: a block has dtype {block.dtype}, expected {np.dtype(t.dtype)}")
    yield block
