"""torch -> Orbax -> torch: bit-exact round trips, layouts, errors that name tensors, config.json, stage-1 init."""
import dataclasses
import json
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file

from qwenvl_jax import checkpoint, errors, sharding
from qwenvl_jax.checkpoint import conversion, model_card, orbax_store, tensor_io
from qwenvl_jax.model import qwen_vl_7b, tiny

from .conftest import openclip_shapes, qwen_llm_shapes, random_state_dict, write_checkpoint

SMALL_BLOCK = 4096  # forces the row-band path for the embedding and lm_head of the tiny model


def _np(t: torch.Tensor) -> np.ndarray:
  return tensor_io.torch_to_numpy(t)


def _load_export(directory) -> dict:
  index = json.loads((directory / "model.safetensors.index.json").read_text())
  out = {}
  for f in sorted(set(index["weight_map"].values())):
    out.update(load_file(str(directory / f)))
  assert set(out) == set(index["weight_map"])
  return out


def _assert_same_bits(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
    assert torch.equal(a[name].view(torch.uint8) if a[name].dim() else a[name], b[name].view(torch.uint8)
                       if b[name].dim() else b[name]), name


@pytest.mark.parametrize("fmt,dtype", [("safetensors", torch.bfloat16), ("bin", torch.bfloat16),
                                       ("safetensors", torch.float32), ("bin", torch.float32)])
def test_round_trip_is_bit_exact(tmp_path, qwenvl_checkpoint, fmt, dtype):
  cfg = tiny()
  src, state = qwenvl_checkpoint(cfg, fmt=fmt, dtype=dtype)
  checkpoint.torch_to_orbax(src, tmp_path / "orbax", cfg, block_bytes=SMALL_BLOCK)
  reader = orbax_store.ParamReader(tmp_path / "orbax")
  assert {d for _, d in reader.shapes.values()} == {np.dtype(tensor_io.torch_to_numpy(state["lm_head.weight"]).dtype)}
  checkpoint.orbax_to_torch(tmp_path / "orbax", tmp_path / "export", cfg, dtype="keep", max_shard_bytes=100_000,
                            block_bytes=SMALL_BLOCK)
  exported = _load_export(tmp_path / "export")
  _assert_same_bits(exported, state)
  assert len(set(json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
                 ["weight_map"].values())) > 1


def test_orbax_layout_matches_the_spec(tmp_path, qwenvl_checkpoint):
  """Spot checks written from SPEC §5.1, independent of the mapping table."""
  cfg = tiny()
  src, state = qwenvl_checkpoint(cfg, fmt="safetensors", dtype=torch.float32, index=False)
  checkpoint.torch_to_orbax(src, tmp_path / "orbax", cfg, block_bytes=SMALL_BLOCK)
  r = orbax_store.ParamReader(tmp_path / "orbax")
  v, llm, d = cfg.vision, cfg.llm, cfg.llm.width
  sd = {k: _np(t) for k, t in state.items()}
  vis = "transformer.visual."
  np.testing.assert_array_equal(r.read("visual.conv1"), sd[vis + "conv1.weight"].transpose(2, 3, 1, 0))
  w_in = sd[vis + "transformer.resblocks.1.attn.in_proj.weight"]  # head-interleaved rows
  np.testing.assert_array_equal(r.read("visual.blocks.attn.qkv.kernel", (1,)),
                                w_in.reshape(v.heads, 3, v.head_dim, v.width).transpose(3, 0, 1, 2))
  c_attn = sd["transformer.h.1.attn.c_attn.weight"]  # blocked q|k|v
  np.testing.assert_array_equal(r.read("llm.blocks.attn.qkv.kernel", (1,)),
                                c_attn.reshape(3, llm.heads, llm.head_dim, d).transpose(3, 0, 1, 2))
  np.testing.assert_array_equal(r.read("llm.blocks.mlp.w2.kernel", (0,)), sd["transformer.h.0.mlp.w2.weight"].T)
  pool_in = sd[vis + "attn_pool.attn.in_proj_weight"]
  n = cfg.resampler.heads
  np.testing.assert_array_equal(r.read("adapter.resampler.attn.k.kernel"), pool_in[d:2 * d].T.reshape(d, n, d // n))
  np.testing.assert_array_equal(r.read("adapter.proj"), sd[vis + "proj"])  # x @ proj: no transpose
  np.testing.assert_array_equal(r.read("llm.lm_head.kernel"), sd["lm_head.weight"].T)
  np.testing.assert_array_equal(r.read("llm.wte.embedding"), sd["transformer.wte.weight"])


def test_dtype_cast_on_import_and_bf16_export_by_default(tmp_path, qwenvl_checkpoint):
  cfg = tiny()
  src, state = qwenvl_checkpoint(cfg, fmt="safetensors", dtype=torch.float32)
  checkpoint.torch_to_orbax(src, tmp_path / "orbax32", cfg)
  checkpoint.orbax_to_torch(tmp_path / "orbax32", tmp_path / "export", cfg)  # default bfloat16
  exported = _load_export(tmp_path / "export")
  _assert_same_bits(exported, {k: t.to(torch.bfloat16) for k, t in state.items()})
  assert json.loads((tmp_path / "export" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  checkpoint.torch_to_orbax(src, tmp_path / "orbax16", cfg, dtype="bfloat16")
  r = orbax_store.ParamReader(tmp_path / "orbax16")
  assert {d for _, d in r.shapes.values()} == {tensor_io.BF16}


def test_mixed_source_dtypes_are_one_line_naming_dtype(tmp_path, qwenvl_checkpoint):
  """One layer's norm saved in float32 among bfloat16 layers cannot be kept in one scanned parameter: a user error
  that names --dtype (it was a bare ValueError, a traceback from convert); with --dtype it converts."""
  cfg = tiny()
  _, state = qwenvl_checkpoint(cfg)
  state["transformer.h.0.ln_1.weight"] = state["transformer.h.0.ln_1.weight"].float()
  write_checkpoint(tmp_path / "mixed", state, fmt="safetensors", index=False)
  with pytest.raises(errors.ConfigError, match=r"llm\.blocks\.ln_1\.scale have mixed dtypes") as e:
    checkpoint.torch_to_orbax(tmp_path / "mixed", tmp_path / "orbax", cfg)
  assert "--dtype" in e.value.hint and not (tmp_path / "orbax").exists()
  checkpoint.torch_to_orbax(tmp_path / "mixed", tmp_path / "orbax", cfg, dtype="bfloat16")
  assert orbax_store.ParamReader(tmp_path / "orbax").shapes["llm.blocks.ln_1.scale"][1] == tensor_io.BF16


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path, qwenvl_checkpoint):
  cfg = tiny()
  _, state = qwenvl_checkpoint(cfg)
  state.pop("transformer.h.1.mlp.w1.weight")
  state["transformer.h.0.attn.rotary_emb.inv_freq"] = torch.ones(8)  # an explicitly ignored buffer: fine
  state["transformer.visual.class_embedding"] = torch.ones(cfg.vision.width)  # not part of Qwen-VL
  state["transformer.visual.proj"] = torch.ones(3, 3)
  write_checkpoint(tmp_path / "bad", state, fmt="safetensors")
  # A user error (convert prints one line, status 2; it was a traceback, status 1), with the likely fix.
  with pytest.raises(errors.ConfigError) as e:
    checkpoint.torch_to_orbax(tmp_path / "bad", tmp_path / "orbax", cfg)
  assert "name its preset" in e.value.hint
  msg = str(e.value)
  assert "transformer.h.1.mlp.w1.weight" in msg and "transformer.visual.class_embedding" in msg
  assert "transformer.visual.proj (3, 3)" in msg and "inv_freq" not in msg
  assert not (tmp_path / "orbax").exists()


def test_a_source_without_lm_head_says_tied_embeddings_not_another_model(tmp_path, qwenvl_checkpoint):
  """A model saved with its output layer tied to the embedding stores `transformer.wte.weight` once: the error said
  'missing (1): lm_head.weight' and hinted at another preset. It names the tie (or a cut download) and the fix."""
  cfg = tiny()
  _, state = qwenvl_checkpoint(cfg)
  state.pop("lm_head.weight")
  write_checkpoint(tmp_path / "tied", state, fmt="safetensors", index=False)
  with pytest.raises(errors.ConfigError, match="every tensor of the model except the output layer lm_head") as e:
    checkpoint.torch_to_orbax(tmp_path / "tied", tmp_path / "orbax", cfg)
  assert "fetch it again" in e.value.hint and "copy of transformer.wte.weight as lm_head.weight" in e.value.hint
  (tmp_path / "tied" / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
  with pytest.raises(errors.ConfigError, match=r"config\.json ties the output layer to the token embedding") as e:
    checkpoint.torch_to_orbax(tmp_path / "tied", tmp_path / "orbax", cfg)
  assert e.value.hint.startswith("save a copy of transformer.wte.weight as lm_head.weight")
  assert not (tmp_path / "orbax").exists()


def test_a_source_already_in_our_format_says_so(tmp_path, qwenvl_checkpoint):
  """A params checkpoint, a training run (a LoRA run given to torch_to_orbax) or one of its steps: 'holds no
  PyTorch checkpoint: looked for model.safetensors.index.json, ...' named only file names."""
  cfg = tiny()
  src, _ = qwenvl_checkpoint(cfg)
  checkpoint.torch_to_orbax(src, tmp_path / "orbax", cfg)
  with pytest.raises(errors.ConfigError, match="is a params checkpoint, already in this library's format") as e:
    checkpoint.torch_to_orbax(tmp_path / "orbax", tmp_path / "again", cfg)
  assert "--mode=orbax_to_torch" in e.value.hint
  run = tmp_path / "run"
  (run / "checkpoints" / "4").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  for folder in (run, run / "checkpoints" / "4"):
    with pytest.raises(errors.ConfigError, match="is a training run .*not a PyTorch checkpoint") as e:
      checkpoint.init_from_pretrained(tmp_path / "again", cfg, openclip=folder, qwen7b=src)
    assert "--mode=merge_lora" in e.value.hint
  with pytest.raises(FileNotFoundError, match="holds no PyTorch checkpoint"):  # anything else: as before
    checkpoint.torch_to_orbax(tmp_path, tmp_path / "again", cfg)
  assert not (tmp_path / "again").exists()


def test_wrong_model_config_is_an_error(tmp_path, qwenvl_checkpoint):
  src, _ = qwenvl_checkpoint(tiny())
  cfg = tiny()
  n = cfg.llm.layers
  deeper = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, layers=n + 1))
  with pytest.raises(ValueError, match=rf"missing \(8\): transformer\.h\.{n}\.ln_1\.weight"):
    checkpoint.torch_to_orbax(src, tmp_path / "orbax", deeper)
  shallower = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, layers=n - 1))
  with pytest.raises(ValueError, match=rf"unexpected \(8\): transformer\.h\.{n - 1}\.attn"):
    checkpoint.torch_to_orbax(src, tmp_path / "orbax", shallower)


def test_outputs_are_never_overwritten(tmp_path, qwenvl_checkpoint):
  cfg = tiny()
  src, _ = qwenvl_checkpoint(cfg)
  (tmp_path / "taken").mkdir()
  with pytest.raises(FileExistsError):
    checkpoint.torch_to_orbax(src, tmp_path / "taken", cfg)
  checkpoint.torch_to_orbax(src, tmp_path / "orbax", cfg)
  with pytest.raises(FileExistsError):
    checkpoint.orbax_to_torch(tmp_path / "orbax", tmp_path / "taken", cfg)
  assert list((tmp_path / "taken").iterdir()) == []
  # An export inside the params checkpoint wrote a folder into it (quantize's --dst is checked the same way).
  with pytest.raises(errors.ConfigError, match="is inside the params checkpoint"):
    checkpoint.orbax_to_torch(tmp_path / "orbax", tmp_path / "orbax" / "export", cfg)
  assert not (tmp_path / "orbax" / "export").exists() and not (tmp_path / "orbax" / "export.partial").exists()
  # An import inside the Hugging Face folder it reads wrote the params checkpoint into the user's download (which
  # is then uploaded or hashed with it); next to a single-file source is fine.
  with pytest.raises(errors.ConfigError, match=rf"--dst={src / 'jax'} is inside the Hugging Face folder --src={src},"):
    checkpoint.torch_to_orbax(src, src / "jax", cfg)
  assert not (src / "jax").exists()
  single, _ = qwenvl_checkpoint(cfg, index=False, name="single")
  checkpoint.torch_to_orbax(single / "model.safetensors", single / "jax", cfg)


def test_an_export_that_fails_midway_leaves_nothing_and_can_be_retried(tmp_path, qwenvl_checkpoint):
  """A params checkpoint with a damaged data file fails after some shards are written: `export.partial` was left
  behind and refused the next try ("exists")."""
  cfg = tiny()
  src, _ = qwenvl_checkpoint(cfg)
  checkpoint.torch_to_orbax(src, tmp_path / "orbax", cfg)
  shutil.copytree(tmp_path / "orbax", tmp_path / "damaged")
  biggest = max((tmp_path / "damaged").rglob("d/*"), key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:100])
  with pytest.raises(errors.InputFormatError, match="damaged or incomplete"):
    checkpoint.orbax_to_torch(tmp_path / "damaged", tmp_path / "export", cfg, max_shard_bytes=20_000)
  assert not (tmp_path / "export").exists() and not (tmp_path / "export.partial").exists()
  checkpoint.orbax_to_torch(tmp_path / "orbax", tmp_path / "export", cfg, max_shard_bytes=20_000)
  assert len(list((tmp_path / "export").glob("*.safetensors"))) > 1


