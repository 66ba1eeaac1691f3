r"""Weight conversion between PyTorch checkpoints and the Orbax params checkpoint (thin entry point).

  # Hugging Face Qwen-VL / Qwen-VL-Chat (.bin or .safetensors shards + index) -> Orbax, dtype kept (bf16):
  python -m qwenvl_jax.convert --mode=torch_to_orbax --src=/ckpt/Qwen-VL-Chat --dst=/ckpt/qwenvl_chat_params
  # Stage-1 init from scratch: OpenCLIP ViT-bigG/14 -> ViT trunk, Qwen-7B -> LLM, fresh adapter:
  python -m qwenvl_jax.convert --mode=init_from_pretrained --openclip=/ckpt/open_clip_pytorch_model.bin \
      --qwen7b=/ckpt/Qwen-7B --dst=/ckpt/stage1_init
  # Orbax -> Hugging Face format (bf16 safetensors shards + index + config.json + the source's qwen.tiktoken and a
  # generation_config.json in its chat format), loadable by the reference with its code and tokenizer files, copied
  # from --reference_files:
  python -m qwenvl_jax.convert --mode=orbax_to_torch --src=/ckpt/finetuned_params --dst=/ckpt/export \
      --reference_files=/ckpt/Qwen-VL-Chat
  # Weight-only int8 (per channel) or int4 (per group) params checkpoint, loaded by generate/evaluate as stored:
  python -m qwenvl_jax.convert --mode=quantize --quantize=int8 --src=/ckpt/qwenvl_chat_params --dst=/ckpt/chat_int8
  # A LoRA or QLoRA trainer run (WORKDIR[@STEP]) -> merged params checkpoint (W + alpha/r * A @ B, bf16; a QLoRA
  # base is dequantized first), or -> a PEFT adapter directory in the reference's module names
  # (peft.PeftModel.from_pretrained loads it):
  python -m qwenvl_jax.convert --mode=merge_lora --src=runs/stage3 --dst=/ckpt/merged_params
  python -m qwenvl_jax.convert --mode=export_peft --src=runs/stage3@150 --dst=/ckpt/peft_adapter

A params checkpoint written here records its preset, image size and chat format and keeps a copy of its tokenizer
(`checkpoint.model_card`), taken from the source (a Hugging Face folder's generation_config.json and qwen.tiktoken,
a run's config, a params checkpoint's record); --tokenizer and --chat_format replace what the source says.
"""

import os
import pathlib
import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from qwenvl_jax import cli, errors, new_files

from qwenvl_jax import checkpoint
from qwenvl_jax.model.config import PRESETS, get_preset

_MODE = flags.DEFINE_enum("mode", "torch_to_orbax", ["torch_to_orbax", "orbax_to_torch", "init_from_pretrained",
                                     "quantize", "merge_lora", "export_peft"],
                          "Conversion direction.")
_SRC = flags.DEFINE_string("src", None, "Input: a PyTorch checkpoint (directory or file) or a params checkpoint.")
_DST = flags.DEFINE_string("dst", None, "Output directory; must not exist.", required=True)
_PRESET = flags.DEFINE_enum("preset", "qwen_vl_7b", sorted(PRESETS), "Model architecture the weights belong to.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 448, "Input resolution written to config.json (224 or 448).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["keep", "bfloat16", "float32", "float16"],
                           "Stored dtype. Default: keep the source's for imports, bfloat16 for exports; quantize: "
                           "of the parts left unquantized (norms, biases, ...), float32 by default.")
_OPENCLIP = flags.DEFINE_string("openclip", None, "init_from_pretrained: OpenCLIP ViT-bigG/14 state dict.")
_QWEN7B = flags.DEFINE_string("qwen7b", None, "init_from_pretrained: Qwen-7B Hugging Face directory.")
_SEED = flags.DEFINE_integer("seed", 0, "init_from_pretrained: seed of the fresh adapter.")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 2.0, "orbax_to_torch: maximum size of one safetensors shard (GB).")
_QUANTIZE = flags.DEFINE_enum("quantize", "int8", ["int8", "int4"], "quantize: int8 per channel or int4 per group.")
_GROUP = flags.DEFINE_integer("group_size", 128, "quantize: int4 group size along each kernel's contracted axis.")
_REFERENCE = flags.DEFINE_string("reference_files", None,
                                 "orbax_to_torch: a Hugging Face Qwen-VL directory whose code/tokenizer files are "
                                 "copied into the export.")


