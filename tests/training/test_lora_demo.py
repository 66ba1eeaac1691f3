"""The README's LoRA/QLoRA CPU demo, reduced: `configs/stage3.py:qlora=R` trains on synthetic chat data, its run
merges (`convert --mode=merge_lora`, a real subprocess) into a params checkpoint whose logits equal the unmerged
QLoRA model's, `generate` chats with it, and its adapters export as a PEFT directory.

Tolerance: merged vs unmerged logits in float32 (`--dtype=float32`): the merged kernel is deq(W) + s*A@B, the
unmerged model computes x@deq(W) + s*(x@A)@B: atol 1e-5 (as tests/model/test_lora.py).
"""
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import checkpoint, errors, sharding
from qwenvl_jax.checkpoint import peft_export
from qwenvl_jax.inference import model_source
from qwenvl_jax.model import get_preset
from qwenvl_jax.training import peft
from tests import background
from tests.training.helpers import REPO, read_losses, subprocess_env

# The demo command's config with fewer, smaller steps: 56 px, 8 steps.
DEMO = {"res": 56, "batch_size": 8, "total_steps": 8, "checkpoint.every": 8, "log_every": 1,
        "progress_bar": False, "tensorboard": False, "data.num_workers": 0, "lora.quantize_group": 16,
        "optimizer.warmup_steps": 2}


def _demo(folder):
  """The reduced demo's run (`<folder>/run`) and its merge (`<folder>/merged`): registered in tests/background.py, they
  start with the session at the lowest CPU priority. The README's commands, in one-device processes as a user's CPU
  has (the 8 fake devices of the test process would compile the QLoRA init and step for 8, at twice the cost)."""
  train = [f"--config={REPO / 'configs' / 'stage3.py'}:qlora=8", f"--workdir={folder / 'run'}"]
  train += [f"--config.{k}={v}" for k, v in DEMO.items()]
  merge = ["--mode=merge_lora", f"--src={folder / 'run'}", f"--dst={folder / 'merged'}", "--dtype=float32"]
  return [background.Command([sys.executable, "-m", "qwenvl_jax.train", *train], subprocess_env(1)),
          background.Command([sys.executable, "-m", "qwenvl_jax.convert", *merge], subprocess_env(1))]


background.register(__name__, "demo_run", _demo)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """(workdir, merged float32 params dir) of the reduced demo."""
  job = background.job(__name__, "demo_run", tmp_path_factory.mktemp)
  trained, *merged = job.result()
  assert trained.returncode == 0 and "completed at step 8" in trained.stderr, trained.stderr[-3000:]
  (proc,) = merged
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "wrote merged params (float32)" in proc.stdout
  return job.folder / "run", job.folder / "merged"


@pytest.mark.slow
def test_demo_trains_and_the_merged_model_equals_the_qlora_model(demo_run):
  workdir, merged = demo_run
  losses = read_losses(workdir)
  assert losses[8] < losses[1], losses
  model, lcfg, config = peft.load_run(str(workdir))
  assert config.lora.base_quantize == "nf4" and lcfg.rank == 8
  assert model.llm.blocks.mlp.w1.qvalue.dtype == jnp.int4
  cfg = get_preset("tiny", dtype="float32", param_dtype="float32", remat_policy="none").with_image_size(56)
  merged_model = checkpoint.load_model(str(merged), cfg, sharding.make_mesh({"fsdp": -1}), sharding.load_rules("fsdp"))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 16)), jnp.int32)
  logits = nnx.jit(lambda m, x: m(x).logits)
  unmerged = logits(model, ids)
  np.testing.assert_allclose(np.asarray(logits(merged_model, ids)), np.asarray(unmerged), atol=1e-5, rtol=0)
  # The trained adapters matter: the merged model is not the dequantized base.
  b = model.llm.blocks.attn.qkv.lora_b[...]
  assert float(jnp.abs(b).max()) > 0


@pytest.mark.slow
def test_demo_chats_with_the_merged_checkpoint(demo_run):
  workdir, merged = demo_run
  # No --model, --image_size, --tokenizer or --chat_format: the merge recorded the run's and copied its tokenizer.
  source = model_source.resolve(str(merged))
  assert (source.preset, source.image_size, source.chat_format) == ("tiny", 56, "chatml")
  assert source.tokenizer == f"sentencepiece:{merged / 'tokenizer.model'}"
  assert (merged / "tokenizer.model").read_bytes() == (workdir / "tokenizer.model").read_bytes()
  cmd = [sys.executable, "-m", "qwenvl_jax.generate", f"--checkpoint={merged}",
         "--prompt=What is in the picture?", "--max_new_tokens=4", "--dtype=float32"]
  proc = subprocess.run(cmd, env=subprocess_env(1), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The run dir itself is refused (ConfigError: one line, exit 2 in the CLI) with the merge command to run.
  with pytest.raises(errors.ConfigError, match="LoRA/QLoRA run: merge") as e:
    model_source.resolve(str(workdir))
  assert f"--mode=merge_lora --src={workdir}@8" in e.value.hint


@pytest.mark.slow
def test_demo_adapters_export_as_peft(demo_run, tmp_path):
  workdir, _ = demo_run
  model, lcfg, _ = peft.load_run(f"{workdir}@8")
  peft_export.export_peft(model, lcfg, tmp_path / "adapter")
  config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert (config["r"], sorted(config["target_modules"])) == (8, ["attn.c_proj", "c_attn", "w1", "w2"])
  tensors = peft_export.adapter_tensors(model)
  layers = model.cfg.llm.layers
  assert len(tensors) == 2 * 4 * layers
  assert all(v.dtype == np.float32 for v in tensors.values())