@pytest.mark.parametrize("appeared", ["empty folder", "folder", "file"])
def test_an_output_that_appears_during_the_export_is_kept(tmp_path, qwenvl_checkpoint, monkeypatch, appeared):
  """`--dst` created by someone else while the shards were written: the final rename replaced an empty folder
  silently and failed with an OSError traceback on any other; now theirs is kept and the finished export waits in
  `dst.partial`."""
  cfg = tiny()
  src, _ = qwenvl_checkpoint(cfg)
  checkpoint.torch_to_orbax(src, tmp_path / "orbax", cfg)
  dst = tmp_path / "export"
  write = tensor_io.write_safetensors_shards

  def write_then_someone_creates_dst(*args, **kwargs):
    index = write(*args, **kwargs)
    if appeared == "file":
      dst.write_text("theirs")
    else:
      dst.mkdir()
      if appeared == "folder":
        (dst / "theirs.txt").write_text("theirs")
    return index

  monkeypatch.setattr(conversion.tensor_io, "write_safetensors_shards", write_then_someone_creates_dst)
  with pytest.raises(errors.UserFileExistsError, match=r"appeared while the export was written; the complete export "
                     r"is in .*export\.partial"):
    checkpoint.orbax_to_torch(tmp_path / "orbax", dst, cfg)
  assert (dst.read_text() == "theirs" if appeared == "file" else
          [p.name for p in dst.iterdir()] == ([] if appeared == "empty folder" else ["theirs.txt"]))
  assert (tmp_path / "export.partial" / "model.safetensors.index.json").is_file()


