"""Host-local numpy batches -> global `jax.Array`s on a mesh (multi-host data parallelism).

Each process yields B_local = B / process_count rows (pipeline.make_train_iterator with its own
`jax.process_index()` shard); `jax.make_array_from_process_local_data` stitches them into one global batch whose
leading axis is sharded over the mesh axes the rule table gives the logical axis `act_batch`
(`sharding.batch_sharding`), every other axis replicated.
"""
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from qwenvl_jax import sharding as sharding_lib


def to_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: sharding_lib.Rules
                    ) -> dict[str, jax.Array]:
  """Turns this process's rows into global arrays.

  Args:
    batch: host-local arrays, each [B_local, ...] (DESIGN §4).
    mesh: the training mesh (over all processes' devices).
    rules: the sharding rule table; its `act_batch` rule names the mesh axes the batch is split over.

  Returns:
    The same keys as `jax.Array`s of shape [B_local * process_count, ...].

  Raises:
    ValueError: the arrays disagree on B_local, or the global batch does not divide over the batch axes.
  """
  sizes = {k: v.shape[0] for k, v in batch.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"batch arrays disagree on the number of rows: {sizes}")
  sharding = sharding_lib.batch_sharding(mesh, rules)
  local_rows = next(iter(sizes.values()))
  global_rows = local_rows * jax.process_count()
  shards = sharding_lib.batch_shards(mesh, rules)
  if global_rows % shards:
    raise ValueError(f"global batch {global_rows} rows does not divide over {shards} batch shards "
                     f"(mesh axes {sharding_lib.batch_axes(mesh, rules)})")
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (global_rows,) + v.shape[1:])
          for k, v in batch.items()}
