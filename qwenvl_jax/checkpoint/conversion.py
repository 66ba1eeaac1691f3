"""PyTorch checkpoints <-> the Orbax params checkpoint, streaming one tensor (or block of rows) at a time.

* `torch_to_orbax`: a Hugging Face Qwen-VL / Qwen-VL-Chat directory (`pytorch_model-*.bin` or `*.safetensors`
  with their index, or a single file) -> params checkpoint (`orbax_store`).
* `init_from_pretrained`: OpenCLIP ViT-bigG/14 -> `visual`, Qwen-7B -> `llm`, a freshly initialized `adapter`
  (the paper's stage-1 starting point) -> params checkpoint.
* `orbax_to_torch`: params checkpoint -> `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` +
  `config.json` (+ `generation_config.json`) in the Qwen-VL names, loadable by the reference code.

Every direction first checks the whole mapping against the headers of its input (each expected tensor present
with the right shape, nothing unexpected except an explicit ignore list); problems are reported together, by
name, before anything is written. Data then moves parameter by parameter: a scanned `[L, ...]` parameter is
written one layer at a time and tensors larger than `block_bytes` (the embedding and `lm_head`) in bands of rows,
so peak host memory is about one block plus its transposed copy, not the model. dtypes are kept unless `dtype`
is given (export defaults to bfloat16, the released format).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from qwenvl_jax import errors, new_files, sharding, tree_paths
from qwenvl_jax import text as qtext
from qwenvl_jax.checkpoint import mapping, orbax_store, run_layout, tensor_io
from qwenvl_jax.checkpoint.model_card import (bundled_tokenizer, copy_tokenizer, hf_generation_config,
                                             hf_model_card, model_metadata)
from qwenvl_jax.model import QwenVL
from qwenvl_jax.model.config import QwenVLConfig
from qwenvl_jax.model.resampler import Adapter

DEFAULT_BLOCK_BYTES = 128 * 2**20
DEFAULT_SHARD_BYTES = 2 * 10**9
_WEIGHT_FILE_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".msgpack", ".h5")
_FORMAT = "qwenvl_jax.params/1"


def model_param_shapes(cfg: QwenVLConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Dotted path -> (shape, param dtype) of every parameter of `QwenVL(cfg)`, without allocating it."""
  _, abstract_state = sharding.abstract_model(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
  return orbax_store.param_shapes(abstract_state)


def _parse_dtype(dtype) -> np.dtype | None:
  """None / "keep" -> None (keep the stored dtype); otherwise one of the float dtypes a checkpoint may hold."""
  if dtype is None or dtype == "keep":
    return None
  table = {"bfloat16": tensor_io.BF16, "float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
  key = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  if key not in table:
    raise ValueError(f"unsupported dtype {dtype!r}; use one of keep, {', '.join(table)}")
  return table[key]


def _limited(items: Sequence[str], n: int = 20) -> str:
  items = list(items)
  return ", ".join(items[:n]) + (f" ... and {len(items) - n} more" if len(items) > n else "")


def check_source(table: mapping.Table, bindings: Sequence[mapping.Binding], source: tensor_io.TensorSource) -> None:
  """Raises one ValueError naming every missing, unexpected, mis-shaped or non-float tensor of `source`."""
  expected = {b.torch_name: b for b in bindings}
  present = set(source.names())
  missing = [n for n in expected if n not in present]
  unexpected = sorted(n for n in present if n not in expected and not table.is_ignored(n))
  misshaped, bad_dtype = [], []
  for name, b in expected.items():
    if name in present:
      info = source.info(name)
      if info.shape != b.torch_shape:
        misshaped.append(f"{name} {info.shape} (expected {b.torch_shape})")
      if not np.issubdtype(info.dtype, np.floating) and info.dtype != tensor_io.BF16:
        bad_dtype.append(f"{name} {info.dtype}")
  problems = [f"{label} ({len(names)}): {_limited(names)}" for label, names in
              (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
               ("not floating point", bad_dtype)) if names]
  if missing == [_LM_HEAD] and len(problems) == 1:
    _refuse_without_lm_head(source)
  if problems:
    # A user error (one line from convert): most often the source is another preset's (--preset left out).
    raise errors.ConfigError(f"{source.description} is not a {table.name} checkpoint for this model config: "
                             + "; ".join(problems),
                             hint="the weights are another model's: name its preset (--preset / --model)")


_LM_HEAD, _WTE = "lm_head.weight", "transformer.wte.weight"


def _refuse_without_lm_head(source: tensor_io.TensorSource) -> None:
  """Every tensor but the output layer: a model saved with its output layer tied to the token embedding (safetensors
  and `save_pretrained` store a tied tensor once) or a damaged download, not another model's weights."""
  folder = pathlib.Path(source.description)
  folder = folder if folder.is_dir() else folder.parent
  try:
    tied = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("tie_word_embeddings") is True
  except (OSError, ValueError, AttributeError):  # no readable config.json: it cannot say
    tied = False
  fix = (f"save a copy of {_WTE} as {_LM_HEAD} (Qwen-VL keeps the two apart; in PyTorch: untie them and "
         "save_pretrained again)")
  if tied:
    raise errors.ConfigError(f"{source.description} has no {_LM_HEAD}: its config.json ties the output layer to the "
                             f"token embedding (tie_word_embeddings), so only {_WTE} was saved", hint=fix)
  raise errors.ConfigError(f"{source.description} holds every tensor of the model except the output layer "
                           f"{_LM_HEAD}", hint=f"a download that stopped early: fetch it again; a model saved with "
                           f"tied embeddings: {fix}")


def _import_leaves(table: mapping.Table, source: tensor_io.TensorSource, shapes: Mapping[str, tuple],
                   dtype: np.dtype | None, block_bytes: int) -> dict[str, orbax_store.StreamedArray]:
  """StreamedArrays for every parameter `table` fills from `source` (after `check_source`)."""
  bindings = mapping.bind(table, {k: s for k, (s, _) in shapes.items()})
  check_source(table, bindings, source)
  feeds: dict[str, list[tuple[mapping.Binding, int]]] = {}
  for b in bindings:
    for j, target in enumerate(b.rule.targets):
      feeds.setdefault(target, []).append((b, j))
  leaves = {}
  for target, fed in feeds.items():
    dtypes = {source.info(b.torch_name).dtype for b, _ in fed}
    if dtype is None and len(dtypes) > 1:
      # e.g. one layer's norm saved in float32: the user picks the dtype (one error line, not a traceback)
      raise errors.ConfigError(f"{source.description}: the tensors feeding {target} have mixed dtypes "
                               f"{sorted(map(str, dtypes))}, which one parameter cannot keep",
                               hint="choose the stored dtype with --dtype=bfloat16 (or float32, float16)")
    out_dtype = dtype or dtypes.pop()
    leaves[target] = _leaf(target, fed, source, tuple(shapes[target][0]), out_dtype, block_bytes)
  return leaves


def _leaf(target: str, fed: list[tuple[mapping.Binding, int]], source: tensor_io.TensorSource,
          shape: tuple[int, ...], dtype: np.dtype, block_bytes: int) -> orbax_store.StreamedArray:
  b0, j0 = fed[0]
  transform = b0.rule.transform
  if b0.layer is not None:
    def layer_blocks():
      for b, j in sorted(fed, key=lambda bj: bj[0].layer):
        y = b.rule.transform.forward(source.read(b.torch_name), b.target_shapes)[j]
        yield (b.layer,), np.ascontiguousarray(y, dtype=dtype)
    return orbax_store.StreamedArray(shape, dtype, (1,) + shape[1:], layer_blocks)

  axis = transform.row_block_axis(shape) if transform.n_targets == 1 else None
  nbytes = math.prod(shape) * dtype.itemsize
  if axis is None or nbytes <= block_bytes:
    def whole():
      yield (), np.ascontiguousarray(transform.forward(source.read(b0.torch_name), b0.target_shapes)[j0],
                                     dtype=dtype)
    return orbax_store.StreamedArray(shape, dtype, shape, whole)

  rows = max(1, block_bytes // (nbytes // shape[axis]))
  def row_blocks():
    for r0 in range(0, shape[axis], rows):
      r1 = min(shape[axis], r0 + rows)
      block_shape = shape[:axis] + (r1 - r0,) + shape[axis + 1:]
      y = transform.forward(source.read(b0.torch_name, slice(r0, r1)), [block_shape])[0]
      yield (slice(None),) * axis + (slice(r0, r1),), np.ascontiguousarray(y, dtype=dtype)
  return orbax_store.StreamedArray(shape, dtype, shape[:axis] + (rows,) + shape[axis + 1:], row_blocks)


def _open_pytorch(src: str | os.PathLike) -> tensor_io.TensorSource:
  """`tensor_io.open_checkpoint`, whose 'holds no PyTorch checkpoint' says what the folder is when it is already in
  this library's format: a params checkpoint, or a training run (a LoRA run given to torch_to_orbax)."""
  try:
    return tensor_io.open_checkpoint(src)
  except FileNotFoundError:
    path = pathlib.Path(src)
    if orbax_store.is_params_dir(path):
      raise errors.ConfigError(f"{src} is a params checkpoint, already in this library's format, not a PyTorch one",
                               hint="use it as it is (--checkpoint, --config.init=params:...), or export it to "
                                    "PyTorch with --mode=orbax_to_torch") from None
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir() or run_layout.step_folder(path):
      raise errors.ConfigError(f"{src} is a training run (or one of its steps) of this library, already in its "
                               "format, not a PyTorch checkpoint",
                               hint="use it as it is (--checkpoint), or export it with --mode=orbax_to_torch "
                                    "(a LoRA run: --mode=merge_lora first, or --mode=export_peft)") from None
    raise


def torch_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, cfg: QwenVLConfig, *,
                   source_format: str = "qwen-vl", dtype=None, block_bytes: int = DEFAULT_BLOCK_BYTES,
                   preset: str | None = None, tokenizer: str | None = None, chat_format: str | None = None) -> None:
  """Converts a Qwen-VL PyTorch checkpoint at `src` into a params checkpoint at `dst` (a new directory).

  source_format: "qwen-vl" (all 853 tensors of the 7B model). For the partial sources use
  `init_from_pretrained`. dtype: None/"keep", "bfloat16", "float32" or "float16". preset: the preset name `cfg`
  was built from, recorded with the image size (`model_metadata`) so loaders need not be told again.
  tokenizer / chat_format: what to keep and record instead of what the source folder says (`hf_model_card`).
  """
  table = mapping.TABLES.get(source_format)
  if table is None or set(table.parts) != {"visual", "adapter", "llm"}:
    raise ValueError(f"torch_to_orbax needs a complete model ('qwen-vl'), got {source_format!r}; "
                     "use init_from_pretrained for OpenCLIP / Qwen-7B sources")
  new_files.refuse_existing(dst)
  shapes = model_param_shapes(cfg)
  said_format, said_tokenizer = hf_model_card(src)
  chat_format, tokenizer = chat_format or said_format, tokenizer or said_tokenizer
  with _open_pytorch(src) as source:
    refuse_inside_source(dst, src, what="the Hugging Face folder")  # once it is one ('holds no PyTorch ...')
    leaves = _import_leaves(table, source, shapes, _parse_dtype(dtype), block_bytes)
    _check_complete(leaves, shapes)
    logging.info("converting %d tensors of %s into %d parameters at %s", len(source.names()), src, len(leaves), dst)
    orbax_store.save_params(dst, tree_paths.unflatten(leaves), custom_metadata={
        "format": _FORMAT, "sources": {table.name: str(pathlib.Path(src).absolute())},
        "model": model_metadata(cfg, preset, chat_format=chat_format, tokenizer=bundled_tokenizer(tokenizer))})
  copy_tokenizer(tokenizer, dst)


def init_from_pretrained(dst: str | os.PathLike, cfg: QwenVLConfig, *, openclip: str | os.PathLike,
                         qwen7b: str | os.PathLike, seed: int = 0, dtype=None,
                         block_bytes: int = DEFAULT_BLOCK_BYTES, preset: str | None = None,
                         tokenizer: str | None = None, chat_format: str | None = None) -> None:
  """Stage-1 initialization: the ViT trunk from OpenCLIP ViT-bigG, the LLM from Qwen-7B, a fresh adapter.

  The adapter (resampler, ln_post, proj) is initialized as `QwenVL` would (with `nnx.Rngs(seed)`) and stored
  in float32 unless `dtype` is given.
  """
  new_files.refuse_existing(dst)
  shapes = model_param_shapes(cfg)
  out_dtype = _parse_dtype(dtype)
  said_format, said_tokenizer = hf_model_card(qwen7b)  # Qwen-7B's: a base model, its vocabulary
  chat_format, tokenizer = chat_format or said_format, tokenizer or said_tokenizer
  with _open_pytorch(openclip) as vit, _open_pytorch(qwen7b) as llm:
    refuse_inside_source(dst, qwen7b, what="the Qwen-7B folder", flag="--qwen7b")
    refuse_inside_source(dst, openclip, what="the OpenCLIP folder", flag="--openclip")
    leaves: dict[str, object] = _import_leaves(mapping.OPENCLIP_VIT, vit, shapes, out_dtype, block_bytes)
    leaves.update(_import_leaves(mapping.QWEN7B, llm, shapes, out_dtype, block_bytes))
    leaves.update({f"adapter.{k}": np.asarray(v, dtype=out_dtype or np.float32)
                   for k, v in tree_paths.flatten(_fresh_adapter(cfg, seed)).items()})
    _check_complete(leaves, shapes)
    orbax_store.save_params(dst, tree_paths.unflatten(leaves), custom_metadata={
        "format": _FORMAT, "sources": {"openclip-vit": str(pathlib.Path(openclip).absolute()),
                                       "qwen-7b": str(pathlib.Path(qwen7b).absolute()),
                                       "adapter": f"fresh init, seed {seed}"},
        "model": model_metadata(cfg, preset, chat_format=chat_format, tokenizer=bundled_tokenizer(tokenizer))})
  copy_tokenizer(tokenizer, dst)


def _fresh_adapter(cfg: QwenVLConfig, seed: int) -> dict:
  """The adapter's float32 parameters as `QwenVL` initializes them (one jitted init, not op-by-op)."""
  @jax.jit
  def init():
    adapter = Adapter(cfg.resampler, kv_dim=cfg.vision.width, embed_dim=cfg.llm.width, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(adapter, nnx.Param))
  return init()


def _check_complete(leaves: Mapping[str, object], shapes: Mapping[str, tuple]) -> None:
  orbax_store.check_tree({k: (tuple(v.shape), None) for k, v in leaves.items()}, shapes, "the converted tree")


def refuse_inside_source(dst, src, *, what: str = "the params checkpoint", flag: str = "--src") -> None:
  """An output inside the folder it is made from (`what`, given as `flag`: a params checkpoint, a Hugging Face
  download) would add a folder to it, which the user then copies, uploads or hashes with it; refused in one line.
  Local paths only. A single-file source is no folder: an output next to it is fine."""
  if "://" in str(dst) or "://" in str(src):
    return
  dst_path, src_path = pathlib.Path(os.path.realpath(dst)), pathlib.Path(os.path.realpath(src))  # links resolved
  if src_path in dst_path.parents:
    raise errors.ConfigError(f"--dst={dst} is inside {what} {flag}={src}, which it would change",
                             hint="write it outside that folder, e.g. next to it")


def _export_plans(reader: orbax_store.ParamReader, shapes: Mapping[str, tuple], dtype: np.dtype | None,
                  block_bytes: int) -> list[tensor_io.TensorPlan]:
  bindings = mapping.bind(mapping.QWENVL, {k: s for k, (s, _) in shapes.items()})
  plans = []
  for b in bindings:
    stored = {reader.shapes[t][1] for t in b.rule.targets}
    if dtype is None and len(stored) > 1:
      raise errors.ConfigError(f"{b.torch_name} would join parameters of mixed dtypes {sorted(map(str, stored))}",
                               hint="choose the exported dtype with --dtype=bfloat16 (or float32, float16)")
    plans.append(tensor_io.TensorPlan(b.torch_name, b.torch_shape, dtype or stored.pop(),
                                      _export_blocks(reader, b, dtype, block_bytes)))
  return plans


def _export_blocks(reader, b: mapping.Binding, dtype, block_bytes):
  transform = b.rule.transform
  prefix = () if b.layer is None else (b.layer,)
  shape = b.target_shapes[0]
  axis = transform.row_block_axis(shape) if transform.n_targets == 1 else None
  nbytes = math.prod(shape) * reader.shapes[b.rule.targets[0]][1].itemsize

  def cast(x):
    return np.ascontiguousarray(x if dtype is None else x.astype(dtype))

  def whole() -> Iterable[np.ndarray]:
    ys = [reader.read(t, prefix) for t in b.rule.targets]
    yield cast(transform.inverse(ys, b.target_shapes))

  def row_blocks() -> Iterable[np.ndarray]:
    rows = max(1, block_bytes // (nbytes // shape[axis]))
    for r0 in range(0, shape[axis], rows):
      r1 = min(shape[axis], r0 + rows)
      index = prefix + (slice(None),) * axis + (slice(r0, r1),)
      block_shape = shape[:axis] + (r1 - r0,) + shape[axis + 1:]
      yield cast(transform.inverse([reader.read(b.rule.targets[0], index)], [block_shape]))

  return whole if axis is None or nbytes <= block_bytes else row_blocks


def orbax_to_torch(src: str | os.PathLike, dst: str | os.PathLike, cfg: QwenVLConfig, *, dtype="bfloat16",
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES, block_bytes: int = DEFAULT_BLOCK_BYTES,
                   reference_files: str | os.PathLike | None = None, tokenizer: str | None = None,
                   chat_format: str | None = None) -> dict:
  """Exports a params checkpoint to the Hugging Face Qwen-VL format in the new directory `dst`.

  Writes `model-0000k-of-0000n.safetensors` (shards of at most `max_shard_bytes`, a bigger tensor alone),
  `model.safetensors.index.json` and `config.json` (Qwen-VL keys, `visual.image_size` from `cfg`). With
  `reference_files` (a Hugging Face Qwen-VL directory) its code and tokenizer files are copied beside them so the
  export loads with `trust_remote_code` (`missing_reference_files` names what an export lacks). `tokenizer`: the spec
  of the source's own tokenizer (a run's, or the copy a params checkpoint keeps) or the user's
  (`check_export_tokenizer`); a Qwen vocabulary is copied as `qwen.tiktoken`, in place of the reference's.
  `chat_format`: the one the weights were trained for ('chatml' / 'raw', None: unknown), written as
  `generation_config.json` (`hf_generation_config`) unless `reference_files` brings one: that one is kept, with its
  chat format set to `chat_format` when it says another (the reference's folder describes the reference's weights).
  Everything is written to `dst.partial` and renamed at the end. Returns the index dict.
  """
  new_files.refuse_url(dst)  # before pathlib makes gs://b/x a local gs:/b/x
  dst = pathlib.Path(dst)
  new_files.refuse_existing(dst)
  refuse_inside_source(dst, src)
  new_files.refuse_existing(new_files.partial_folder(dst))
  out_dtype = _parse_dtype(dtype)
  if chat_format is not None:
    hf_generation_config(chat_format)  # an unknown one is refused before the shards are written
  shapes = model_param_shapes(cfg)
  reader = orbax_store.ParamReader(src)
  quantization = reader.custom_metadata.get("quantization")
  if quantization:  # its qvalue/scale leaves read as "another model's" weights
    origin = (reader.custom_metadata.get("sources") or {}).get("params")
    origin = f" ({origin})" if origin else ""
    raise errors.ConfigError(f"checkpoint {src} is quantized ({quantization.get('mode', quantization)}); the "
                             "Hugging Face format holds float weights",
                             hint=f"export the float checkpoint it was quantized from{origin}")
  orbax_store.check_tree(reader.shapes, shapes, f"checkpoint {src}")
  if reference_files is not None and not pathlib.Path(reference_files).is_dir():  # before the hours of writing
    raise FileNotFoundError(f"reference directory {reference_files} does not exist")
  plans = _export_plans(reader, shapes, out_dtype, block_bytes)
  with new_files.new_folder(dst) as tmp:  # a half-written export is removed, or left as DST.partial by a kill
    index = tensor_io.write_safetensors_shards(tmp, plans, max_shard_bytes=max_shard_bytes)
    torch_dtype = str(np.dtype(plans[0].dtype).name)
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg, torch_dtype=torch_dtype), indent=2) + "\n")
    if _is_qwen_vocabulary(tokenizer):
      copy_tokenizer(tokenizer, tmp)  # as qwen.tiktoken, the name the reference's tokenizer reads
    if reference_files is not None:
      _copy_reference_files(pathlib.Path(reference_files), tmp)
    if chat_format is not None:
      _write_generation_config(tmp / "generation_config.json", chat_format)
  logging.info("exported %d tensors (%d bytes) to %s", len(plans), index["metadata"]["total_size"], dst)
  return index


