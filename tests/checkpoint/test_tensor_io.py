"""Reading safetensors / .bin checkpoints (sharded, single file) and writing safetensors shards, bit-exact."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwenvl_jax import errors
from qwenvl_jax.checkpoint import tensor_io

from .conftest import write_checkpoint


def _state(seed=0):
  g = torch.Generator().manual_seed(seed)
  return {
      "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
      "b.bias": torch.randn(5, generator=g),
      "c.half": torch.randn(3, 2, 2, generator=g).to(torch.float16),
      "d.scalar": torch.tensor(1.5),
  }


def _bits(x: np.ndarray) -> np.ndarray:
  return x.reshape(-1).view(np.uint8)


def _torch_bits(t: torch.Tensor) -> np.ndarray:
  return t.contiguous().reshape(-1).view(torch.uint8).numpy()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("index", [True, False])
def test_reads_every_tensor_bit_exact(tmp_path, fmt, index):
  state = _state()
  write_checkpoint(tmp_path / "ckpt", state, fmt=fmt, shards=2, index=index)
  with tensor_io.open_checkpoint(tmp_path / "ckpt") as source:
    assert sorted(source.names()) == sorted(state)
    for name, t in state.items():
      info = source.info(name)
      assert info.shape == tuple(t.shape)
      got = source.read(name)
      assert got.shape == tuple(t.shape) and got.flags.c_contiguous
      np.testing.assert_array_equal(_bits(got).reshape(-1), _torch_bits(t).reshape(-1), err_msg=name)
    assert source.info("a.weight").dtype == tensor_io.BF16
    block = source.read("a.weight", slice(2, 6))
    np.testing.assert_array_equal(_bits(block).reshape(-1), _torch_bits(state["a.weight"][2:6]).reshape(-1))


def test_opens_a_single_file_path(tmp_path):
  state = _state()
  save_file(state, str(tmp_path / "open_clip_model.safetensors"))
  torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
  for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
    with tensor_io.open_checkpoint(tmp_path / f) as source:
      assert sorted(source.names()) == sorted(state)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_one_shard_of_a_sharded_checkpoint_is_refused_naming_the_folder(tmp_path, fmt):
  """--src=<folder>/model-00001-of-00003.safetensors read that shard alone and reported the other shards' tensors
  as missing, with the hint that the weights were another model's; a lone file beside no index still opens."""
  write_checkpoint(tmp_path / "ck", _state(), fmt=fmt, shards=2)
  shard = sorted((tmp_path / "ck").glob(f"*-00001-of-00002.{'bin' if fmt == 'bin' else fmt}"))[0]
  with pytest.raises(errors.ConfigError, match="is one of the 2 shards that") as e:
    tensor_io.open_checkpoint(shard)
  assert str(tmp_path / "ck") in e.value.hint
  write_checkpoint(tmp_path / "one", _state(), fmt=fmt, index=False)
  with tensor_io.open_checkpoint(next((tmp_path / "one").iterdir())) as source:
    assert sorted(source.names()) == sorted(_state())


def test_bin_with_wrapped_state_dict(tmp_path):
  torch.save({"state_dict": _state(), "epoch": 3}, tmp_path / "x.bin")
  with tensor_io.open_checkpoint(tmp_path / "x.bin") as source:
    assert "a.weight" in source


def test_missing_and_inconsistent_inputs_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tensor_io.open_checkpoint(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
    tensor_io.open_checkpoint(tmp_path / "empty")
  write_checkpoint(tmp_path / "ckpt", _state(), fmt="safetensors", shards=2)
  index_path = tmp_path / "ckpt" / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  a_shard, b_shard = index["weight_map"]["a.weight"], index["weight_map"]["b.bias"]
  assert a_shard != b_shard
  index["weight_map"]["a.weight"] = "model-00009-of-00009.safetensors"
  index_path.write_text(json.dumps(index))
  with pytest.raises(FileNotFoundError, match="model-00009-of-00009.safetensors"):
    tensor_io.open_checkpoint(tmp_path / "ckpt")
  index["weight_map"]["a.weight"] = b_shard  # the index now disagrees with the shards
  index_path.write_text(json.dumps(index))
  with pytest.raises(ValueError, match="a.weight"):
    tensor_io.open_checkpoint(tmp_path / "ckpt")


def test_a_truncated_or_foreign_file_is_a_user_error_naming_it(tmp_path):
  """convert printed a 32-39 line traceback for these ('inconsistent offsets' for a truncated shard, torch's
  request to re-save with zip serialization for a text file)."""
  save_file({k: v.contiguous() for k, v in _state().items()}, str(tmp_path / "x.safetensors"))
  data = (tmp_path / "x.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(data[:-20])
  with pytest.raises(errors.InputFormatError, match=r"cut.safetensors is truncated: tensor '.*' ends at byte "):
    tensor_io.open_checkpoint(tmp_path / "cut.safetensors")
  (tmp_path / "notes.bin").write_text("not a checkpoint")
  with pytest.raises(errors.InputFormatError, match="notes.bin is not a PyTorch checkpoint in torch.save's zip"):
    tensor_io.open_checkpoint(tmp_path / "notes.bin")
  (tmp_path / "text.safetensors").write_bytes((4).to_bytes(8, "little") + b"\xff\xfe{}")
  with pytest.raises(errors.InputFormatError, match="its header is not JSON"):
    tensor_io.open_checkpoint(tmp_path / "text.safetensors")


def test_writer_output_is_read_by_the_safetensors_library(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {f"t{i}": rng.standard_normal((8, 4 + i)).astype(tensor_io.BF16 if i % 2 else np.float32)
            for i in range(5)}

  def plan(name, x):
    return tensor_io.TensorPlan(name, x.shape, x.dtype, lambda: iter(np.split(x, 4)))  # 4 row blocks

  plans = [plan(n, x) for n, x in arrays.items()]
  limit = 2 * max(p.nbytes for p in plans)
  index = tensor_io.write_safetensors_shards(tmp_path, plans, max_shard_bytes=limit)
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  assert index["metadata"]["total_size"] == sum(x.nbytes for x in arrays.values())
  assert json.loads((tmp_path / "model.safetensors.index.json").read_text()) == index
  for f in files:
    assert (tmp_path / f).stat().st_size <= limit + 1024  # data + header
    with safe_open(str(tmp_path / f), framework="pt") as st:
      assert st.metadata() == {"format": "pt"}
      for name in st.keys():
        t = st.get_tensor(name)
        np.testing.assert_array_equal(_torch_bits(t).reshape(-1), _bits(arrays[name]).reshape(-1), err_msg=name)
  with tensor_io.open_checkpoint(tmp_path) as source:  # and by our reader, through the index
    assert sorted(source.names()) == sorted(arrays)


def test_writer_rejects_blocks_that_do_not_add_up(tmp_path):
  x = np.zeros((4, 3), np.float32)
  bad = tensor_io.TensorPlan("x", (4, 3), np.dtype(np.float32), lambda: iter([x[:3]]))
  with pytest.raises(ValueError, match="'x'"):
    tensor_io.write_safetensors_shards(tmp_path, [bad], max_shard_bytes=1 << 20)


def test_a_malformed_index_names_the_file(tmp_path):
  from qwenvl_jax import errors  # pylint: disable=import-outside-toplevel
  (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
  with pytest.raises(errors.InputFormatError, match=r"model\.safetensors\.index\.json is not valid JSON"):
    tensor_io.open_checkpoint(tmp_path)