def test_a_quantized_checkpoint_is_neither_exported_nor_quantized_again(tmp_path):
  """`--mode=orbax_to_torch` of an int8 checkpoint said "the weights are another model's: name its preset" (its
  qvalue/scale leaves do not match), and `--mode=quantize` of one was a ValueError traceback: both are one line
  that says it is quantized and names the float checkpoint it came from."""
  from qwenvl_jax.inference import loading, quantized  # pylint: disable=import-outside-toplevel
  q = tmp_path / "int8"
  orbax_store.save_params(q, {"llm": {"ln_f": {"scale": np.ones(4, np.float32)}}}, custom_metadata={
      "quantization": {"mode": "int8", "group_size": 128}, "sources": {"params": "/ckpt/float_params"}})
  with pytest.raises(errors.ConfigError, match=r"is quantized \(int8\)") as e:
    checkpoint.orbax_to_torch(q, tmp_path / "export", tiny())
  assert "/ckpt/float_params" in e.value.hint and not (tmp_path / "export").exists()
  with pytest.raises(errors.ConfigError, match="already quantized"):
    quantized.quantize_checkpoint_on_load(str(q), tiny(), None, *loading.inference_mesh())


def test_export_copies_reference_code_but_not_weights(tmp_path, qwenvl_checkpoint):
  cfg = tiny()
  src, _ = qwenvl_checkpoint(cfg, fmt="bin")
  for name in ("modeling_qwen.py", "qwen.tiktoken", "generation_config.json", "config.json"):
    (src / name).write_text("reference " + name)
  checkpoint.torch_to_orbax(src, tmp_path / "orbax", cfg)
  checkpoint.orbax_to_torch(tmp_path / "orbax", tmp_path / "export", cfg, reference_files=src)
  files = {f.name for f in (tmp_path / "export").iterdir()}
  assert {"modeling_qwen.py", "qwen.tiktoken", "generation_config.json", "config.json"} <= files
  assert not any(f.endswith(".bin") or f == "pytorch_model.bin.index.json" for f in files)
  assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "qwen"


