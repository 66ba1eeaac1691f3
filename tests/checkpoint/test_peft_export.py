"""Exported LoRA adapters load through `peft.PeftModel.from_pretrained` onto a PyTorch module tree with the
reference's names (`transformer.h.{i}.attn.c_attn`, ...) and give our adapted projections' outputs; PEFT's merge
equals ours.

Tolerances: float32 on both sides; outputs atol 2e-5 (sums of ~100 products reordered), merged weights atol 1e-6.
"""
import json
import math
import shutil
import signal
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from qwenvl_jax.checkpoint import peft_export
from qwenvl_jax.model import QwenVL, lora, tiny
from tests import background
from tests.training import helpers

peft = pytest.importorskip("peft")

TARGETS = lora.OFFICIAL_TARGETS + ("llm/blocks/mlp/c_proj",)


def _layer_kernel(module, i):
  """Per-layer torch `nn.Linear` weight [out, in] of one of our stacked kernels (checkpoint.mapping.Linear)."""
  _, rhs, _ = lora._split_spec(module.spec)  # pylint: disable=protected-access
  k = np.asarray(module.kernel[...][i], np.float32)
  n_in = sum(1 for c in rhs if c in module.spec.split(",")[0])
  return k.reshape(math.prod(k.shape[:n_in]), -1).T


class _Block(torch.nn.Module):
  def __init__(self, d, qkv, heads_out, f):
    super().__init__()
    self.attn = torch.nn.Module()
    self.attn.c_attn = torch.nn.Linear(d, qkv)
    self.attn.c_proj = torch.nn.Linear(heads_out, d, bias=False)
    self.mlp = torch.nn.Module()
    self.mlp.w1 = torch.nn.Linear(d, f, bias=False)
    self.mlp.w2 = torch.nn.Linear(d, f, bias=False)
    self.mlp.c_proj = torch.nn.Linear(f, d, bias=False)


class _Tree(torch.nn.Module):
  """The reference's module names for the adapted projections (enough for PEFT to find its targets)."""

  def __init__(self, layers, d, qkv, heads_out, f):
    super().__init__()
    self.transformer = torch.nn.Module()
    self.transformer.h = torch.nn.ModuleList([_Block(d, qkv, heads_out, f) for _ in range(layers)])

  def prepare_inputs_for_generation(self, *args, **kwargs):  # what PeftModelForCausalLM reads from a causal LM
    raise NotImplementedError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  cfg = tiny(dtype="float32", remat_policy="none").with_image_size(56)
  model = QwenVL(cfg, rngs=nnx.Rngs(0))
  lcfg = lora.LoraConfig(rank=4, alpha=16.0, dropout=0.05, targets=TARGETS)
  lora.apply_lora(model, lcfg, rngs=nnx.Rngs(1))
  for i, m in enumerate(lora.lora_modules(model).values()):
    m.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(i), m.lora_b.shape))
  dst = tmp_path_factory.mktemp("peft") / "adapter"
  peft_export.export_peft(model, lcfg, dst)
  c = cfg.llm
  tree = _Tree(c.layers, c.width, 3 * c.heads * c.head_dim, c.heads * c.head_dim, c.mlp_dim)
  mods = lora.lora_modules(model)
  with torch.no_grad():
    for path, (name, _) in peft_export.PEFT_MODULES.items():
      for i in range(c.layers):
        linear = tree.get_submodule(name.format(i=i))
        linear.weight.copy_(torch.from_numpy(_layer_kernel(mods[path], i).copy()))
        if path == "llm/blocks/attn/qkv":
          linear.bias.copy_(torch.from_numpy(np.asarray(mods[path].bias[...][i]).reshape(-1)))
  peft_model = peft.PeftModel.from_pretrained(tree, str(dst))
  peft_model.eval()
  return model, lcfg, dst, peft_model


def test_adapter_files_use_the_reference_names(exported):
  _, lcfg, dst, _ = exported
  config = json.loads((dst / "adapter_config.json").read_text())
  assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 16.0, "LORA")
  assert set(config["target_modules"]) == {"c_attn", "attn.c_proj", "w1", "w2", "mlp.c_proj"}
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  names = load_file(str(dst / "adapter_model.safetensors"))
  assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in names
  assert names["base_model.model.transformer.h.1.mlp.w2.lora_B.weight"].shape[1] == lcfg.rank
  # Both files readable alike (safetensors alone would leave the weights 0600 whatever the umask).
  assert (dst / "adapter_model.safetensors").stat().st_mode == (dst / "adapter_config.json").stat().st_mode


