"""LoRA adapters -> a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) in the reference's
module names, loadable by `peft.PeftModel.from_pretrained` onto the PyTorch Qwen-VL.

Letters: L layers, I / O a kernel's input / output dims, r the rank.

Per layer i, our `lora_a float32[L, *I, r]` and `lora_b float32[L, r, *O]` are PEFT's
`base_model.model.transformer.h.{i}.<module>.lora_A.weight [r, prod I] = lora_a[i].reshape(prod I, r).T` and
`....lora_B.weight [prod O, r] = lora_b[i].reshape(r, prod O).T`: our kernels keep `nn.Linear`'s `[in, out]`
order flattened the way `mapping.Linear` does (the blocked q|k|v `c_attn` `[D, 3, N, H]` is `[D, 3*N*H]`).
PEFT's scale is `lora_alpha / r`, ours `alpha / rank`: the config carries both unchanged.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from qwenvl_jax import new_files
from qwenvl_jax.model import lora

# Our module paths -> the reference's per-layer module names and the PEFT target name (`target_modules`).
PEFT_MODULES = {
    "llm/blocks/attn/qkv": ("transformer.h.{i}.attn.c_attn", "c_attn"),
    "llm/blocks/attn/out": ("transformer.h.{i}.attn.c_proj", "attn.c_proj"),
    "llm/blocks/mlp/w1": ("transformer.h.{i}.mlp.w1", "w1"),
    "llm/blocks/mlp/w2": ("transformer.h.{i}.mlp.w2", "w2"),
    "llm/blocks/mlp/c_proj": ("transformer.h.{i}.mlp.c_proj", "mlp.c_proj"),
}


def adapter_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
  """{PEFT tensor name: float32 array} of every adapter of `model` (all must be exportable LLM projections)."""
  out = {}
  for path, module in lora.lora_modules(model).items():
    if path not in PEFT_MODULES:
      raise ValueError(f"LoRA on {path} has no reference PEFT name; exportable: {sorted(PEFT_MODULES)}")
    name = PEFT_MODULES[path][0]
    a = np.asarray(module.lora_a[...], np.float32)
    b = np.asarray(module.lora_b[...], np.float32)
    rank = a.shape[-1]
    for i in range(a.shape[0]):
      prefix = "base_model.model." + name.format(i=i)
      out[prefix + ".lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
      out[prefix + ".lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, math.prod(b.shape[2:])).T)
  return out


def export_peft(model: nnx.Module, cfg: lora.LoraConfig, dst: str | os.PathLike) -> None:
  """Writes `dst/adapter_config.json` and `dst/adapter_model.safetensors` (float32) for `model`'s adapters, through
  `DST.partial` (`new_files.new_folder`): a `dst` that exists holds a whole adapter, even after the export was
  killed (which leaves only `DST.partial`; before, it left a half adapter under the name the user asked for).

  Raises:
    errors.ConfigError: `dst` is a URL.
    FileExistsError: `dst` or `DST.partial` exists (nothing a user wrote is overwritten).
    ValueError: adapters on modules without a reference name, or modules_to_save (merge instead).
  """
  if cfg.modules_to_save:
    raise ValueError(f"export_peft writes adapters only; modules_to_save {list(cfg.modules_to_save)} are trained "
                     "in full: use --mode=merge_lora and orbax_to_torch for such runs")
  tensors = adapter_tensors(model)
  targets = sorted({PEFT_MODULES[p][1] for p in lora.lora_modules(model)})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
            "modules_to_save": None, "inference_mode": True, "base_model_name_or_path": None}
  with new_files.new_folder(dst) as tmp:  # refuses a URL, `dst` and `DST.partial` before it writes
    with open(tmp / "adapter_config.json", "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2)
    weights = tmp / "adapter_model.safetensors"
    save_file(tensors, weights, metadata={"format": "pt"})
    # safetensors creates its file private (0600) whatever the umask; give it the mode of the config beside it.
    os.chmod(weights, os.stat(tmp / "adapter_config.json").st_mode & 0o777)