def test_export_keeps_the_sources_qwen_vocabulary_and_names_what_it_lacks(tmp_path, qwenvl_checkpoint, monkeypatch):
  """Without --reference_files an export had no tokenizer file at all; it now copies the source's own Qwen
  vocabulary (a run's or a params checkpoint's copy), and `missing_reference_files` names what transformers still
  needs. A --reference_files folder that does not exist is refused before any shard is written."""
  cfg = tiny()
  src, _ = qwenvl_checkpoint(cfg, fmt="bin")
  (src / "qwen.tiktoken").write_bytes(b"IQ== 0\n")
  checkpoint.torch_to_orbax(src, tmp_path / "orbax", cfg)
  kept = model_card.recorded_tokenizer(str(tmp_path / "orbax"), model_card.recorded_model(str(tmp_path / "orbax")))
  checkpoint.orbax_to_torch(tmp_path / "orbax", tmp_path / "export", cfg, tokenizer=kept)
  assert (tmp_path / "export" / "qwen.tiktoken").read_bytes() == b"IQ== 0\n"
  assert checkpoint.missing_reference_files(tmp_path / "export") == [
      "configuration_qwen.py", "modeling_qwen.py", "visual.py", "qwen_generation_utils.py", "tokenization_qwen.py",
      "tokenizer_config.json", "generation_config.json"]
  sentencepiece = f"sentencepiece:{src / 'qwen.tiktoken'}"
  checkpoint.orbax_to_torch(tmp_path / "orbax", tmp_path / "sp", cfg, tokenizer=sentencepiece)
  assert "qwen.tiktoken" in checkpoint.missing_reference_files(tmp_path / "sp")  # of no use to the reference
  # convert --tokenizer for an export (it was refused): a Qwen vocabulary, which the reference's code can read.
  checkpoint.check_export_tokenizer(str(src / "qwen.tiktoken"))
  with pytest.raises(errors.ConfigError, match=r"is a SentencePiece model, which the reference's tokenizer code "
                                               r"\(tokenization_qwen.py\) cannot read"):
    checkpoint.check_export_tokenizer(sentencepiece)
  with pytest.raises(FileNotFoundError, match="nowhere.tiktoken"):
    checkpoint.check_export_tokenizer(str(tmp_path / "nowhere.tiktoken"))
  # No chat format recorded: no generation_config.json (a guess would give model.chat the wrong prompt format).
  assert checkpoint.generation_config_note(tmp_path / "sp", None, src="P").endswith(
      "as P records no chat format: export again with --chat_format=chatml (a chat model) or --chat_format=raw (a "
      "base model)")
  def written(*args, **kwargs):
    raise AssertionError("shards written before the reference folder was checked")
  monkeypatch.setattr(tensor_io, "write_safetensors_shards", written)
  with pytest.raises(FileNotFoundError, match="reference directory .*nowhere does not exist"):
    checkpoint.orbax_to_torch(tmp_path / "orbax", tmp_path / "x", cfg, reference_files=tmp_path / "nowhere")
  assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_export_writes_the_generation_config_of_its_chat_format(tmp_path, qwenvl_checkpoint):
  """An export had no generation_config.json, which the reference's model.chat reads (chat format, history window,
  eos / pad ids, sampling): it now writes Qwen-VL-Chat's (chatml) or the base model's (raw), for the chat format
  the weights were trained in. One that --reference_files brings is kept, but says the weights' chat format."""
  from transformers import GenerationConfig  # pylint: disable=import-outside-toplevel
  cfg = tiny()
  src, _ = qwenvl_checkpoint(cfg)
  checkpoint.torch_to_orbax(src, tmp_path / "orbax", cfg)
  released = {"do_sample": True, "eos_token_id": 151643, "max_new_tokens": 512, "max_window_size": 6144,
              "pad_token_id": 151643, "top_k": 0, "top_p": 0.3}  # QWENVL_SPEC §4.5
  for chat_format in ("chatml", "raw"):
    checkpoint.orbax_to_torch(tmp_path / "orbax", tmp_path / chat_format, cfg, chat_format=chat_format)
    read = GenerationConfig.from_pretrained(tmp_path / chat_format)
    assert {k: getattr(read, k) for k in released} == released and read.chat_format == chat_format
    assert checkpoint.generation_config_note(tmp_path / chat_format, chat_format, src="P") is None
  assert len((tmp_path / "chatml" / "generation_config.json").read_bytes()) == 221  # as the released file
  (tmp_path / "ref").mkdir()
  theirs = json.dumps({**released, "chat_format": "chatml", "top_p": 0.5})  # Qwen-VL-Chat-Int4's
  (tmp_path / "ref" / "generation_config.json").write_text(theirs)
  checkpoint.orbax_to_torch(tmp_path / "orbax", tmp_path / "kept", cfg, chat_format="chatml",
                            reference_files=tmp_path / "ref")
  assert (tmp_path / "kept" / "generation_config.json").read_text() == theirs
  assert checkpoint.generation_config_note(tmp_path / "kept", "chatml", src="P", reference_files=tmp_path / "ref") \
      is None
  # A base model exported with Qwen-VL-Chat's files (the README's example) got model.chat's ChatML prompts.
  checkpoint.orbax_to_torch(tmp_path / "orbax", tmp_path / "base", cfg, chat_format="raw",
                            reference_files=tmp_path / "ref")
  read = GenerationConfig.from_pretrained(tmp_path / "base")
  assert (read.chat_format, read.top_p) == ("raw", 0.5)
  assert (tmp_path / "ref" / "generation_config.json").read_text() == theirs  # the user's own file is unchanged
  assert checkpoint.generation_config_note(tmp_path / "base", "raw", src="P", reference_files=tmp_path / "ref") == (
      f"the generation_config.json of --reference_files={tmp_path / 'ref'} says chat_format 'chatml'; the export's "
      "copy says 'raw', as P records (the rest is theirs)")


