"""The inference layout: which mesh a model is decoded on, and which tensor-parallel degrees a model allows.

Two layouts, picked by the rule table (`qwenvl_jax/sharding_rules.py`):
  * `inference_tp` (the default of generate, evaluate, serve and `qwenvl_jax.load`): a (`data`, `tensor`) mesh.
    `tensor` = T chips hold one replica of the model, each a 1/T slice of every head-, MLP- and vocabulary-split
    weight (Megatron); `data` = the remaining devices / T replicas, each decoding its own rows (batch rows,
    serving slots, KV-cache rows). T defaults to the chips of one host (the largest degree the model allows), so
    the per-layer all-reduces stay on the host's fast links and hosts share nothing but the batch.
  * a table that splits weights over `fsdp` (`fsdp`, `fsdp_tp`: what training uses): a (`fsdp`, `tensor`) mesh
    with `fsdp` = the rest. Every decode step then all-gathers each weight it reads (kept for comparisons and for
    models too large for one host's tensor group).

A tensor degree T is valid when it divides every dimension the rules put on `tensor`: at full size (Qwen-VL:
LLM 32 heads, MLP 11008, vocabulary 151936; adapter 32 heads, width 4096; ViT-bigG 16 heads, MLP 8192) the
valid degrees are 1, 2, 4, 8 and 16; the tiny preset (ViT and adapter 2 heads) allows 1 and 2. Anything else is one
`errors.ConfigError` line naming the dimensions and the valid degrees (the shape-aware resolver would otherwise
quietly replicate a weight that does not divide).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh

from qwenvl_jax import errors, sharding, sharding_rules
from qwenvl_jax.model import QwenVL
from qwenvl_jax.model.config import QwenVLConfig

DEFAULT_RULES = sharding_rules.INFERENCE_DEFAULT


def tensor_dims(cfg: QwenVLConfig, rules: sharding.Rules) -> dict[str, int]:
  """{logical axis: the gcd of its sizes over the model's parameters} for every logical axis of a parameter of
  `QwenVL(cfg)` that `rules` split over `tensor` (abstract: nothing is allocated)."""
  _, state = sharding.abstract_model(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
  dims: dict[str, int] = {}
  for variable in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    if not isinstance(variable, nnx.Variable):
      continue
    for size, logical in zip(variable.shape, sharding.logical_axes_of(variable)):
      if logical is not None and "tensor" in sharding.rule_axes(rules, logical):
        dims[logical] = math.gcd(dims.get(logical, 0), int(size))
  return dims


def valid_tensor_degrees(cfg: QwenVLConfig, rules: sharding.Rules, limit: int | None = None) -> list[int]:
  """The tensor-parallel degrees (up to `limit`, default the common divisor itself) dividing every dimension the
  rules put on `tensor` (`tensor_dims`); [1] when the rules put nothing there."""
  dims = tensor_dims(cfg, rules)
  common = math.gcd(*dims.values()) if dims else 1
  top = common if limit is None else min(common, limit)
  return [d for d in range(1, top + 1) if common % d == 0]


def check_tensor_degree(cfg: QwenVLConfig, rules: sharding.Rules, degree: int, *, flag: str = "--tensor_parallel"
                        ) -> None:
  """Raises `errors.ConfigError` (one line) unless `degree` divides every dimension the rules put on `tensor`."""
  if degree < 1:
    raise errors.ConfigError(f"{flag}={degree}: the tensor-parallel degree must be >= 1 (0 = one host's chips)")
  dims = tensor_dims(cfg, rules)
  bad = {k: v for k, v in sorted(dims.items()) if v % degree}
  if bad:
    shown = ", ".join(f"{k} {v}" for k, v in bad.items())
    valid = ", ".join(map(str, valid_tensor_degrees(cfg, rules)))
    raise errors.ConfigError(f"{flag}={degree} does not divide the model's {shown}",
                             hint=f"valid tensor-parallel degrees for this model: {valid}")


def default_tensor_degree(cfg: QwenVLConfig, rules: sharding.Rules, chips_per_host: int) -> int:
  """The largest valid degree that divides `chips_per_host` (1 when the rules split nothing over `tensor`)."""
  return max(d for d in valid_tensor_degrees(cfg, rules, chips_per_host) if chips_per_host % d == 0)


def uses_fsdp(rules: sharding.Rules) -> bool:
  """Whether the table splits some weight over `fsdp` (a training table: its rest-of-the-devices axis is `fsdp`)."""
  return any("fsdp" in sharding.rule_axes(rules, name) for name, _ in rules if not name.startswith(("act_", "cache_")))


def make_inference_mesh(cfg: QwenVLConfig, rules_name: str = DEFAULT_RULES, *, tensor_parallel: int = 0,
                   mesh_axes: Mapping[str, int] | None = None,
                   devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, sharding.Rules]:
  """(mesh, rule table) of the inference layout for `cfg` over `devices` (default: all of the job's).

  tensor_parallel: T (0 = the default: the largest valid degree dividing one host's chips for a table that splits
    weights over `tensor`, else 1). The other axis (`data`, or `fsdp` for a training table) takes the rest.
  mesh_axes: explicit ICI degrees of the (data, fsdp, tensor) mesh instead (one may be -1; 0 = not given, so an
    all-zero dict is the default layout); their `tensor` degree is checked like T.

  Raises:
    errors.ConfigError: an unknown table, a T the model does not allow, or degrees that do not match the devices.
  """
  try:
    rules = sharding.load_rules(rules_name)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from e
  devices = list(jax.devices() if devices is None else devices)
  mesh_axes = {k: int(v) for k, v in (mesh_axes or {}).items() if v}
  if mesh_axes:
    ici = dict(mesh_axes)
    if tensor_parallel and ici.get("tensor", 1) not in (tensor_parallel, 1):
      raise errors.ConfigError(f"--tensor_parallel={tensor_parallel} contradicts the mesh's tensor degree "
                               f"{ici['tensor']}")
    if tensor_parallel:
      ici["tensor"] = tensor_parallel
  else:
    per_host = len([d for d in devices if d.process_index == devices[0].process_index])
    t = tensor_parallel or default_tensor_degree(cfg, rules, per_host)
    ici = {"fsdp" if uses_fsdp(rules) else "data": -1, "tensor": t}
  t = int(ici.get("tensor", 1))
  check_tensor_degree(cfg, rules, t)
  if len(devices) % t:
    raise errors.ConfigError(f"--tensor_parallel={t} does not divide the {len(devices)} devices",
                             hint="use a divisor of the device count (0 = one host's chips)")
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  dcn = None
  if num_slices > 1 and not mesh_axes:
    # Replicas across slices: only the batch crosses the slow links, never a weight or an activation.
    rest = "fsdp" if uses_fsdp(rules) else "data"
    dcn = {rest: num_slices}
  try:
    mesh = sharding.make_mesh(ici, dcn, devices=devices)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from e
  return mesh, rules


def check_slots(num_slots: int, mesh: Mesh, rules: sharding.Rules, *, flag: str = "--num_slots",
                tensor_flag: str = "--tensor_parallel") -> None:
  """Raises `errors.ConfigError` (one line) unless `num_slots` serving slots split over the mesh's model replicas
  (the axes of the rules' `act_batch`): what `serve` refuses, and so `inference_plan --server` too.

  flag, tensor_flag: how the caller spells the slot count and the tensor-parallel degree.
  """
  replicas = sharding.batch_shards(mesh, rules)
  if num_slots % replicas:
    raise errors.ConfigError(f"{flag}={num_slots} does not split over the {replicas} model replicas of the mesh "
                             f"({describe(mesh)})", hint=f"use a multiple of {replicas}, or a larger {tensor_flag} "
                             "(fewer replicas)")


def describe(mesh: Mesh) -> str:
  """'data 2 x tensor 4' (axes of size > 1; 'one device' when none)."""
  parts = [f"{a} {n}" for a, n in mesh.shape.items() if n > 1]
  return " x ".join(parts) if parts else "one device"