def test_peft_model_gives_our_adapted_outputs(exported):
  model, _, _, peft_model = exported
  rng = np.random.default_rng(0)
  for path, (name, _) in peft_export.PEFT_MODULES.items():
    module = lora.lora_modules(model)[path]
    lhs, rhs, _ = lora._split_spec(module.spec)  # pylint: disable=protected-access
    in_shape = [module.kernel.shape[1 + rhs.index(ch)] for ch in rhs if ch in lhs]
    for i in (0, model.cfg.llm.layers - 1):
      x = rng.normal(size=(2, 5, *in_shape)).astype(np.float32)
      # Our adapted projection at layer i: x @ W + b + (alpha / r) * (x @ A) @ B (Einsum.__call__'s formula).
      y = jax.numpy.einsum(module.spec, x, module.kernel[...][i])
      if module.bias is not None:
        y = y + module.bias[...][i]
      h = jax.numpy.einsum(module.lora_specs[0], x, module.lora_a[...][i])
      y = y + module.lora_scale * jax.numpy.einsum(module.lora_specs[1], h, module.lora_b[...][i])
      ours = np.asarray(y).reshape(2, 5, -1)
      with torch.no_grad():
        theirs = peft_model.base_model.model.get_submodule(name.format(i=i))(
            torch.from_numpy(x.reshape(2, 5, -1))).numpy()
      np.testing.assert_allclose(ours, theirs, atol=2e-5, err_msg=f"{path} layer {i}")


def test_peft_merge_equals_ours(exported):
  model, _, _, peft_model = exported
  merged_torch = peft_model.merge_and_unload()
  merged = lora.merge_lora(nnx.merge(*nnx.split(model)))
  mods = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(merged)}
  for path, (name, _) in peft_export.PEFT_MODULES.items():
    module = mods[path]
    for i in range(model.cfg.llm.layers):
      np.testing.assert_allclose(_layer_kernel(module, i),
                                 merged_torch.get_submodule(name.format(i=i)).weight.detach().numpy(), atol=1e-6)


def test_export_refuses_an_existing_directory_and_modules_to_save(exported, tmp_path):
  model, lcfg, dst, _ = exported
  with pytest.raises(FileExistsError):
    peft_export.export_peft(model, lcfg, dst)
  with pytest.raises(ValueError, match="modules_to_save"):
    peft_export.export_peft(model, lora.LoraConfig(rank=4, modules_to_save=("lm_head",)), tmp_path / "x")


def test_an_export_that_fails_midway_leaves_no_folder(exported, tmp_path, monkeypatch):
  """A failed write (disk full) left adapter_config.json alone in the folder, which refused the retry."""
  model, lcfg, _, _ = exported

  def full(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(peft_export, "save_file", full)
  with pytest.raises(OSError, match="No space left"):
    peft_export.export_peft(model, lcfg, tmp_path / "adapter")
  assert not (tmp_path / "adapter").exists() and not (tmp_path / "adapter.partial").exists()


# Killed outright halfway through the weights (what SIGKILL, an OOM kill or a lost machine does: no cleanup runs).
_KILLED_EXPORT = """
import os, signal, sys
from flax import nnx
from qwenvl_jax.checkpoint import peft_export
from qwenvl_jax.model import QwenVL, lora, tiny
model = QwenVL(tiny(dtype="float32", remat_policy="none").with_image_size(56), rngs=nnx.Rngs(0))
lcfg = lora.LoraConfig(rank=4, targets=lora.OFFICIAL_TARGETS)
lora.apply_lora(model, lcfg, rngs=nnx.Rngs(1))

def killed(tensors, path, metadata=None):
  with open(path, "wb") as f:
    f.write(b"half")
  os.kill(os.getpid(), signal.SIGKILL)

peft_export.save_file = killed
peft_export.export_peft(model, lcfg, sys.argv[1])
"""


def _killed_export(folder):
  """The export above in a process of its own: a job registered in tests/background.py, run from the session's
  start on the core the other tests leave idle."""
  return [background.Command([sys.executable, "-c", _KILLED_EXPORT, str(folder / "adapter")],
                             helpers.subprocess_env(devices=1), folder, check=False)]


killed_export = background.finished_work(__name__, "killed_export", _killed_export)


def test_a_killed_export_leaves_only_dst_partial_which_the_retry_names(killed_export, exported):
  """A kill left a folder under the name the user asked for, holding adapter_config.json and half the weights: it
  looked like an adapter, the retry was refused as "already exists", and only loading it failed. Now the kill
  leaves `adapter.partial`; the retry says what it is, and once it is removed the export is whole."""
  folder, (run,) = killed_export
  assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
  dst = folder / "adapter"
  assert not dst.exists()
  assert (folder / "adapter.partial" / "adapter_model.safetensors").read_bytes() == b"half"
  model, lcfg, _, _ = exported
  with pytest.raises(FileExistsError, match=r"adapter\.partial exists: the half-written output of an export that "
                     "was killed, or of one still running; remove it if none is running"):
    peft_export.export_peft(model, lcfg, dst)
  shutil.rmtree(folder / "adapter.partial")
  peft_export.export_peft(model, lcfg, dst)
  assert sorted(p.name for p in dst.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
  assert not (folder / "adapter.partial").exists()