def test_config_json_of_the_7b_preset_matches_the_released_one():
  c = conversion.hf_config(qwen_vl_7b())
  want = {"vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
          "kv_channels": 128, "intermediate_size": 22016, "layer_norm_epsilon": 1e-6, "rotary_pct": 1.0,
          "rotary_emb_base": 10000, "seq_length": 2048, "max_position_embeddings": 8192, "use_dynamic_ntk": True,
          "use_logn_attn": True, "use_flash_attn": False, "no_bias": True, "tie_word_embeddings": False,
          "torch_dtype": "bfloat16"}
  assert {k: c[k] for k in want} == want
  assert c["visual"] == {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48,
                         "mlp_ratio": 4.9231, "output_dim": 4096, "patch_size": 14, "width": 1664}


def test_init_from_openclip_and_qwen7b(tmp_path):
  cfg = tiny()
  clip = random_state_dict(openclip_shapes(cfg), torch.float32, seed=1)
  llm = random_state_dict(qwen_llm_shapes(cfg), torch.bfloat16, seed=2)
  torch.save(clip, tmp_path / "open_clip_pytorch_model.bin")
  write_checkpoint(tmp_path / "qwen7b", llm, fmt="safetensors")
  (tmp_path / "qwen7b" / "generation_config.json").write_text(json.dumps({"chat_format": "raw"}))
  (tmp_path / "qwen7b" / "qwen.tiktoken").write_bytes(b"IQ== 0\n")
  checkpoint.init_from_pretrained(tmp_path / "init", cfg, openclip=tmp_path / "open_clip_pytorch_model.bin",
                                  qwen7b=tmp_path / "qwen7b", seed=3, preset="tiny")
  r = orbax_store.ParamReader(tmp_path / "init")
  orbax_store.check_tree(r.shapes, conversion.model_param_shapes(cfg), "init")
  v = cfg.vision
  np.testing.assert_array_equal(r.read("visual.positional_embedding"),
                                _np(clip["visual.positional_embedding"])[1:])  # class-token row dropped
  blocked = _np(clip["visual.transformer.resblocks.1.attn.in_proj_weight"])  # rows t*W + h*Hv + d
  np.testing.assert_array_equal(r.read("visual.blocks.attn.qkv.kernel", (1,)),
                                blocked.reshape(3, v.heads, v.head_dim, v.width).transpose(3, 1, 0, 2))
  bias = _np(clip["visual.transformer.resblocks.0.attn.in_proj_bias"])
  np.testing.assert_array_equal(r.read("visual.blocks.attn.qkv.bias", (0,)),
                                bias.reshape(3, v.heads, v.head_dim).transpose(1, 0, 2))
  np.testing.assert_array_equal(r.read("llm.blocks.mlp.c_proj.kernel", (1,)),
                                _np(llm["transformer.h.1.mlp.c_proj.weight"]).T)
  assert r.shapes["visual.conv1"][1] == np.float32 and r.shapes["llm.wte.embedding"][1] == tensor_io.BF16
  query = r.read("adapter.resampler.query")  # fresh: truncated normal, std 0.02
  assert 0.005 < query.std() < 0.05 and np.abs(query).max() <= 0.04 + 1e-6
  assert r.custom_metadata["sources"]["adapter"] == "fresh init, seed 3"
  # Qwen-7B's chat format and vocabulary come along (a stage-1 run started from it inherits the vocabulary).
  assert r.custom_metadata["model"] == {"image_size": 224, "preset": "tiny", "chat_format": "raw",
                                        "tokenizer": "qwen:qwen.tiktoken"}
  assert (tmp_path / "init" / "qwen.tiktoken").read_bytes() == b"IQ== 0\n"
  with pytest.raises(errors.ConfigError, match="is inside the Qwen-7B folder --qwen7b="):
    checkpoint.init_from_pretrained(tmp_path / "qwen7b" / "init", cfg, qwen7b=tmp_path / "qwen7b",
                                    openclip=tmp_path / "open_clip_pytorch_model.bin")
  assert not (tmp_path / "qwen7b" / "init").exists()


