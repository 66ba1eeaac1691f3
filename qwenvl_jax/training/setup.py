"""What the trainer and the planner build before a step runs: the batch check, and the abstract, sharded train step.

`build_step` derives everything from the experiment config, the architecture config and the mesh without
allocating a parameter: the model's graph and abstract state, parameter and Adam-state shardings (each moment like
its parameter), the stage optimizer and its labels, and the pure `train_step`. The trainer then materializes the
state; the planner AOT-compiles the same step for a TPU topology. One function, so the two cannot drift apart.

Optimizer offload (`config.optimizer.offload`, as MaxText's `optimizer_memory_host_offload`): the AdamW moments'
shardings get memory kind `pinned_host`, so the state lives in host RAM between steps; the step moves it to device
memory (`jax.device_put` to the same sharding in `device` memory) right before the update, and its output
shardings put the new state back on the host. The trainer's `jax.jit(tx.init, out_shardings=...)` and the checkpoint
restore use the same shardings, so the state is never whole on the device outside the update.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax import sharding
from qwenvl_jax.model.config import QwenVLConfig
from qwenvl_jax.training import experiment, peft
from qwenvl_jax.training.optimizer import FROZEN, make_optimizer, opt_state_shardings, path_str
from qwenvl_jax.training.step import TrainState, make_train_step


def check_batch(config: ml_collections.ConfigDict, mesh, rules: sharding.Rules) -> None:
  """Refuses a global batch whose micro-batches do not split evenly over the data-parallel devices (the mesh
  axes of the rules' `act_batch`)."""
  shards = sharding.batch_shards(mesh, rules)
  if config.accum_steps < 1 or config.batch_size % config.accum_steps:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                     f"config.accum_steps={config.accum_steps}")
  micro = config.batch_size // config.accum_steps
  if micro % shards:
    raise ValueError(f"config.batch_size={config.batch_size} in config.accum_steps={config.accum_steps} "
                     f"micro-batches of {micro} rows does not divide over the {shards} data-parallel devices "
                     f"(mesh axes {' x '.join(sharding.batch_axes(mesh, rules))}); change the batch size, the "
                     "accumulation steps or the mesh")
  if jax.process_count() > 1:
    _check_rows_per_process(mesh, rules)


def _check_rows_per_process(mesh, rules: sharding.Rules) -> None:
  """Refuses a mesh on which the processes do not each hold their own rows of the batch: every process reads its
  own 1/process_count of the rows (data/global_batch.py), so the batch axes must split the rows by process. A
  tensor axis across hosts (`--config.mesh.ici.tensor=8` on two hosts of 4 devices) failed at the first batch
  with JAX's "Invalid host data" traceback."""
  shards = sharding.batch_shards(mesh, rules)
  held: dict[int, set[int]] = {}
  for device, index in sharding.batch_sharding(mesh, rules).devices_indices_map((shards,)).items():
    held.setdefault(device.process_index, set()).add(index[0].start or 0)
  if not rows_split_by_process(list(held.values()), shards):
    axes = " x ".join(sharding.batch_axes(mesh, rules)) or "none"
    raise ValueError(
        f"mesh {dict(mesh.shape)}: the batch is split into {shards} part(s) over the mesh axes {axes}, which does "
        f"not give each of the {len(held)} processes rows of its own (every process reads its own share of the "
        "data); keep the tensor axis within a host (config.mesh.ici.tensor <= the devices of one process) and "
        "split the batch over data / fsdp across the hosts")