# What a Hugging Face Qwen-VL folder holds besides its weights and config.json: the code transformers runs with
# trust_remote_code, and the tokenizer's files (QWENVL_SPEC §0).
REFERENCE_FILES = ("configuration_qwen.py", "modeling_qwen.py", "visual.py", "qwen_generation_utils.py",
                   "tokenization_qwen.py", "tokenizer_config.json", "qwen.tiktoken", "generation_config.json")


def missing_reference_files(export: str | os.PathLike) -> list[str]:
  """The `REFERENCE_FILES` an `orbax_to_torch` export lacks (without them transformers cannot load it, nor its
  tokenizer)."""
  return [name for name in REFERENCE_FILES if not (pathlib.Path(export) / name).is_file()]


def generation_config_note(export: str | os.PathLike, chat_format: str | None, *, src: str,
                           reference_files: str | os.PathLike | None = None, flag_given: bool = False) -> str | None:
  """What to tell about the `generation_config.json` of an `orbax_to_torch(src, export, chat_format=...,
  reference_files=...)` export (`flag_given`: chat_format came from --chat_format), or None: that it has none,
  which the reference's `model.chat` needs, and how to get one; or that the copy from `reference_files` now says
  another chat format than theirs."""
  if not (pathlib.Path(export) / "generation_config.json").is_file():
    return (f"{export} has no generation_config.json, which the reference's model.chat reads (chat format, stop "
            f"and sampling settings), as {src} records no chat format: export again with --chat_format=chatml (a "
            "chat model) or --chat_format=raw (a base model)")
  theirs = hf_model_card(reference_files)[0] if reference_files is not None and chat_format else None
  if theirs and theirs != chat_format:
    said = "--chat_format says" if flag_given else f"{src} records"
    return (f"the generation_config.json of --reference_files={reference_files} says chat_format '{theirs}'; the "
            f"export's copy says '{chat_format}', as {said} (the rest is theirs)")
  return None


