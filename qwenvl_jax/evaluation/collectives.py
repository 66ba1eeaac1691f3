"""Multi-process collectives of the evaluation job (each a no-op with one process): process 0's JSON on every
process, a global max, a barrier, whole global arrays on every host, JSON lists gathered in process order.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def broadcast_json(obj: Any) -> Any:
  """Process 0's `obj` on every process."""
  if jax.process_count() == 1:
    return obj
  data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  n = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
  buf = np.zeros(n, np.uint8)
  if jax.process_index() == 0:
    buf[:] = data
  buf = multihost_utils.broadcast_one_to_all(buf)
  return json.loads(bytes(np.asarray(buf)).decode("utf-8"))


def global_max(n: int) -> int:
  """The largest `n` of all processes."""
  if jax.process_count() == 1:
    return n
  return int(np.max(multihost_utils.process_allgather(np.int32(n))))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole global array on this host (all rows, from every process)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_json(ids: list) -> list:
  """Every process's list (JSON-serializable items), concatenated in process order (on every process)."""
  if jax.process_count() == 1:
    return ids
  data = np.frombuffer(json.dumps(ids).encode("utf-8"), np.uint8)
  n = global_max(data.size)
  buf = np.full(n, ord(" "), np.uint8)
  buf[:data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(buf))
  out = []
  for row in gathered:
    out.extend(json.loads(bytes(row).decode("utf-8")))
  return out


def local_rows(x: np.ndarray, row_key: np.ndarray, rows: int) -> np.ndarray:
  """This process's `rows` rows of a gathered global batch, in its local order."""
  out = np.empty((rows,) + x.shape[1:], x.dtype)
  for key, row in zip(row_key, x):
    if key // rows == jax.process_index():
      out[key % rows] = row
  return out
