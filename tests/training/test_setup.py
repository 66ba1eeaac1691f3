"""Full fine-tuning memory options of the shared step setup: bf16 AdamW moments and optimizer state offloaded to
host memory (`pinned_host`, which the CPU backend has too) train the tiny model, and the state stays on the host
between steps."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qwenvl_jax import sharding
from qwenvl_jax.model import QwenVL, tiny
from qwenvl_jax.training import experiment, optimizer, peft
from qwenvl_jax.training.setup import HOST_MEMORY, build_step, rows_split_by_process
from qwenvl_jax.training.step import TrainState
from tests.training.helpers import small_config


def _batch(cfg, rows=8, length=32, images=1, res=56):
  rng = np.random.default_rng(0)
  ids = rng.integers(8, 264, (rows, length + 1)).astype(np.int32)
  return {
      "input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((rows, length), np.float32),
      "segment_ids": np.ones((rows, length), np.int32),
      "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
      "images": np.zeros((rows, images, res, res, 3), np.uint8), "image_mask": np.zeros((rows, images), bool),
  }


def _moments(opt_state):
  adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  return [x for s in adam for x in jax.tree.leaves((s.mu, s.nu))]


@pytest.mark.slow
def test_bf16_moments_offloaded_to_host_memory_train_stage3(tmp_path):
  config = small_config(3, tmp_path, **{"optimizer.mu_dtype": "bfloat16", "optimizer.nu_dtype": "bfloat16",
                                        "optimizer.offload": True, "optimizer.warmup_steps": 0})
  cfg = tiny(dtype="float32", remat_policy="none").with_image_size(config.res)
  mesh, rules = sharding.make_mesh({"fsdp": 8}), sharding.load_rules("fsdp")
  setup = build_step(config, cfg, mesh, rules)
  params = nnx.to_pure_dict(nnx.state(sharding.init_sharded(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)), mesh, rules)))
  opt_state = jax.jit(setup.tx.init, out_shardings=setup.opt_shardings)(params)
  state = TrainState(jax.device_put(jnp.int32(0), setup.replicated), params, opt_state)
  batch = jax.device_put(_batch(cfg, res=config.res), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  step = jax.jit(setup.step_fn, in_shardings=(setup.shardings, None), out_shardings=(setup.shardings,
                                                                                     setup.replicated),
                 donate_argnums=(0,))
  losses = []
  with sharding.use_rules(mesh, rules):
    for _ in range(6):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  # A fixed batch of random tokens: the loss must fall at every step (lr 3e-3, no warmup).
  assert all(np.isfinite(losses)) and all(np.diff(losses) < 0) and losses[-1] < 0.9 * losses[0], losses
  moments = _moments(state.opt_state)
  assert moments and all(m.dtype == jnp.bfloat16 for m in moments)
  # Between steps the moments live in host memory, sharded like their parameters; the params stay on device.
  assert all(m.sharding.memory_kind == HOST_MEMORY for m in moments)
  assert all(p.sharding.memory_kind == "device" for p in jax.tree.leaves(state.params))
  w1 = [m for m in moments if m.shape == params["llm"]["blocks"]["mlp"]["w1"]["kernel"].shape]
  assert w1 and w1[0].sharding.spec == params["llm"]["blocks"]["mlp"]["w1"]["kernel"].sharding.spec


def _step_once(config, cfg, mesh, rules, params, batch):
  setup = build_step(config, cfg, mesh, rules)
  state = TrainState(jax.device_put(jnp.int32(0), setup.replicated), params,
                     jax.jit(setup.tx.init, out_shardings=setup.opt_shardings)(params))
  step = jax.jit(setup.step_fn, in_shardings=(setup.shardings, None), out_shardings=(setup.shardings,
                                                                                     setup.replicated))
  with sharding.use_rules(mesh, rules):
    state, metrics = step(state, batch)
  return state, float(metrics["loss"])


@pytest.mark.slow
def test_frozen_dtype_holds_the_frozen_vit_in_bf16_and_trains_as_with_its_values_in_f32(tmp_path):
  config = small_config(3, tmp_path, frozen_dtype="bfloat16", **{"optimizer.warmup_steps": 0})
  cfg = tiny(dtype="float32", remat_policy="none").with_image_size(config.res)
  # One device: the dtype question has nothing to do with sharding, and two 8-device compiles cost a minute.
  mesh, rules = sharding.make_mesh({"fsdp": 1}, devices=jax.devices()[:1]), sharding.load_rules("fsdp")
  params = nnx.to_pure_dict(nnx.state(sharding.init_sharded(peft.model_fn(cfg, config), mesh, rules)))
  flat = {optimizer.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  is_frozen = optimizer.make_is_frozen(experiment.frozen_patterns(config))
  frozen = {k for k in flat if is_frozen(k)}
  assert any(k.startswith("visual/") for k in frozen) and any(k.startswith("adapter/proj") for k in frozen)
  assert all(flat[k].dtype == (jnp.bfloat16 if k in frozen else jnp.float32) for k in flat)
  # The same values with the frozen part held in float32: the reference run of the ordinary config.
  ref_config = small_config(3, tmp_path, **{"optimizer.warmup_steps": 0})
  ref_params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  rng = np.random.default_rng(1)
  batch = _batch(cfg, res=config.res)
  batch["images"] = rng.integers(0, 256, batch["images"].shape).astype(np.uint8)
  batch["image_mask"][:] = True
  batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  state, loss = _step_once(config, cfg, mesh, rules, params, batch)
  ref_state, ref_loss = _step_once(ref_config, cfg, mesh, rules, ref_params, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  new = {optimizer.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  ref = {optimizer.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(ref_state.params)[0]}
  for k in frozen:
    assert new[k].dtype == jnp.bfloat16 and np.array_equal(np.asarray(new[k]), np.asarray(flat[k])), k
  # The gradients, through Adam's moments: equal to float32 round-off of each tensor's largest value.
  moments, ref_moments = (jax.tree_util.tree_flatten_with_path(s.opt_state)[0] for s in (state, ref_state))
  assert [p for p, _ in moments] == [p for p, _ in ref_moments]
  for (path, m), (_, r) in zip(moments, ref_moments):
    if jnp.issubdtype(r.dtype, jnp.floating) and r.ndim:
      r = np.asarray(r, np.float32)
      np.testing.assert_allclose(np.asarray(m, np.float32), r, rtol=1e-5, atol=1e-6 * np.abs(r).max(),
                                 err_msg=jax.tree_util.keystr(path))
  # The trained weights. Adam's first step moves a weight by lr * g / (|g| + eps), about lr (3e-3) where |g| >> eps;
  # where |g| is a few eps (1e-8), the gradient's round-off (1e-7 of the tensor's largest, above) is a large part of
  # g and so of that step: a few of the 32,768 elements of a tensor then differ by up to 1e-3 * lr (3.3e-6 with
  # XLA:CPU's older fusion emitters). atol 1e-5 is 300 times below a weight left out of, or moved the other way by,
  # the step.
  for k in set(new) - frozen:
    np.testing.assert_allclose(np.asarray(new[k]), np.asarray(ref[k]), rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("overrides, message", [
    ({"frozen_dtype": "int8"}, "expected ''"),
    ({"frozen_dtype": "bfloat16", "lora.rank": 4}, "lora.base_dtype"),
])
def test_frozen_dtype_refuses_bad_values(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    peft.model_fn(tiny(), small_config(3, tmp_path, **overrides))


def test_rows_split_by_process_takes_interleaved_blocks_and_refuses_shared_ones():
  """A pod's device mesh interleaves the hosts along the batch axes (v4-32, default fsdp: host 0 holds blocks 0, 4,
  8, 12); JAX places each process's rows in its blocks wherever they lie, so that mesh is valid (it was refused for
  blocks that are not adjacent). Blocks held by two processes, or unequal shares, are not."""
  assert rows_split_by_process([{0, 4, 8, 12}, {1, 5, 9, 13}, {2, 6, 10, 14}, {3, 7, 11, 15}], 16)
  assert rows_split_by_process([{0, 1}, {2, 3}], 4)
  assert not rows_split_by_process([{0}, {0}], 1)  # the tensor axis across both hosts: one block, two readers
  assert not rows_split_by_process([{0, 1, 2}, {3}], 4)