def check_export_tokenizer(spec: str) -> None:
  """Refuses, in one line, a tokenizer given for an export (`orbax_to_torch(tokenizer=spec)`, copied as its
  `qwen.tiktoken`) that the reference's tokenizer code cannot read: a SentencePiece model (`tokenization_qwen.py`
  loads a Qwen vocabulary only), or a file that does not exist. Called before anything is written."""
  kind, path = qtext.parse_tokenizer_spec(spec)
  if kind != "qwen":
    raise errors.ConfigError(f"--tokenizer={spec} is a SentencePiece model, which the reference's tokenizer code "
                             "(tokenization_qwen.py) cannot read: it loads a Qwen vocabulary, qwen.tiktoken",
                             hint="give a Qwen vocabulary (qwen:PATH or a .tiktoken file), or leave --tokenizer out")
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"tokenizer file {path!r} does not exist (it is copied into the export)")


def _is_qwen_vocabulary(spec: str | None) -> bool:
  """Whether tokenizer `spec` names an existing Qwen vocabulary (a SentencePiece one is no use to the reference)."""
  try:
    kind, path = qtext.parse_tokenizer_spec(spec) if spec else (None, "")
  except ValueError:
    return False
  return kind == "qwen" and epath.Path(path).is_file()


def _copy_reference_files(ref: pathlib.Path, out: pathlib.Path) -> None:
  for f in sorted(ref.iterdir()):
    if (f.is_file() and not f.name.endswith(_WEIGHT_FILE_SUFFIXES) and not f.name.endswith(".index.json")
        and f.name != "config.json" and not (out / f.name).exists()):
      shutil.copy2(f, out / f.name)