_TOKENIZER = flags.DEFINE_string("tokenizer", None, "torch_to_orbax, init_from_pretrained, quantize, merge_lora: the "
                                 "tokenizer the new params checkpoint keeps a copy of (qwen:PATH, sentencepiece:PATH "
                                 "or a .tiktoken / .model file), instead of the source's own; orbax_to_torch: the "
                                 "Qwen vocabulary the export carries as qwen.tiktoken.")
_CHAT_FORMAT = flags.DEFINE_enum("chat_format", None, ["chatml", "raw"], "Same modes: the chat format to record "
                                 "(chatml: a chat model; raw: a base model), instead of the source's own; "
                                 "orbax_to_torch: the one its generation_config.json says.")
flags.DEFINE_alias("model", "preset")  # the name generate, serve and evaluate use

_IMPORTS = ("torch_to_orbax", "init_from_pretrained")
# The flags only some modes read (the others take the model from their source, or write float32 adapters). Given to
# another mode they were ignored without a word: --quantize=int4 with torch_to_orbax wrote a float checkpoint.
_READ_BY = {
    "src": ("torch_to_orbax", "orbax_to_torch", "quantize", "merge_lora", "export_peft"),
    "openclip": ("init_from_pretrained",), "qwen7b": ("init_from_pretrained",), "seed": ("init_from_pretrained",),
    "quantize": ("quantize",), "group_size": ("quantize",),
    "max_shard_gb": ("orbax_to_torch",), "reference_files": ("orbax_to_torch",),
    "preset": _IMPORTS + ("orbax_to_torch", "quantize"), "image_size": _IMPORTS + ("orbax_to_torch", "quantize"),
    "dtype": _IMPORTS + ("orbax_to_torch", "quantize", "merge_lora"),
    "tokenizer": _IMPORTS + ("orbax_to_torch", "quantize", "merge_lora"),
    "chat_format": _IMPORTS + ("orbax_to_torch", "quantize", "merge_lora"),
}
_UNREAD_BECAUSE = {"src": "it reads --openclip and --qwen7b", "dtype": "it writes the adapters in float32",
                   "tokenizer": "a PEFT adapter folder holds no tokenizer: the base model's folder has it",
                   "chat_format": "a PEFT adapter folder holds no generation config: the base model's folder has it",
                   "preset": "the run's config gives the model", "image_size": "the run's config gives the resolution"}


def _params_source(src: str) -> tuple[str, str, int, str | None, str | None]:
  """(params directory, preset, image size, tokenizer spec, chat format) of --src for the modes that read a params
  checkpoint: a training run directory or its checkpoints/<step> supplies its params, preset, resolution,
  tokenizer and chat format (as for generate and serve), a params checkpoint what convert recorded in it; --preset
  / --image_size win when given. Tokenizer and chat format are None where the source does not say."""
  from qwenvl_jax.inference import model_source  # pylint: disable=import-outside-toplevel
  preset = _PRESET.value if flags.FLAGS["preset"].present else None
  size = _IMAGE_SIZE.value if flags.FLAGS["image_size"].present else None
  try:
    source = model_source.resolve(src, model=preset, image_size=size)
  except FileNotFoundError:
    if "://" not in src:  # it says what a local path is (PyTorch weights: torch_to_orbax converts them), or that
      raise               # it does not exist; ParamReader said only 'not an Orbax PyTree checkpoint'
    return src, _PRESET.value, _IMAGE_SIZE.value, None, None
  # Not model_source's chat format: it says 'chatml' for a checkpoint that records none.
  chat_format = (source.chat_format if source.run_dir is not None else
                 checkpoint.model_card.recorded_chat_format(source.params,
                                                            checkpoint.model_card.recorded_model(source.params)))
  return source.params, source.preset, source.image_size or _IMAGE_SIZE.value, source.tokenizer, chat_format


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_libraries()
  mode = _MODE.value
  for name, modes in _READ_BY.items():
    if flags.FLAGS[name].present and mode not in modes:
      typed = "model" if name == "preset" and flags.FLAGS["model"].present else name
      raise errors.ConfigError(f"--{typed} is not read by --mode={mode} (only by {' / '.join(modes)})",
                               hint=f"drop it ({_UNREAD_BECAUSE[name]})" if name in _UNREAD_BECAUSE else
                               "drop it, or use a mode that reads it")
  if mode == "orbax_to_torch" and _TOKENIZER.value:
    checkpoint.check_export_tokenizer(_TOKENIZER.value)
  if _SHARD_GB.value <= 0:
    raise errors.ConfigError(f"--max_shard_gb={_SHARD_GB.value:g} must be > 0 (it wrote one tensor per shard)")
  _refuse_run_checkpoints(_DST.value)
  if mode in ("orbax_to_torch", "export_peft"):  # Hugging Face / PEFT folders: written locally (Orbax writes URLs)
    new_files.refuse_url(_DST.value)
  # The flags and --dst are checked first; reading what --src is comes after.
  src, preset, image_size = _SRC.value, _PRESET.value, _IMAGE_SIZE.value
  tokenizer = chat_format = None
  if src and mode in ("quantize", "orbax_to_torch"):
    src, preset, image_size, tokenizer, chat_format = _params_source(src)
  tokenizer, chat_format = _TOKENIZER.value or tokenizer, _CHAT_FORMAT.value or chat_format
  cfg = get_preset(preset).with_image_size(image_size)
  if mode == "init_from_pretrained":
    if not (_OPENCLIP.value and _QWEN7B.value):
      raise app.UsageError("--mode=init_from_pretrained needs --openclip and --qwen7b")
    checkpoint.init_from_pretrained(_DST.value, cfg, openclip=_OPENCLIP.value, qwen7b=_QWEN7B.value,
                                    seed=_SEED.value, dtype=_DTYPE.value, preset=preset, tokenizer=tokenizer,
                                    chat_format=chat_format)
    return
  if not _SRC.value:
    raise app.UsageError(f"--mode={mode} needs --src")
  if mode in ("merge_lora", "export_peft"):
    _lora(mode, _SRC.value, _DST.value, _DTYPE.value or "bfloat16", tokenizer, chat_format)
    return
  if mode == "quantize":
    _quantize(src, _DST.value, cfg, preset, tokenizer, chat_format)
  elif mode == "torch_to_orbax":
    checkpoint.torch_to_orbax(src, _DST.value, cfg, dtype=_DTYPE.value, preset=preset, tokenizer=tokenizer,
                              chat_format=chat_format)
  else:
    checkpoint.orbax_to_torch(src, _DST.value, cfg, dtype=_DTYPE.value or "bfloat16",
                              max_shard_bytes=int(_SHARD_GB.value * 1e9), reference_files=_REFERENCE.value,
                              tokenizer=tokenizer, chat_format=chat_format)
  print(f"wrote {mode} of {src} ({preset}, {image_size} px) to {_DST.value}")
  if mode == "orbax_to_torch":
    _export_notes(src, _DST.value, chat_format)


