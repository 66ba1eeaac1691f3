"""Tests of host-local -> global batch conversion: 8 fake CPU devices in one process, and two real processes (a
background job from the session's start, tests/background.py)."""
import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from qwenvl_jax import sharding
from qwenvl_jax.data.global_batch import to_global_batch
from tests import background, together
from tests.data import helpers
from tests.training.helpers import subprocess_env

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
RULES = sharding.load_rules("fsdp")


def _mesh(shape, names):
  return jax.make_mesh(shape, names)


def test_global_batch_is_sharded_over_the_batch_axes():
  mesh = _mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  batch = {"input_ids": np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
           "images": np.ones((8, 2, 4, 4, 3), np.uint8), "image_mask": np.ones((8, 2), bool)}
  out = to_global_batch(batch, mesh, RULES)
  for k, v in batch.items():
    assert out[k].shape == v.shape and out[k].dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(out[k]), v)
    assert out[k].sharding.spec == PartitionSpec(("data", "fsdp"))
  # Each batch shard holds 2 rows, replicated over the tensor axis.
  shard_rows = {s.data.shape[0] for s in out["input_ids"].addressable_shards}
  assert shard_rows == {2}


def test_missing_axes_are_ignored_and_errors_are_clear():
  mesh = _mesh((8,), ("data",))
  assert sharding.batch_sharding(mesh, RULES).spec == PartitionSpec(("data",))
  assert sharding.batch_sharding(_mesh((8,), ("tensor",)), RULES).spec == PartitionSpec(None)
  with pytest.raises(ValueError, match="disagree"):
    to_global_batch({"a": np.zeros((8, 1)), "b": np.zeros((4, 1))}, mesh, RULES)
  with pytest.raises(ValueError, match="does not divide"):
    to_global_batch({"a": np.zeros((6, 1))}, mesh, RULES)


def test_batch_axes_come_from_the_rules_act_batch():
  """A table whose `act_batch` names only `data` keeps the batch whole on each fsdp group."""
  mesh = _mesh((2, 4, 1), ("data", "fsdp", "tensor"))
  rules = (("act_batch", "data"),) + RULES
  out = to_global_batch({"a": np.arange(6).reshape(6, 1)}, mesh, rules)
  assert out["a"].sharding.spec == PartitionSpec(("data",))
  assert {s.data.shape[0] for s in out["a"].addressable_shards} == {3}
  assert sharding.batch_shards(mesh, rules) == 2 and sharding.batch_shards(mesh, RULES) == 8


_WORKER = r"""
import json, os, sys
import jax
import numpy as np
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from qwenvl_jax import sharding
from qwenvl_jax.data import default_data_config, make_train_iterator, to_global_batch
from tests.data.helpers import ByteTokenizer
tok = ByteTokenizer()
config = default_data_config(1)
config.update(source="jsonl:" + sys.argv[3], num_workers=0, packing=False, num_epochs=1)
it = make_train_iterator(config, tok, process_index=jax.process_index(), process_count=jax.process_count(),
                         global_batch=4, seq_len=48, max_images=1, image_size=8, stage=1, image_tokens=2)
local = next(it)
batch = to_global_batch(local, jax.make_mesh((4,), ("data",)), sharding.load_rules("fsdp"))
shards = sorted((s.index[0].start, s.data.shape[0]) for s in batch["input_ids"].addressable_shards)
mine = np.concatenate([np.asarray(s.data) for s in sorted(batch["input_ids"].addressable_shards,
                                                          key=lambda s: s.index[0].start)])
print(json.dumps({"shape": list(batch["input_ids"].shape), "images": list(batch["images"].shape),
                  "texts": [tok.decode(r, skip_special_tokens=True) for r in local["input_ids"]],
                  "shards": shards, "local_is_addressable": bool(np.array_equal(mine, local["input_ids"]))}))
jax.distributed.shutdown()
"""


def _two_processes(folder):
  """Both processes as one tests/together.py command of a job registered in tests/background.py (run from the
  session's start on the core the other tests leave idle)."""
  path = helpers.write_image_text_jsonl(folder, 8)
  env = subprocess_env(devices=2)
  processes = [{"argv": [sys.executable, "-c", _WORKER, "localhost:{free_port}", str(i), str(path)], "env": env,
                "cwd": REPO_ROOT} for i in range(2)]
  return [background.Command(together.write_spec(folder / "processes", processes), env)]


two_processes = background.finished_work(__name__, "two_processes", _two_processes)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_build_one_global_batch_from_disjoint_shards(two_processes):
  folder, (run,) = two_processes
  assert run.returncode == 0, run.stderr[-3000:]
  result, errs = together.read_result(folder / "processes")
  assert result["codes"] == [0, 0], [err[-3000:] for err in errs]
  outs = [json.loads((folder / "processes" / f"{i}.stdout").read_text().strip().splitlines()[-1]) for i in range(2)]
  for o in outs:
    assert o["shape"] == [4, 48] and o["images"] == [4, 1, 8, 8, 3]
    # Each process holds 2 of the 4 rows: its own local rows, on its own 2 devices.
    assert o["local_is_addressable"] and len(o["shards"]) == 2 and all(n == 1 for _, n in o["shards"])
  assert not set(outs[0]["texts"]) & set(outs[1]["texts"])
  assert {start for o in outs for start, _ in o["shards"]} == {0, 1, 2, 3}
