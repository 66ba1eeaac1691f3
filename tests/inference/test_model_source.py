"""`--checkpoint` as a training run, a run's checkpoints/<step>, or a params directory; and the preset check that
names the differing shapes and the preset that fits."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.checkpoint import save_params
from qwenvl_jax import errors, text as qtext
from qwenvl_jax.inference import loading, model_source
from tests.training import helpers


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model, sp_model_file):
  """A stage-3 run of the tiny preset with two finished checkpoints (steps 3 and 5) and its own tokenizer."""
  run = tmp_path_factory.mktemp("run")
  (run / "config.json").write_text(json.dumps({"stage": 3, "model": "tiny", "res": 224, "tokenizer": ""}))
  shutil.copy(sp_model_file, run / "tokenizer.model")
  params = nnx.to_pure_dict(nnx.state(tiny_model))
  for step in (3, 5):
    save_params(run / "checkpoints" / str(step) / "params", params)
  (run / "checkpoints" / "7").mkdir()  # a save that never finished: no params, not a candidate
  return run


def test_a_run_directory_gives_its_latest_params_preset_tokenizer_and_chat_format(run_dir):
  src = model_source.resolve(str(run_dir))
  assert src.params == str(run_dir / "checkpoints" / "5" / "params") and src.step == 5
  assert (src.preset, src.image_size, src.chat_format) == ("tiny", 224, "chatml")
  assert src.tokenizer == str(run_dir / "tokenizer.model") and src.run_dir == str(run_dir)
  for path in (run_dir / "checkpoints" / "3", run_dir / "checkpoints" / "3" / "params"):
    src = model_source.resolve(str(path))
    assert src.step == 3 and src.params == str(run_dir / "checkpoints" / "3" / "params")
    assert src.preset == "tiny" and src.tokenizer == str(run_dir / "tokenizer.model")
  # Explicit values win; a params directory alone keeps the flags (and the default preset).
  assert model_source.resolve(str(run_dir), chat_format="raw", image_size=112).chat_format == "raw"
  plain = model_source.resolve(str(run_dir / "checkpoints" / "5" / "params" / ".."))
  assert plain.step == 5
  with pytest.raises(FileNotFoundError, match="neither a training run"):
    model_source.resolve(str(run_dir / "checkpoints"))


def test_run_at_step_names_a_step_as_training_and_convert_spell_it(run_dir):
  src = model_source.resolve(f"{run_dir}@3")
  assert src.step == 3 and src.params == str(run_dir / "checkpoints" / "3" / "params") and src.preset == "tiny"
  with pytest.raises(FileNotFoundError, match=r"has no step 4 \(its steps: 3, 5\)"):
    model_source.resolve(f"{run_dir}@4")
  # A step that is no number was "does not exist" (the whole was taken for a path); it is named as the step's fault.
  with pytest.raises(errors.ConfigError, match=r"the step after '@' must be a number"):
    model_source.resolve(f"{run_dir}@latest")


def test_a_steps_optimizer_state_is_named_not_restored(tmp_path):
  """`checkpoints/<step>/opt_state` is an Orbax tree with a _METADATA, so it was taken for a params checkpoint:
  a real one (optax's None leaves) failed with AttributeError 'NoneType' object has no attribute 'shape' from the
  metadata read, in `load` and in `generate` alike."""
  step = tmp_path / "run" / "checkpoints" / "2"
  save_params(step / "opt_state", {"mu": np.zeros(3, np.float32)})
  with pytest.raises(FileNotFoundError, match=r"is the 'opt_state' folder of a training run's step, not its model "
                     r"parameters \(pass the step \(.*/checkpoints/2\) or its params folder"):
    model_source.resolve(str(step / "opt_state"))


def test_a_params_checkpoint_under_a_folder_named_checkpoints_is_no_run_step(tmp_path):
  """`~/checkpoints/2024/qwen_int8` is a user's own params checkpoint, not a sibling of a run step's params."""
  path = tmp_path / "checkpoints" / "2024" / "qwen_int8"
  save_params(path, {"w": np.zeros(3, np.float32)})
  assert model_source.resolve(str(path), model="tiny", tokenizer="t.model").params == str(path)


def test_a_folder_of_pytorch_weights_says_what_to_run(tmp_path):
  """The released weights or a PEFT adapter given to generate / serve / evaluate were 'neither a training run ...
  nor a params checkpoint', with no word of the command that makes one."""
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text("{}")
  (tmp_path / "hf" / "model-00001-of-00002.safetensors").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=rf"PyTorch weights: python -m qwenvl_jax.convert "
                                              rf"--mode=torch_to_orbax --src={tmp_path / 'hf'} --dst=PARAMS"):
    model_source.resolve(str(tmp_path / "hf"))
  (tmp_path / "adapter").mkdir()
  (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
  (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="it is a PEFT adapter for PyTorch, which loads here only merged into "
                                              "its base: for one of our LoRA runs, convert --mode=merge_lora"):
    model_source.resolve(str(tmp_path / "adapter"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"nor a params checkpoint \(no _METADATA\)$"):
    model_source.resolve(str(tmp_path / "empty"))


def test_generate_on_a_damaged_checkpoint_is_one_error_line(run_dir, tmp_path):
  """Orbax's restore of a truncated array file ended in a traceback, and its reads still in flight printed
  hundreds of lines more (`orbax_store._mute_dangling_reads`)."""
  run = tmp_path / "run"
  shutil.copytree(run_dir, run)
  for f in (run / "checkpoints" / "5" / "params").rglob("d/*"):
    if f.is_file():
      with open(f, "r+b") as fh:
        fh.truncate(100)
  proc = subprocess.run([sys.executable, "-m", "qwenvl_jax.generate", f"--checkpoint={run}", "--prompt=Hi",
                         "--dtype=float32", "--max_new_tokens=2"], cwd=tmp_path, env=helpers.subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 2, proc.stderr[-3000:]
  assert lines[0].startswith(f"error: checkpoint {run}/checkpoints/5/params does not read back, it is damaged or "
                             "incomplete: OUT_OF_RANGE: ")
  assert lines[1] == "  hint: convert it again, or use a run's earlier step (RUN/checkpoints/STEP)"


def test_a_mismatched_preset_names_the_shapes_and_the_preset_that_fits(run_dir, sp_tok):
  params = str(run_dir / "checkpoints" / "5" / "params")
  cfg = loading.model_config("mid", sp_tok, dtype="float32")
  cfg = cfg.with_image_size(224)
  import dataclasses  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=1024))
  with pytest.raises(ValueError) as err:
    model_source.check_preset(params, cfg, "mid")
  message = str(err.value)
  assert "does not fit preset 'mid'" in message and "--model=tiny" in message
  assert "45 parameters differ" in message
  assert "adapter.proj: stored (64, 64), preset (1536, 1536)" in message  # the widths of tiny and mid
  model_source.check_preset(params, loading.model_config("tiny", sp_tok, dtype="float32"), "tiny")


def test_load_model_restores_the_run_it_resolved(run_dir, tiny_model):
  src = model_source.resolve(str(run_dir))
  tok = qtext.load_tokenizer(src.tokenizer)
  cfg = loading.model_config(src.preset, tok, dtype="float32", image_size=src.image_size)
  mesh, rules = loading.inference_mesh("fsdp", fsdp=1, data=-1)
  model = loading.load_model(cfg, src.params, mesh, rules, preset=src.preset)
  a = np.asarray(nnx.state(model)["llm"]["lm_head"]["kernel"].value)
  b = np.asarray(nnx.state(tiny_model)["llm"]["lm_head"]["kernel"].value)
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="--model=tiny"):
    loading.load_model(loading.model_config("qwen_vl_7b", tok, dtype="float32").with_image_size(224), src.params,
                       mesh, rules, preset="qwen_vl_7b")


def test_a_lora_run_is_refused_with_a_merge_hint_that_fits_every_command(tmp_path):
  """The same refusal reaches generate, serve, evaluate and `convert --mode=quantize`; its hint was a `generate
  --prompt=...` command line, wrong for the other three (evaluate takes --config.checkpoint, quantize no prompt)."""
  run = tmp_path / "run"
  (run / "checkpoints" / "4" / "params").mkdir(parents=True)
  (run / "checkpoints" / "4" / "params" / "_METADATA").write_text("{}")
  (run / "config.json").write_text(json.dumps({"stage": 3, "model": "tiny", "res": 224, "tokenizer": "",
                                               "lora": {"rank": 8}}))
  with pytest.raises(errors.ConfigError, match="LoRA/QLoRA run: merge its adapters first") as e:
    model_source.resolve(str(run))
  assert "chat" not in str(e.value) and "generate" not in e.value.hint and "--prompt" not in e.value.hint
  assert f"--mode=merge_lora --src={run}@4 --dst=MERGED, then pass MERGED in place of {run}" in e.value.hint