def _write_generation_config(path: pathlib.Path, chat_format: str) -> None:
  """Writes `hf_generation_config(chat_format)` to `path`, or sets the chat format of the copy already there (from
  --reference_files; a file that is no JSON object is left as copied)."""
  config = hf_generation_config(chat_format)
  if path.exists():
    try:
      config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
      return
    if not isinstance(config, dict) or config.get("chat_format") == chat_format:
      return
    config["chat_format"] = chat_format
  # transformers' own layout (GenerationConfig.save_pretrained), in which the released files were written
  path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _mlp_ratio(width: int, mlp_dim: int) -> float:
  """A ratio the reference turns back into `mlp_dim` with int(width * ratio) (4.9231 for ViT-bigG)."""
  for ratio in (round(mlp_dim / width, 4), (mlp_dim + 0.5) / width):
    if int(width * ratio) == mlp_dim:
      return ratio
  raise ValueError(f"no mlp_ratio reproduces mlp_dim {mlp_dim} from width {width}")


def hf_config(cfg: QwenVLConfig, *, torch_dtype: str = "bfloat16") -> dict:
  """The Qwen-VL `config.json` (QWENVL_SPEC §0) for `cfg`."""
  v, llm = cfg.vision, cfg.llm
  if cfg.resampler.grid != 16 or cfg.resampler.heads != llm.width // 128:
    logging.warning("the reference code hard-codes 256 queries and width // 128 resampler heads; this config "
                    "(grid %d, heads %d) will not load there", cfg.resampler.grid, cfg.resampler.heads)
  return {
      "architectures": ["QWenLMHeadModel"],
      "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                   "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
      "model_type": "qwen",
      "attn_dropout_prob": 0.0, "emb_dropout_prob": 0.0,
      "bf16": False, "fp16": False, "fp32": False,
      "hidden_size": llm.width,
      "initializer_range": 0.02,
      "intermediate_size": 2 * llm.mlp_dim,  # the reference halves it (Gotcha 2)
      "kv_channels": llm.head_dim,
      "layer_norm_epsilon": llm.rms_eps,
      "max_position_embeddings": 8192,
      "no_bias": True,
      "num_attention_heads": llm.heads,
      "num_hidden_layers": llm.layers,
      "onnx_safe": None,
      "rotary_emb_base": llm.rope_base,
      "rotary_pct": 1.0,
      "scale_attn_weights": True,
      "seq_length": llm.seq_length,
      "tie_word_embeddings": False,
      "tokenizer_type": "QWenTokenizer",
      "torch_dtype": torch_dtype,
      "use_cache": True,
      "use_dynamic_ntk": True,
      "use_flash_attn": False,
      "use_logn_attn": True,
      "visual": {
          "heads": v.heads, "image_size": v.image_size, "image_start_id": cfg.image_pad_id - 2,
          "layers": v.layers, "mlp_ratio": _mlp_ratio(v.width, v.mlp_dim), "output_dim": llm.width,
          "patch_size": v.patch_size, "width": v.width,
      },
      "vocab_size": llm.vocab_size,
  }
