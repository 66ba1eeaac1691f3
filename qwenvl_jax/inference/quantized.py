"""Quantized models for inference: quantize a float params checkpoint while restoring it, or restore a checkpoint
that was quantized once (`python -m qwenvl_jax.convert --mode=quantize`).

Peak memory of load-time quantization: the quantized model plus ONE float parameter (the largest, the 9.6B
model's stacked `w1`, is 2.9 GB in bf16): every quantized kernel is restored alone (Orbax partial restore,
straight into its sharding), quantized by a jitted `model.quantize.quantize_array` whose outputs are placed in
the quantized model's shardings, and dropped before the next one is read. So int8 serving of the 9.6B model
never needs the 19.3 GB of bf16 weights on the chip at once.

A quantized params checkpoint is an ordinary params checkpoint (DESIGN §2.3) of the quantized tree — `qvalue`
(int8/int4) and `scale` (float32) in place of each `kernel`/`embedding` — whose `custom_metadata` carries
`{"quantization": QuantConfig.to_json()}`; `load_quantized_model` reads that to rebuild the same structure.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp
from flax import nnx

from qwenvl_jax import errors, sharding
from qwenvl_jax.checkpoint import orbax_store
from qwenvl_jax.model import QwenVL
from qwenvl_jax.model import quantize as qlib
from qwenvl_jax.model.config import QwenVLConfig
from qwenvl_jax.tree_paths import flatten, unflatten

FORMAT = "qwenvl_jax.params/1"


def checkpoint_quantization(path: str | os.PathLike) -> qlib.QuantConfig | None:
  """The QuantConfig a params checkpoint was saved with, or None for a float checkpoint."""
  meta = orbax_store.ParamReader(path).custom_metadata
  q = meta.get("quantization")
  return qlib.QuantConfig.from_json(q) if q else None


def abstract_quantized(cfg: QwenVLConfig, qcfg: qlib.QuantConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract state) of `QwenVL(cfg)` quantized by `qcfg`, allocating nothing."""
  return sharding.abstract_model(lambda: qlib.quantize_model(QwenVL(cfg, rngs=nnx.Rngs(0)), qcfg))


def _partial_restore(path, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """The dotted-path leaves `targets` of a params checkpoint, restored into their shardings and dtypes."""
  item = unflatten(targets)
  restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape,
                                                             dtype=t.dtype), item)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(orbax_store._resolve(path),  # pylint: disable=protected-access
                                    args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                partial_restore=True))
  return flatten(restored)


def _targets(state: nnx.State, shardings: nnx.State) -> dict[str, jax.ShapeDtypeStruct]:
  values, specs = flatten(nnx.to_pure_dict(state)), flatten(nnx.to_pure_dict(shardings))
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=specs[k]) for k, v in values.items()}


def _quantize_leaves(read_float: Callable[[list[str]], dict[str, jax.Array]], cfg: QwenVLConfig,
                     qcfg: qlib.QuantConfig, mesh: jax.sharding.Mesh, rules: sharding.Rules) -> QwenVL:
  """The quantized model, reading float parameters through `read_float(dotted paths)` one kernel at a time."""
  float_model = nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
  sources = qlib.source_map(float_model, qcfg)
  graphdef, abstract_state = abstract_quantized(cfg, qcfg)
  targets = _targets(abstract_state, sharding.state_shardings(abstract_state, rules, mesh))
  quantized_paths = {f"{m.replace('/', '.')}.{leaf}" for m in sources for leaf in ("qvalue", "scale")}
  values = read_float(sorted(k for k in targets if k not in quantized_paths))
  for module, (src, contracted) in sources.items():
    dotted = module.replace("/", ".")
    qv, sc = targets[f"{dotted}.qvalue"], targets[f"{dotted}.scale"]
    fn = jax.jit(lambda w, c=contracted: qlib.quantize_array(w, c, qcfg), out_shardings=(qv.sharding, sc.sharding))
    w = read_float([src.replace("/", ".")])[src.replace("/", ".")]
    values[f"{dotted}.qvalue"], values[f"{dotted}.scale"] = fn(w)
    w.delete()  # free the float kernel before the next one is read
  state = jax.tree.map(lambda x: x, abstract_state)
  nnx.replace_by_pure_dict(state, unflatten(values))
  return nnx.merge(graphdef, state)


