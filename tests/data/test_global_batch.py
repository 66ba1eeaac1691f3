"""Tests of host-local -> global batch conversion on 8 fake CPU devices (tests/conftest.py)."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from qwenvl_jax.data.global_batch import batch_sharding, to_global_batch


def _mesh(shape, names):
  return jax.make_mesh(shape, names)


def test_global_batch_is_sharded_over_the_batch_axes():
  mesh = _mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  batch = {"input_ids": np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
           "images": np.ones((8, 2, 4, 4, 3), np.uint8), "image_mask": np.ones((8, 2), bool)}
  out = to_global_batch(batch, mesh)
  for k, v in batch.items():
    assert out[k].shape == v.shape and out[k].dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(out[k]), v)
    assert out[k].sharding.spec == PartitionSpec(("data", "fsdp"))
  # Each batch shard holds 2 rows, replicated over the tensor axis.
  shard_rows = {s.data.shape[0] for s in out["input_ids"].addressable_shards}
  assert shard_rows == {2}


def test_missing_axes_are_ignored_and_errors_are_clear():
  mesh = _mesh((8,), ("data",))
  assert batch_sharding(mesh).spec == PartitionSpec(("data",))
  assert batch_sharding(_mesh((8,), ("tensor",))).spec == PartitionSpec(None)
  with pytest.raises(ValueError, match="disagree"):
    to_global_batch({"a": np.zeros((8, 1)), "b": np.zeros((4, 1))}, mesh)
  with pytest.raises(ValueError, match="does not divide"):
    to_global_batch({"a": np.zeros((6, 1))}, mesh)