def test_init_from_pretrained_names_missing_vit_tensors(tmp_path):
  cfg = tiny()
  clip = random_state_dict(openclip_shapes(cfg), torch.float32)
  clip.pop("visual.transformer.resblocks.0.mlp.c_fc.bias")
  torch.save(clip, tmp_path / "clip.bin")
  write_checkpoint(tmp_path / "qwen7b", random_state_dict(qwen_llm_shapes(cfg)), fmt="bin")
  with pytest.raises(ValueError, match=r"visual\.transformer\.resblocks\.0\.mlp\.c_fc\.bias"):
    checkpoint.init_from_pretrained(tmp_path / "init", cfg, openclip=tmp_path / "clip.bin",
                                    qwen7b=tmp_path / "qwen7b")


def test_export_of_a_trainer_style_sharded_checkpoint(tmp_path, qwenvl_checkpoint):
  """Params saved by Orbax itself from sharded float32 jax.Arrays (as the trainer does) export like ours."""
  cfg = tiny()
  src, state = qwenvl_checkpoint(cfg, dtype=torch.float32)
  checkpoint.torch_to_orbax(src, tmp_path / "orbax", cfg)
  mesh = sharding.make_mesh({"fsdp": -1})
  model = checkpoint.load_model(tmp_path / "orbax", cfg, mesh, sharding.load_rules("fsdp"))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert len(params["llm"]["blocks"]["mlp"]["w1"]["kernel"].sharding.device_set) == 8
  with ocp.StandardCheckpointer() as saver:  # async: leaving the block waits for the commit
    saver.save(tmp_path / "trainer_params", params)
  checkpoint.orbax_to_torch(tmp_path / "trainer_params", tmp_path / "export", cfg, dtype="keep")
  _assert_same_bits(_load_export(tmp_path / "export"), state)


