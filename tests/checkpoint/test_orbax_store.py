"""The params checkpoint: streamed saving (block = chunk), sharded restore onto a mesh, mismatch errors."""
import asyncio
import gc
import time
import weakref

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from qwenvl_jax import sharding, tree_paths
from qwenvl_jax.checkpoint import orbax_store
from qwenvl_jax.model import QwenVL, tiny


def _random_params(cfg, dtype, seed=0):
  rng = np.random.default_rng(seed)
  shapes = orbax_store.param_shapes(sharding.abstract_model(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))[1])
  return {k: rng.standard_normal(s).astype(dtype) for k, (s, _) in shapes.items()}


def _streamed(x: np.ndarray, produced: list) -> orbax_store.StreamedArray:
  """A layer-by-layer StreamedArray of x that records which layers it produced, in order."""
  def blocks():
    for i in range(x.shape[0]):
      produced.append(i)
      yield (i,), x[i]
  return orbax_store.StreamedArray(x.shape, x.dtype, (1,) + x.shape[1:], blocks)


def test_streamed_save_writes_one_chunk_per_block_and_restores_bit_exact(tmp_path):
  x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(ml_dtypes.bfloat16)
  y = np.arange(6, dtype=np.float32)
  produced = []
  orbax_store.save_params(tmp_path / "p", {"a": {"w": _streamed(x, produced)}, "b": y})
  assert produced == [0, 1, 2]
  meta = ocp.PyTreeCheckpointHandler().metadata(tmp_path / "p").tree
  assert meta["a"]["w"].storage.chunk_shape == (1, 4, 5)
  reader = orbax_store.ParamReader(tmp_path / "p")
  assert reader.shapes == {"a.w": ((3, 4, 5), np.dtype(ml_dtypes.bfloat16)), "b": ((6,), np.dtype(np.float32))}
  np.testing.assert_array_equal(reader.read("a.w", (1,)).view(np.uint16), x[1].view(np.uint16))
  # A plain Orbax restore (what the trainer's CheckpointManager does for "init from") reads it too.
  restored = ocp.StandardCheckpointer().restore(tmp_path / "p")
  np.testing.assert_array_equal(np.asarray(restored["a"]["w"]).view(np.uint16), x.view(np.uint16))


def test_streamed_save_keeps_at_most_two_blocks_alive(tmp_path):
  """Peak memory is bounded by blocks, not the array: older blocks are released as the save goes on."""
  refs, alive_counts = [], []

  def blocks():
    for i in range(8):
      gc.collect()
      alive_counts.append(sum(r() is not None for r in refs))
      x = np.full((64, 64), i, np.float32)
      refs.append(weakref.ref(x))
      yield (i,), x
      del x

  orbax_store.save_params(tmp_path / "p", {"w": orbax_store.StreamedArray((8, 64, 64), np.dtype(np.float32),
                                                                          (1, 64, 64), blocks)})
  assert len(alive_counts) == 8 and max(alive_counts) <= 2, alive_counts
  np.testing.assert_array_equal(orbax_store.ParamReader(tmp_path / "p").read("w", (5,)), np.full((64, 64), 5.0))


def test_save_refuses_existing_directory(tmp_path):
  (tmp_path / "p").mkdir()
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    orbax_store.save_params(tmp_path / "p", {"b": np.zeros(3, np.float32)})


def _failing_after_one_row(x: np.ndarray) -> orbax_store.StreamedArray:
  """`x` streamed a row at a time, whose source fails after the first row (a shard that does not read back)."""
  def failing():
    yield (0,), x[0]
    raise OSError("the source shard does not read back")
  return orbax_store.StreamedArray(x.shape, x.dtype, (1,) + x.shape[1:], failing)


@pytest.fixture
def commit_file_mode(monkeypatch):
  """Orbax's GCS mode (it writes into the output itself, a commit file at the end) on local folders; yields
  Orbax's atomicity module."""
  from orbax.checkpoint._src.path import atomicity, atomicity_defaults  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(atomicity_defaults, "get_default_temporary_path_class",
                      lambda *args, **kwargs: atomicity.CommitFileTemporaryPath)
  return atomicity


def test_a_save_that_fails_midway_leaves_nothing_and_can_be_retried(tmp_path):
  """A source block that does not read back (a damaged shard, Ctrl-C) stops the save; Orbax's temporary folder
  (`p.orbax-checkpoint-tmp*`) was left beside the output. Other folders there stay."""
  x = np.arange(24, dtype=np.float32).reshape(4, 6)
  (tmp_path / "mine").mkdir()

  with pytest.raises(OSError, match="does not read back"):
    orbax_store.save_params(tmp_path / "p", {"w": _failing_after_one_row(x), "b": np.zeros(3, np.float32)})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
  orbax_store.save_params(tmp_path / "p", {"w": x})
  np.testing.assert_array_equal(orbax_store.ParamReader(tmp_path / "p").read("w"), x)


def test_a_save_that_fails_midway_into_its_final_folder_leaves_nothing(tmp_path, commit_file_mode):
  """On GCS Orbax writes into the output folder itself and marks it complete at the end (a commit file): a failed
  save left an incomplete folder that a retry refused ('exists'). Orbax's GCS mode is used here on a local folder."""
  x = np.arange(24, dtype=np.float32).reshape(4, 6)

  with pytest.raises(OSError, match="does not read back"):
    orbax_store.save_params(tmp_path / "p", {"w": _failing_after_one_row(x)})
  assert list(tmp_path.iterdir()) == []
  orbax_store.save_params(tmp_path / "p", {"w": x})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
  np.testing.assert_array_equal(orbax_store.ParamReader(tmp_path / "p").read("w"), x)