def _export_notes(src: str, dst: str, chat_format: str | None) -> None:
  """One stderr line per thing an orbax_to_torch export still needs, with the fix, or which differs from what
  --reference_files brought."""
  lacks = checkpoint.missing_reference_files(dst)
  if code := [name for name in lacks if name != "generation_config.json"]:
    print(f"note: {dst} lacks {', '.join(code)} of a Hugging Face Qwen-VL folder, without which transformers loads "
          "neither the model nor its tokenizer: copy them in from a Qwen-VL download, or export again with "
          f"--reference_files=DIR{'' if _REFERENCE.value else _origin(src)}", file=sys.stderr)
  if note := checkpoint.generation_config_note(dst, chat_format, src=_SRC.value, reference_files=_REFERENCE.value,
                                               flag_given=_CHAT_FORMAT.value is not None):
    print(f"note: {note}", file=sys.stderr)


def _origin(params: str) -> str:
  """' (e.g. the folder it was converted from, DIR)' when the params checkpoint records a Hugging Face Qwen-VL
  folder that still holds the reference's code, else ''."""
  try:
    folder = (checkpoint.ParamReader(params).custom_metadata.get("sources") or {}).get("qwen-vl")
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return ""
  if folder and os.path.isfile(os.path.join(folder, "modeling_qwen.py")):
    return f" (e.g. the folder it was converted from, {folder})"
  return ""


def _refuse_run_checkpoints(dst: str | None) -> None:
  """A --dst inside a training run's checkpoints/ folder would pass for one of the run's steps: the trainer then
  took a quantized checkpoint at <run>/checkpoints/20 for its step 20 ("already trained to step 20"), or set it
  aside as damaged."""
  if not dst or "://" in dst:
    return
  path = pathlib.Path(os.path.abspath(dst))
  for folder in path.parents:
    if folder.name == "checkpoints" and (folder.parent / "config.json").is_file():
      raise errors.ConfigError(f"--dst={dst} is inside the checkpoints folder of the training run {folder.parent}, "
                               "where the trainer takes every folder for one of its steps",
                               hint="write it outside the run, e.g. next to it")