def test_a_converted_checkpoint_records_its_chat_format_and_keeps_its_tokenizer(tmp_path, qwenvl_checkpoint):
  """generation_config.json's chat format and a copy of qwen.tiktoken go into the params checkpoint, so generate /
  serve / evaluate load it without --tokenizer or --chat_format, also after it is moved; flags still win."""
  import shutil  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.inference import model_source  # pylint: disable=import-outside-toplevel
  cfg = tiny()
  src, _ = qwenvl_checkpoint(cfg, fmt="bin")
  (src / "generation_config.json").write_text(json.dumps({"chat_format": "raw", "top_p": 0.3}))
  (src / "qwen.tiktoken").write_bytes(b"IQ== 0\nIg== 1\n")
  checkpoint.torch_to_orbax(src, tmp_path / "orbax", cfg, preset="tiny")
  assert orbax_store.ParamReader(tmp_path / "orbax").custom_metadata["model"] == {
      "image_size": 224, "preset": "tiny", "chat_format": "raw", "tokenizer": "qwen:qwen.tiktoken"}
  moved = tmp_path / "elsewhere" / "params"
  shutil.move(tmp_path / "orbax", moved)
  shutil.rmtree(src)  # the source (and its vocabulary) is gone: the checkpoint needs nothing from it
  source = model_source.resolve(str(moved))
  assert (source.preset, source.image_size, source.chat_format) == ("tiny", 224, "raw")
  assert source.tokenizer == f"qwen:{moved / 'qwen.tiktoken'}"
  assert (moved / "qwen.tiktoken").read_bytes() == b"IQ== 0\nIg== 1\n"
  flags_win = model_source.resolve(str(moved), tokenizer="sp.model", chat_format="chatml")
  assert (flags_win.tokenizer, flags_win.chat_format) == ("sp.model", "chatml")