def rows_split_by_process(blocks: list[set[int]], shards: int) -> bool:
  """Whether the batch's `shards` row blocks, `blocks[i]` those held by process i, give every process as many
  blocks of its own: no block held by two processes (its rows would be read twice) and equal counts. The blocks
  of one process need not be adjacent: `jax.make_array_from_process_local_data` places a process's rows in its
  blocks wherever they lie, and a pod's device mesh interleaves the hosts along the batch axes (v4-32's default
  fsdp mesh gives host 0 the blocks 0, 4, 8, 12)."""
  return sum(len(b) for b in blocks) == shards and len({len(b) for b in blocks}) == 1


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s with the shapes and dtypes of `abstract` and the given shardings."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class StepSetup(NamedTuple):
  graphdef: nnx.GraphDef
  abstract_state: nnx.State          # the model's abstract nnx.State (for restore_params)
  state_shardings: nnx.State         # NamedShardings of that state
  abstract_params: dict              # pure dict of ShapeDtypeStructs carrying their shardings
  param_shardings: dict
  abstract_opt: Any                  # abstract optimizer state (carrying its shardings)
  opt_shardings: Any
  shardings: TrainState              # shardings of the whole TrainState
  tx: Any
  schedule: Callable
  labels: Any
  frozen: tuple[str, ...]
  vit_frozen: bool
  step_fn: Callable
  replicated: NamedSharding


HOST_MEMORY = "pinned_host"


def host_offloaded(shardings: Any, abstract: Any) -> Any:
  """The same shardings in host memory (`pinned_host`) for every array of `abstract` but scalars (step counts)."""
  return jax.tree.map(lambda s, a: s.with_memory_kind(HOST_MEMORY) if a.ndim else s, shardings, abstract)


def device_memory(shardings: Any) -> Any:
  """The same shardings in the device's default memory."""
  return jax.tree.map(lambda s: s.with_memory_kind("device"), shardings)


def _on_device_for_update(step_fn: Callable, opt_device_shardings: Any) -> Callable:
  """`step_fn` that first moves the (host-resident) optimizer state into device memory."""
  def step(state, batch):
    return step_fn(state._replace(opt_state=jax.device_put(state.opt_state, opt_device_shardings)), batch)
  return step


def build_step(config: ml_collections.ConfigDict, cfg: QwenVLConfig, mesh, rules: sharding.Rules, *,
               seed: int = 0) -> StepSetup:
  """The abstract, sharded train step of `config` for model `cfg` on `mesh` (nothing is allocated)."""
  check_batch(config, mesh, rules)
  graphdef, abstract_state = sharding.abstract_model(peft.model_fn(cfg, config, seed=seed))
  state_shardings = sharding.state_shardings(abstract_state, rules, mesh)
  param_shardings = nnx.to_pure_dict(state_shardings)
  abstract_params = with_shardings(nnx.to_pure_dict(abstract_state), param_shardings)
  frozen = experiment.frozen_patterns(config)
  tx, schedule, labels = make_optimizer(config.optimizer, abstract_params, frozen=frozen,
                                        total_steps=config.total_steps, vit_layers=cfg.vision.layers)
  label_of = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
  vit_frozen = all(v == FROZEN for k, v in label_of.items() if k.startswith("visual/"))
  step_fn = make_train_step(graphdef, tx, labels, schedule, accum_steps=config.accum_steps,
                            stop_vision_grad=vit_frozen, loss_chunk=int(config.get("loss_chunk", 0)),
                            dropout_seed=peft.dropout_seed(config, seed))
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  # Each Adam moment sharded like its parameter (left to the compiler, tx.init's zeros come back replicated).
  opt_shardings = opt_state_shardings(tx, abstract_opt, param_shardings, replicated)
  if config.optimizer.get("offload", False):
    opt_shardings = host_offloaded(opt_shardings, abstract_opt)
    step_fn = _on_device_for_update(step_fn, device_memory(opt_shardings))
  abstract_opt = with_shardings(abstract_opt, opt_shardings)
  return StepSetup(graphdef, abstract_state, state_shardings, abstract_params, param_shardings, abstract_opt,
                   opt_shardings, TrainState(replicated, param_shardings, opt_shardings), tx, schedule, labels,
                   frozen, vit_frozen, step_fn, replicated)
