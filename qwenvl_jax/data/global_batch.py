"""Host-local numpy batches -> global `jax.Array`s on a mesh (multi-host data parallelism).

Each process yields B_local = B / process_count rows (pipeline.make_train_iterator with its own
`jax.process_index()` shard); `jax.make_array_from_process_local_data` stitches them into one global batch whose
leading axis is sharded over the mesh's batch axes, every other axis replicated. Which mesh axes carry the batch is
the caller's rule (the sharding rules of `configs/`); `('data', 'fsdp')` is the default of the project's meshes.
"""
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = ("data", "fsdp")) -> NamedSharding:
  """The sharding of a batch array: leading axis over those of `batch_axes` the mesh has, the rest replicated."""
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def to_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, batch_axes: Sequence[str] = ("data", "fsdp")
                    ) -> dict[str, jax.Array]:
  """Turns this process's rows into global arrays.

  Args:
    batch: host-local arrays, each [B_local, ...] (DESIGN §4).
    mesh: the training mesh (over all processes' devices).
    batch_axes: mesh axes the batch is split over.

  Returns:
    The same keys as `jax.Array`s of shape [B_local * process_count, ...].

  Raises:
    ValueError: the arrays disagree on B_local, or the global batch does not divide over the batch axes.
  """
  sizes = {k: v.shape[0] for k, v in batch.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"batch arrays disagree on the number of rows: {sizes}")
  sharding = batch_sharding(mesh, batch_axes)
  local_rows = next(iter(sizes.values()))
  global_rows = local_rows * jax.process_count()
  spec = sharding.spec[0]
  shards = int(np.prod([mesh.shape[a] for a in (spec if isinstance(spec, tuple) else (spec,)) if a]))
  if global_rows % shards:
    raise ValueError(f"global batch {global_rows} rows does not divide over {shards} batch shards "
                     f"(mesh axes {spec})")
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (global_rows,) + v.shape[1:])
          for k, v in batch.items()}
