"""Logical axis names -> device meshes: rule tables, mesh construction, sharded init, activation constraints.

All of the NNX sharding plumbing lives here (and in the optimizer module), so model code only ever names logical
axes (`embed`, `mlp`, `vit_heads`, `act_batch`, ...). A rule table is data (`qwenvl_jax/sharding_rules.py`): an
ordered tuple of `(logical_name, mesh_axes)` pairs, where `mesh_axes` is a mesh axis name, a tuple of them, or
None (replicated). Resolution is shape-aware: a mesh axis is used for a dimension only if it is not yet used by
another dimension of the same array and the dimension stays divisible, so one table serves every model size.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from qwenvl_jax import sharding_rules

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("qwenvl_sharding", default=None)


def load_rules(name: str) -> Rules:
  """The rule table `name` (e.g. "fsdp", "fsdp_tp") of `qwenvl_jax/sharding_rules.py`."""
  tables = sharding_rules.RULES
  if name not in tables:
    raise ValueError(f"unknown sharding rules {name!r}; known: {sorted(tables)}")
  return tuple(tables[name])


def axis_names(mesh_axes) -> tuple[str, ...]:
  """The mesh axes of a rule's or a PartitionSpec's entry (None, one name or several) as a tuple."""
  if mesh_axes is None:
    return ()
  if isinstance(mesh_axes, str):
    return (mesh_axes,)
  return tuple(mesh_axes)


def resolve_spec(shape: Sequence[int], logical_axes: Sequence[str | None], rules: Rules,
                 mesh_shape: Mapping[str, int]) -> PartitionSpec:
  """The PartitionSpec of an array of `shape` whose dims carry `logical_axes`, under `rules` on a mesh.

  For each dim, the first rule naming its logical axis lists candidate mesh axes; each candidate is kept if the
  mesh has it with size > 1, no earlier dim of this array uses it, and the dim stays divisible by the product of
  the kept axes. Unknown logical names are an error (a typo would silently replicate a 7B tensor).
  """
  if len(shape) != len(logical_axes):
    raise ValueError(f"shape {tuple(shape)} has {len(shape)} dims but {len(logical_axes)} logical axes")
  table: dict[str, tuple[str, ...]] = {}
  for logical, mesh_axes in rules:
    table.setdefault(logical, axis_names(mesh_axes))
  used: set[str] = set()
  out = []
  for dim, logical in zip(shape, logical_axes):
    if logical is None:
      out.append(None)
      continue
    if logical not in table:
      raise KeyError(f"logical axis {logical!r} has no rule; add it to the rule table")
    kept = []
    for axis in table[logical]:
      size = mesh_shape.get(axis, 1)
      if size == 1 or axis in used:
        continue
      if dim % (math.prod(mesh_shape[a] for a in kept) * size):
        continue
      kept.append(axis)
    used.update(kept)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*out)


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
  """The logical axis names recorded on an NNX variable (empty for scalars and unannotated variables)."""
  names = variable.get_metadata().get("out_sharding")
  return tuple(names) if names else (None,) * len(variable.shape)


def state_specs(state: nnx.State, rules: Rules, mesh_shape: Mapping[str, int]) -> nnx.State:
  """PartitionSpecs (as an nnx.State of the same structure) for every variable of `state`."""
  def spec(variable):
    return resolve_spec(variable.shape, logical_axes_of(variable), rules, mesh_shape)
  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, rules: Rules, mesh: Mesh) -> nnx.State:
  """NamedShardings on `mesh` for every variable of `state` (abstract or concrete)."""
  specs = state_specs(state, rules, dict(mesh.shape))
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def make_mesh(ici: Mapping[str, int], dcn: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh from per-axis ICI degrees and, for multi-slice, DCN degrees.

  At most one ICI degree may be -1 (filled from the device count). The product of all degrees must equal the
  number of devices; otherwise the error says which degrees were asked and how many devices there are.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = dict(dcn or {})
  unknown = (set(ici) | set(dcn)) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
  dcn_shape = [int(dcn.get(a, 1)) for a in MESH_AXES]
  ici_shape = [int(ici.get(a, 1)) for a in MESH_AXES]
  if any(d < 1 for d in dcn_shape):
    raise ValueError(f"DCN degrees must be >= 1, got {dcn}")
  per_slice, rem = divmod(len(devices), math.prod(dcn_shape))
  if rem:
    raise ValueError(f"DCN degrees {dict(zip(MESH_AXES, dcn_shape))} do not divide {len(devices)} devices")
  if ici_shape.count(-1) > 1:
    raise ValueError(f"at most one ICI degree may be -1, got {dict(ici)}")
  if -1 in ici_shape:
    known = math.prod(d for d in ici_shape if d != -1)
    if known <= 0 or per_slice % known:
      raise ValueError(f"ICI degrees {dict(ici)} do not divide the {per_slice} devices of a slice")
    ici_shape[ici_shape.index(-1)] = per_slice // known
  if math.prod(ici_shape) != per_slice or any(d < 1 for d in ici_shape):
    raise ValueError(
        f"mesh ICI {dict(zip(MESH_AXES, ici_shape))} x DCN {dict(zip(MESH_AXES, dcn_shape))} needs "
        f"{math.prod(ici_shape) * math.prod(dcn_shape)} devices, but there are {len(devices)}")
  if math.prod(dcn_shape) > 1:
    device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  else:
    try:
      device_array = mesh_utils.create_device_mesh(ici_shape, devices)
    except (AssertionError, NotImplementedError, ValueError):
      # CPU and some GPU platforms have no physical topology to optimize for.
      device_array = np.asarray(devices).reshape(ici_shape)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rule_axes(rules: Rules, logical: str) -> tuple[str, ...]:
  """The mesh axes the first rule for the logical axis `logical` lists (empty: replicated).

  Raises:
    KeyError: no rule names `logical`.
  """
  for name, mesh_axes in rules:
    if name == logical:
      return axis_names(mesh_axes)
  raise KeyError(f"logical axis {logical!r} has no rule; add it to the rule table")


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
  """The mesh axes a batch's leading dimension is split over: those of the `act_batch` rule the mesh has."""
  return tuple(a for a in rule_axes(rules, "act_batch") if a in mesh.axis_names)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
  """The sharding of a batch array of rank `ndim` (>= 1): the leading axis over `batch_axes`, the rest
  replicated. Not shape-aware on purpose: a batch that does not divide is an error of the caller, not replicated."""
  axes = batch_axes(mesh, rules)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh, rules: Rules) -> int:
  """Into how many parts `batch_sharding` splits the leading axis (the data-parallel degree)."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def active_rules() -> tuple[Mesh, Rules] | None:
  """(mesh, rules) of the enclosing `use_rules`, or None outside of one (what `constrain` reads)."""
  return _ACTIVE.get()


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
  """Within this context `constrain` pins activations to `mesh` under `rules` (it is a no-op outside)."""
  token = _ACTIVE.set((mesh, rules))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVE.reset(token)


def active_spec(shape: Sequence[int], logical_axes: Sequence[str | None]) -> tuple[Mesh, PartitionSpec] | None:
  """(mesh, PartitionSpec) of an array of `shape` whose dims carry `logical_axes` under the enclosing `use_rules`
  (`resolve_spec`), or None outside of one: what `constrain` pins, and what a `shard_map` of such arrays takes."""
  active = _ACTIVE.get()
  if active is None:
    return None
  mesh, rules = active
  return mesh, resolve_spec(shape, logical_axes, rules, dict(mesh.shape))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names, using the rules of the enclosing `use_rules` (if any)."""
  placed = active_spec(x.shape, logical_axes)
  if placed is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(*placed))