def test_a_failed_save_in_commit_file_mode_keeps_a_folder_it_did_not_write_or_that_is_complete(tmp_path,
                                                                                                  commit_file_mode):
  """Orbax refusing the output because another run made it first, or a failure after Orbax marked it complete
  (a barrier, Ctrl-C): the folder is not this call's to remove."""
  path = orbax_store._resolve(tmp_path / "p")  # pylint: disable=protected-access
  path.mkdir()
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    leftovers = lambda error: orbax_store._leftovers(  # pylint: disable=protected-access
        path, "p.tmp*", set(), checkpointer, error)
    assert leftovers(OSError("the source shard does not read back")) == [path]
    assert leftovers(ValueError(f"Destination {path} already exists.")) == []
    (path / commit_file_mode.COMMIT_SUCCESS_FILE).write_text("done")
    assert leftovers(OSError("a barrier timed out")) == []


def test_a_failed_save_ends_its_write_in_flight_before_it_raises(tmp_path, monkeypatch):
  """The block written while the next is read must end before the error leaves `save_params`: left running, it
  wrote into the temporary folder as that was removed (`Directory not empty` instead of the real error) or made it
  again. A write that takes 0.3 s makes the old order fail every time."""
  real_write, ended = orbax_store._start_write, []

  def slow_write(store, index, block):
    async def write():
      await real_write(store, index, block)
      await asyncio.sleep(0.3)
      ended.append(index)
    return asyncio.ensure_future(write())

  monkeypatch.setattr(orbax_store, "_start_write", slow_write)
  x = np.ones((2, 3), np.float32)

  with pytest.raises(OSError, match="does not read back"):
    orbax_store.save_params(tmp_path / "p", {"w": _failing_after_one_row(x)})
  assert ended == [(0,)]
  assert list(tmp_path.iterdir()) == []


def test_a_failed_save_raises_once_every_write_has_ended(tmp_path):
  """Orbax's handler raised at the first failed commit future while the others still wrote; ours waits for all of
  them and raises the first error."""
  ended = []

  class Failed:
    def result(self):
      raise OSError("the first write failed")

  class Slow:
    def result(self):
      time.sleep(0.3)
      ended.append("slow")

  handler = ocp.PyTreeCheckpointHandler()

  async def async_save(directory, *args, **kwargs):
    return [Failed(), Slow()]

  handler.async_save = async_save
  with pytest.raises(OSError, match="the first write failed"):
    orbax_store._settled(handler).save(tmp_path)  # pylint: disable=protected-access
  assert ended == ["slow"]
  assert type(handler) is ocp.PyTreeCheckpointHandler  # what a checkpoint's metadata names stays Orbax's own


@pytest.mark.parametrize("rules", ["fsdp", "fsdp_tp"])
def test_restore_params_shards_onto_mesh_and_casts(tmp_path, rules):
  cfg = tiny()
  params = _random_params(cfg, ml_dtypes.bfloat16)
  orbax_store.save_params(tmp_path / "p", tree_paths.unflatten(params))
  mesh = sharding.make_mesh({"fsdp": -1, "tensor": 2} if rules == "fsdp_tp" else {"fsdp": -1})
  table = sharding.load_rules(rules)
  graphdef, abstract = sharding.abstract_model(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
  shardings = sharding.state_shardings(abstract, table, mesh)
  state = orbax_store.restore_params(tmp_path / "p", abstract, shardings)
  flat_state = tree_paths.flatten(nnx.to_pure_dict(state))
  flat_shardings = tree_paths.flatten(nnx.to_pure_dict(shardings))
  for name, x in params.items():
    got = flat_state[name]
    assert got.dtype == np.float32, name  # the model's param_dtype
    assert got.sharding.is_equivalent_to(flat_shardings[name], got.ndim), name
    np.testing.assert_array_equal(np.asarray(got), x.astype(np.float32), err_msg=name)
  sharded = [n for n, s in flat_shardings.items() if any(a is not None for a in s.spec)]
  assert "llm.blocks.mlp.w1.kernel" in sharded
  model = nnx.merge(graphdef, state)
  np.testing.assert_array_equal(np.asarray(model.llm.lm_head.kernel[...]),
                                params["llm.lm_head.kernel"].astype(np.float32))


def test_load_model_holds_the_checkpoint_sharded(tmp_path):
  cfg = tiny()
  params = _random_params(cfg, np.float32)
  orbax_store.save_params(tmp_path / "p", tree_paths.unflatten(params))
  model = orbax_store.load_model(tmp_path / "p", cfg, sharding.make_mesh({"fsdp": -1}), sharding.load_rules("fsdp"))
  w1 = model.llm.blocks.mlp.w1.kernel[...]
  assert len(w1.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(w1), params["llm.blocks.mlp.w1.kernel"])
  np.testing.assert_array_equal(np.asarray(model.visual.conv1[...]), params["visual.conv1"])


def test_restore_mismatch_names_the_parameters(tmp_path):
  cfg = tiny()
  params = _random_params(cfg, np.float32)
  params.pop("llm.ln_f.scale")
  params["llm.extra"] = np.zeros(2, np.float32)
  params["visual.conv1"] = np.zeros((2, 2), np.float32)
  orbax_store.save_params(tmp_path / "p", tree_paths.unflatten(params))
  _, abstract = sharding.abstract_model(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
  shardings = sharding.state_shardings(abstract, sharding.load_rules("fsdp"), sharding.make_mesh({"fsdp": -1}))
  with pytest.raises(ValueError) as e:
    orbax_store.restore_params(tmp_path / "p", abstract, shardings)
  msg = str(e.value)
  assert "llm.ln_f.scale" in msg and "llm.extra" in msg and "visual.conv1" in msg