def quantize_checkpoint_on_load(path: str | os.PathLike, cfg: QwenVLConfig, qcfg: qlib.QuantConfig,
                                mesh: jax.sharding.Mesh, rules: sharding.Rules) -> QwenVL:
  """A quantized `QwenVL(cfg)` from a float params checkpoint, quantized one kernel at a time while restoring."""
  reader = orbax_store.ParamReader(path)
  if reader.custom_metadata.get("quantization"):
    raise errors.ConfigError(f"checkpoint {path} is already quantized", hint="load it without quantizing "
                             "again, or quantize the float checkpoint it was made from")
  float_graphdef, float_state = sharding.abstract_model(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
  del float_graphdef
  orbax_store.check_tree(reader.shapes, orbax_store.param_shapes(float_state), f"checkpoint {path}")
  float_targets = _targets(float_state, sharding.state_shardings(float_state, rules, mesh))
  return _quantize_leaves(lambda names: _partial_restore(path, {k: float_targets[k] for k in names}),
                          cfg, qcfg, mesh, rules)


def quantize_sharded(model: QwenVL, qcfg: qlib.QuantConfig, mesh: jax.sharding.Mesh,
                     rules: sharding.Rules) -> QwenVL:
  """A quantized copy of a float `model` (e.g. random weights), built with the same leaf-by-leaf placement.

  The float model's kernels are deleted as they are quantized: `model` must not be used afterwards.
  """
  flat = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return _quantize_leaves(lambda names: {k: flat.pop(k) for k in names}, model.cfg, qcfg, mesh, rules)


def load_quantized_model(path: str | os.PathLike, cfg: QwenVLConfig, mesh: jax.sharding.Mesh,
                         rules: sharding.Rules, expected: qlib.QuantConfig | None = None) -> QwenVL:
  """Restores a checkpoint written by `save_quantized` (int8/int4 straight onto the mesh, no float copy).

  expected: when given, the checkpoint's quantization must be this one (else a ValueError says both).
  """
  stored = checkpoint_quantization(path)
  if stored is None:
    raise ValueError(f"checkpoint {path} is not quantized")
  if expected is not None and expected != stored:
    raise ValueError(f"checkpoint {path} is quantized as {stored.to_json()}, but {expected.to_json()} was asked "
                     "for: drop --quantize to use it as stored, or quantize the float checkpoint")
  graphdef, abstract_state = abstract_quantized(cfg, stored)
  shardings = sharding.state_shardings(abstract_state, rules, mesh)
  return nnx.merge(graphdef, orbax_store.restore_params(path, abstract_state, shardings))


def save_quantized(model: QwenVL, path: str | os.PathLike, qcfg: qlib.QuantConfig, *,
                   sources: dict | None = None, model_info: dict | None = None,
                   dtypes: Mapping[str, Any] | None = None) -> None:
  """Writes a quantized model's parameters as a params checkpoint at `path` (a new directory).

  dtypes: dotted path -> the dtype to store a leaf left unquantized in (norms, biases, ...; a loader casts them to
  its own dtype); the leaves it does not name, and every `qvalue` and its `scale`, are stored as in `model`.
  """
  if not qlib.is_quantized(model):
    raise ValueError("save_quantized needs a quantized model (model.quantize.quantize_model)")
  flat = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  codes = {k[:-len("qvalue")] + leaf for k in flat if k.endswith(".qvalue") for leaf in ("qvalue", "scale")}
  cast = {k: d for k, d in (dtypes or {}).items() if k in flat and k not in codes}
  tree = unflatten({k: v.astype(cast[k]) if k in cast else v for k, v in flat.items()})
  meta = {"format": FORMAT, "quantization": qcfg.to_json(), "sources": sources or {},
          **({"model": model_info} if model_info else {})}
  orbax_store.save_params(path, tree, custom_metadata=meta)