def test_a_source_that_says_nothing_records_nothing(tmp_path, qwenvl_checkpoint):
  """No generation_config.json / qwen.tiktoken (or one that is not JSON, or names another format): nothing is
  recorded and the loaders' defaults and --tokenizer apply, as before."""
  from qwenvl_jax.inference import model_source  # pylint: disable=import-outside-toplevel
  cfg = tiny()
  src, _ = qwenvl_checkpoint(cfg, fmt="bin")
  assert model_card.hf_model_card(src) == (None, None)
  (src / "generation_config.json").write_text("not json")
  assert model_card.hf_model_card(src) == (None, None)
  (src / "generation_config.json").write_text(json.dumps({"chat_format": "alpaca"}))
  assert model_card.hf_model_card(src / "pytorch_model-00001-of-00003.bin") == (None, None)  # a file: its folder
  (src / "generation_config.json").write_text(json.dumps({"chat_format": "chatml"}))
  assert model_card.hf_model_card(src / "pytorch_model-00001-of-00003.bin")[0] == "chatml"
  checkpoint.torch_to_orbax(src, tmp_path / "orbax", cfg)
  source = model_source.resolve(str(tmp_path / "orbax"))
  assert (source.tokenizer, source.chat_format) == (None, "chatml")
  assert sorted(p.name for p in (tmp_path / "orbax").iterdir() if "tiktoken" in p.name) == []


def test_a_bad_recorded_chat_format_or_tokenizer_is_a_user_error(tmp_path):
  from qwenvl_jax import errors  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.inference import model_source  # pylint: disable=import-outside-toplevel
  for i, (model, match) in enumerate([({"chat_format": "alpaca"}, "unknown chat format 'alpaca'"),
                                      ({"tokenizer": "vocab.txt"}, "records a bad tokenizer")]):
    orbax_store.save_params(tmp_path / str(i), {"w": np.zeros(2, np.float32)},
                            custom_metadata={"model": {"image_size": 224, **model}})
    with pytest.raises(errors.ConfigError, match=match):
      model_source.resolve(str(tmp_path / str(i)))
    assert model_source.resolve(str(tmp_path / str(i)), tokenizer="t.model", chat_format="raw").chat_format == "raw"
  # A tokenizer to keep that is not there stops a conversion before it writes anything.
  with pytest.raises(FileNotFoundError, match="nowhere/qwen.tiktoken"):
    model_card.bundled_tokenizer(f"qwen:{tmp_path / 'nowhere' / 'qwen.tiktoken'}")


def test_a_tokenizer_copy_that_fails_removes_the_checkpoint_it_was_to_complete(tmp_path):
  """The checkpoint was already in place when its tokenizer copy failed (here: the file gone since the start): it
  stayed, looking finished, without the tokenizer its metadata names, and a retry was refused ('exists')."""
  dst = tmp_path / "orbax"
  orbax_store.save_params(dst, {"w": np.zeros(3, np.float32)})
  with pytest.raises(FileNotFoundError):
    model_card.copy_tokenizer(f"qwen:{tmp_path / 'gone' / 'qwen.tiktoken'}", dst)
  assert not dst.exists()


def test_a_url_output_still_goes_to_orbax_and_an_export_to_one_is_refused(tmp_path, qwenvl_checkpoint, monkeypatch):
  """Orbax writes gs:// checkpoints, so torch_to_orbax hands it the URL unchanged; the Hugging Face export writes a
  local folder, and pathlib made `gs://bucket/x` the local `gs:/bucket/x`: it is refused before anything is read."""
  cfg = tiny()
  src, _ = qwenvl_checkpoint(cfg, fmt="bin")
  written = []
  monkeypatch.setattr(conversion.orbax_store, "save_params", lambda dst, *args, **kwargs: written.append(str(dst)))
  monkeypatch.chdir(tmp_path)
  checkpoint.torch_to_orbax(src, "gs://bucket/ckpt", cfg)
  assert written == ["gs://bucket/ckpt"]
  with pytest.raises(errors.ConfigError, match=r"output gs://bucket/hf is a URL; this output is written as a local "
                     "folder"):
    checkpoint.orbax_to_torch(tmp_path / "no_such_checkpoint", "gs://bucket/hf", cfg)
  assert not (tmp_path / "gs:").exists()