def _quantize(src: str, dst: str, cfg, preset: str, tokenizer: str | None, chat_format: str | None) -> None:
  """Float params checkpoint -> quantized params checkpoint, one kernel in float memory at a time; it records the
  source's preset, image size and chat format, and keeps a copy of its tokenizer."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.inference import loading, quantized  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.model import quantize as qlib  # pylint: disable=import-outside-toplevel
  if os.path.exists(dst):
    raise FileExistsError(f"{dst} exists; refusing to overwrite it (choose a new output directory)")
  if not os.path.isdir(src):
    raise FileNotFoundError(f"params checkpoint {src!r} does not exist")
  checkpoint.refuse_inside_source(dst, src)
  # Quantize from float32 (exact for bf16 sources); the small unquantized leaves are stored in float32 unless --dtype
  # says otherwise.
  cfg = dataclasses.replace(cfg, dtype="float32", param_dtype="float32", remat_policy="none")
  reader = checkpoint.ParamReader(src)
  vocab = reader.shapes.get("llm.wte.embedding", ((cfg.llm.vocab_size,),))[0][0]
  # The stored vocabulary decides (a demo model may have grown it); `<imgpad>` does not shape any parameter.
  cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=vocab),
                            image_pad_id=min(cfg.image_pad_id, vocab - 1))
  qcfg = qlib.QuantConfig(mode=_QUANTIZE.value, group_size=_GROUP.value)
  mesh, rules = loading.inference_mesh()
  model = quantized.quantize_checkpoint_on_load(src, cfg, qcfg, mesh, rules)
  # --dtype: what the parts left unquantized are stored as ("keep": the source's; a loader casts them to its own).
  dtypes = None if _DTYPE.value in (None, "float32") else {
      k: stored if _DTYPE.value == "keep" else jnp.dtype(_DTYPE.value) for k, (_, stored) in reader.shapes.items()}
  quantized.save_quantized(model, dst, qcfg, sources={"params": os.path.abspath(src)}, dtypes=dtypes,
                           model_info=checkpoint.model_metadata(cfg, preset, chat_format=chat_format,
                                                                tokenizer=checkpoint.bundled_tokenizer(tokenizer)))
  checkpoint.copy_tokenizer(tokenizer, dst)


def _lora(mode: str, src: str, dst: str, dtype: str, tokenizer: str | None, chat_format: str | None) -> None:
  """merge_lora / export_peft of the LoRA or QLoRA trainer run `src` (a QLoRA base is dequantized in float32 before
  the merge, then everything is cast to `dtype`); a bad source is one error line and exit status 2 (`cli.run`).
  The merged checkpoint records the run's preset, image size and chat format and keeps a copy of its tokenizer,
  so generate / serve / evaluate load it without flags."""
  from qwenvl_jax.checkpoint import peft_export  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.model import lora  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.training import peft  # pylint: disable=import-outside-toplevel
  if os.path.exists(dst):
    raise errors.UserFileExistsError(f"{dst} already exists", hint="choose a new output directory")
  if mode == "export_peft":  # a killed export's DST.partial: refused before the run is loaded
    new_files.refuse_existing(new_files.partial_folder(dst))
  try:
    model, lcfg, run = peft.load_run(src)
  except FileNotFoundError as e:
    raise errors.UserFileNotFoundError(str(e)) from e
  except ValueError as e:  # not a LoRA run, or a run config that does not parse
    raise errors.ConfigError(f"--src={src}: {getattr(e, 'message', e)}", hint=getattr(e, "hint", None)) from e
  if mode == "export_peft":
    try:
      peft_export.export_peft(model, lcfg, dst)
    except ValueError as e:  # an adapter the PEFT format cannot express
      raise errors.ConfigError(str(e)) from e
    print(f"wrote PEFT adapter (r={lcfg.rank}, lora_alpha={lcfg.alpha}) to {dst}")
    return
  from qwenvl_jax.inference import model_source  # pylint: disable=import-outside-toplevel
  lora.merge_lora(model)
  target = None if dtype == "keep" else jnp.dtype(dtype)
  params = jax.tree.map(lambda x: x if target is None else x.astype(target), nnx.to_pure_dict(nnx.state(model)))
  card = model_source.run_model(os.path.abspath(peft.run_spec(src)[0]), run.to_dict())
  card.update({k: v for k, v in (("tokenizer", tokenizer), ("chat_format", chat_format)) if v})  # the flags win
  checkpoint.save_params(dst, params, custom_metadata={
      "sources": {"lora_run": os.path.abspath(src)},
      "model": checkpoint.model_metadata(model.cfg, card["preset"], chat_format=card["chat_format"],
                                         tokenizer=checkpoint.bundled_tokenizer(card["tokenizer"]))})
  checkpoint.copy_tokenizer(card["tokenizer"], dst)
  print(f"wrote merged params ({dtype}) to {dst}")


if __name__ == "__main__":
  cli.run(main)
