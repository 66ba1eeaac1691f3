r"""Weight conversion between PyTorch checkpoints and the Orbax params checkpoint (thin entry point).

  # Hugging Face Qwen-VL / Qwen-VL-Chat (.bin or .safetensors shards + index) -> Orbax, dtype kept (bf16):
  python -m qwenvl_jax.convert --mode=torch_to_orbax --src=/ckpt/Qwen-VL-Chat --dst=/ckpt/qwenvl_chat_params
  # Stage-1 init from scratch: OpenCLIP ViT-bigG/14 -> ViT trunk, Qwen-7B -> LLM, fresh adapter:
  python -m qwenvl_jax.convert --mode=init_from_pretrained --openclip=/ckpt/open_clip_pytorch_model.bin \
      --qwen7b=/ckpt/Qwen-7B --dst=/ckpt/stage1_init
  # Orbax -> Hugging Face format (bf16 safetensors shards + index + config.json), loadable by the reference:
  python -m qwenvl_jax.convert --mode=orbax_to_torch --src=/ckpt/finetuned_params --dst=/ckpt/export \
      --reference_files=/ckpt/Qwen-VL-Chat
  # A LoRA trainer run (WORKDIR[@STEP]) -> merged params checkpoint (W + alpha/r * A @ B, bf16), or -> a PEFT
  # adapter directory in the reference's module names (peft.PeftModel.from_pretrained loads it):
  python -m qwenvl_jax.convert --mode=merge_lora --src=runs/stage3 --dst=/ckpt/merged_params
  python -m qwenvl_jax.convert --mode=export_peft --src=runs/stage3@150 --dst=/ckpt/peft_adapter
"""

import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from qwenvl_jax import cli

from qwenvl_jax import checkpoint
from qwenvl_jax.model.config import PRESETS, get_preset

_MODE = flags.DEFINE_enum("mode", "torch_to_orbax", ["torch_to_orbax", "orbax_to_torch", "init_from_pretrained",
                                            "merge_lora", "export_peft"],
                          "Conversion direction.")
_SRC = flags.DEFINE_string("src", None, "Input: a PyTorch checkpoint (directory or file) or a params checkpoint.")
_DST = flags.DEFINE_string("dst", None, "Output directory; must not exist.", required=True)
_PRESET = flags.DEFINE_enum("preset", "qwen_vl_7b", sorted(PRESETS), "Model architecture the weights belong to.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 448, "Input resolution written to config.json (224 or 448).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["keep", "bfloat16", "float32", "float16"],
                           "Stored dtype. Default: keep the source's for imports, bfloat16 for exports.")
_OPENCLIP = flags.DEFINE_string("openclip", None, "init_from_pretrained: OpenCLIP ViT-bigG/14 state dict.")
_QWEN7B = flags.DEFINE_string("qwen7b", None, "init_from_pretrained: Qwen-7B Hugging Face directory.")
_SEED = flags.DEFINE_integer("seed", 0, "init_from_pretrained: seed of the fresh adapter.")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 2.0, "orbax_to_torch: maximum size of one safetensors shard (GB).")
_REFERENCE = flags.DEFINE_string("reference_files", None,
                                 "orbax_to_torch: a Hugging Face Qwen-VL directory whose code/tokenizer files are "
                                 "copied into the export.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = get_preset(_PRESET.value).with_image_size(_IMAGE_SIZE.value)
  mode = _MODE.value
  if mode == "init_from_pretrained":
    if not (_OPENCLIP.value and _QWEN7B.value):
      raise app.UsageError("--mode=init_from_pretrained needs --openclip and --qwen7b")
    checkpoint.init_from_pretrained(_DST.value, cfg, openclip=_OPENCLIP.value, qwen7b=_QWEN7B.value,
                                    seed=_SEED.value, dtype=_DTYPE.value)
    return
  if not _SRC.value:
    raise app.UsageError(f"--mode={mode} needs --src")
  if mode in ("merge_lora", "export_peft"):
    _lora(mode, _SRC.value, _DST.value, _DTYPE.value or "bfloat16")
    return
  if mode == "torch_to_orbax":
    checkpoint.torch_to_orbax(_SRC.value, _DST.value, cfg, dtype=_DTYPE.value)
  else:
    checkpoint.orbax_to_torch(_SRC.value, _DST.value, cfg, dtype=_DTYPE.value or "bfloat16",
                              max_shard_bytes=int(_SHARD_GB.value * 1e9), reference_files=_REFERENCE.value)


def _lora(mode: str, src: str, dst: str, dtype: str) -> None:
  """merge_lora / export_peft of the LoRA trainer run `src`; a bad source is one error line and exit status 1."""
  import os  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.checkpoint import peft_export  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.model import lora  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.training import peft  # pylint: disable=import-outside-toplevel
  if os.path.exists(dst):
    sys.exit(f"error: {dst} already exists; choose a new output directory")
  try:
    model, lcfg, _ = peft.load_run(src)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  if mode == "export_peft":
    try:
      peft_export.export_peft(model, lcfg, dst)
    except ValueError as e:
      sys.exit(f"error: {e}")
    print(f"wrote PEFT adapter ({lcfg.rank=}, {lcfg.alpha=}) to {dst}")
    return
  lora.merge_lora(model)
  target = None if dtype == "keep" else jnp.dtype(dtype)
  params = jax.tree.map(lambda x: x if target is None else x.astype(target), nnx.to_pure_dict(nnx.state(model)))
  checkpoint.save_params(dst, params)
  print(f"wrote merged params ({dtype}) to {dst}")


if __name__ == "__main__":
  cli.run(main)
