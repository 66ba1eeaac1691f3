"""A stand-in train step (deep MLP + optax AdamW, FSDP-sharded) to exercise the planner without the real model.

It has the parts of a real step that decide memory and cost: sharded f32 parameters with two Adam moments,
a bf16 forward and backward over a data-sharded batch, the optimizer update, and a donated train state. A test
helper of the planner's tests (the one planner entry point for users is `python -m qwenvl_jax.plan`).

Legend: B batch, D width, L depth (stacked layers).
"""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwenvl_jax.hardware import chips
from qwenvl_jax.planning import aot, mesh as mesh_lib


def mlp_train_step(width: int, depth: int, batch: int, mesh: Mesh, *, learning_rate: float = 1e-4,
                   remat: bool = False, unroll: bool = False) -> tuple[Callable[..., Any], tuple[Any, Any], Any, float]:
  """A jit-able AdamW train step of an L-layer residual MLP and its abstract, sharded arguments.

  Args:
    width: D.
    depth: L.
    batch: B (global).
    mesh: a mesh with axes ('data', 'fsdp', 'tensor').
    learning_rate: AdamW learning rate.
    remat: recompute each layer's activations in the backward pass instead of keeping them.
    unroll: unroll the scan over layers (no while loop, so XLA's cost analysis counts every layer).

  Returns:
    (step, (state, batch), state_shardings, model_flops): `step(state, batch) -> (state, loss)` with
    state = (params float32[L, D, D], AdamW state) and batch = (x bfloat16[B, D], y bfloat16[B, D]); the abstract
    arguments as `ShapeDtypeStruct`s; the state's shardings (the step's output shardings); and the analytic
    FLOPs of one step (6 x B x L x D^2: forward 2, backward 4).
  """
  optimizer = optax.adamw(learning_rate)
  weight_spec = NamedSharding(mesh, P(None, "fsdp", "tensor"))
  batch_spec = NamedSharding(mesh, P(("data", "fsdp"), None))

  def layer(h, w):
    return h + jax.nn.gelu(h @ w.astype(jnp.bfloat16)), None

  if remat:
    layer = jax.checkpoint(layer)

  def loss_fn(params, x, y):
    h, _ = jax.lax.scan(layer, x, params, unroll=unroll)
    return jnp.mean(jnp.square(h.astype(jnp.float32) - y.astype(jnp.float32)))

  def step(state, data):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, *data)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  params = jax.ShapeDtypeStruct((depth, width, width), jnp.float32)
  opt_state = jax.eval_shape(optimizer.init, params)
  # Adam moments are shaped like the weights and sharded like them; the step count is a replicated scalar.
  state_shardings = jax.tree.map(
      lambda x: weight_spec if x.shape == params.shape else aot.replicated(mesh), (params, opt_state))
  state = aot.abstract_like((params, opt_state), state_shardings)
  data = aot.abstract_like((jax.ShapeDtypeStruct((batch, width), jnp.bfloat16),) * 2, batch_spec)
  model_flops = 6.0 * batch * depth * width * width
  return step, (state, data), state_shardings, model_flops


def plan_mlp(topology: chips.Topology, *, width: int, depth: int, batch: int, ici=(1, -1, 1),
             remat: bool = False, exact_cost: bool = True) -> aot.StepPlan:
  """Compiles the stand-in step for `topology` (abstract devices) and returns its plan.

  With `exact_cost`, the scanned program's loop-once cost figures are replaced by an extrapolation from two
  small unrolled compiles (depth 1 and 2), see `aot.extrapolate_cost`.
  """
  mesh = mesh_lib.build_mesh(mesh_lib.topology_devices(topology), ici=ici)

  def compile_at(layers: int, unroll: bool) -> aot.StepPlan:
    step, args, state_shardings, model_flops = mlp_train_step(width, layers, batch, mesh, remat=remat,
                                                              unroll=unroll)
    _, plan = aot.compile_step(step, args, chip=topology.chip, mesh=mesh,
                               out_shardings=(state_shardings, aot.replicated(mesh)), donate_argnums=0,
                               model_flops=model_flops, global_batch=batch)
    return plan

  plan = compile_at(depth, unroll=False)
  if exact_cost and plan.loops:
    plan = aot.extrapolate_cost(plan, compile_at(1, unroll=True), {"mlp": compile_at(2, unroll=True)},
                                {"mlp": depth})
  return plan