def abstract_model(make_model: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract state) of the model `make_model()` builds, allocating nothing."""
  return nnx.split(nnx.eval_shape(make_model))


def run_once_compiler_options(mesh: Mesh) -> dict | None:
  """XLA options for a program that runs once (a model's random init) on `mesh`'s devices, or None for the defaults.

  On the CPU, LLVM at XLA's default level spent 15.0 s compiling the tiny model's init (threefry's unrolled hashes:
  3,300 lines of HLO), which then ran in 0.01 s; at -O0 with the older fusion emitters, 2.3 s and 0.05 s; at -O0
  alone (all that jaxlib 0.11 offers: it dropped the emitters flag), 3.6 s (jaxlib 0.10.2, a 2-core VM). That was
  half of a CPU training's start and most of a random-weights `generate`'s. The values differ from the default
  level's at float32 round-off (6e-8 at most for the tiny model): every caller of `init_sharded` compiles with these
  same options. Accelerators compile as they do."""
  if mesh.devices.flat[0].platform != "cpu":
    return None
  from jaxlib import version  # pylint: disable=import-outside-toplevel
  options = {"xla_backend_optimization_level": 0}
  if tuple(int(part) for part in version.__version__.split(".")[:2]) < (0, 11):
    options["xla_cpu_use_fusion_emitters"] = False
  return options


def init_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh, rules: Rules) -> nnx.Module:
  """Builds the model with every parameter created directly in its sharding (never whole on one host), compiled
  with `run_once_compiler_options`."""
  graphdef, abstract_state = abstract_model(make_model)
  shardings = state_shardings(abstract_state, rules, mesh)

  def init():
    return nnx.state(make_model())

  with use_rules(mesh, rules):
    lowered = jax.jit(init, out_shardings=shardings).lower()
    state = lowered.compile(compiler_options=run_once_compiler_options(mesh))()
  return nnx.merge(graphdef, state)


def count_params(state: nnx.State) -> int:
  """Number of scalars in the `nnx.Param`s of a (possibly abstract) state."""
  params = state.filter(nnx.Param) if hasattr(state, "filter") else state
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
