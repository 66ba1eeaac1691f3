"""The train step: masked cross-entropy, accumulation, sharded == unsharded, and what it computes for frozen towers.

Tolerances: float32 compute throughout. Sharded vs single-device and accumulated vs whole-batch steps differ only
by the order of floating-point reductions: losses to rtol 1e-5, parameters after two AdamW steps (lr 1e-3) to
atol 2e-6.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax import sharding
from qwenvl_jax.model import QwenVL, tiny
from qwenvl_jax.training import flops, optimizer, step as step_lib

B, T, M, RES = 8, 48, 2, 56


def _cfg():
  return tiny(dtype="float32", remat_policy="none").with_image_size(RES)


def _opt():
  return ml_collections.ConfigDict(dict(lr=1e-3, min_lr=1e-5, warmup_steps=1, schedule="cosine", b1=0.9, b2=0.98,
                                        eps=1e-6, weight_decay=0.05, wd_exclude=r".*/(bias|scale)", grad_clip=1.0,
                                        vit_layer_decay=0.95, mu_dtype=""))


def _batch(seed=0):
  """Rows of [Q <imgpad> per image slot used] + random text; the second image slot of odd rows is empty."""
  cfg = _cfg()
  rng = np.random.default_rng(seed)
  q = cfg.image_tokens
  ids = rng.integers(0, 1000, (B, T)).astype(np.int32)
  image_mask = np.ones((B, M), bool)
  image_mask[1::2, 1] = False
  for b in range(B):
    n = int(image_mask[b].sum())
    ids[b, :n * q] = cfg.image_pad_id
  loss_mask = (rng.uniform(size=(B, T)) < 0.7).astype(np.float32)
  segment_ids = np.ones((B, T), np.int32)
  segment_ids[:, -4:] = 0  # right padding
  loss_mask[:, -4:] = 0
  return dict(input_ids=ids, targets=rng.integers(0, 1000, (B, T)).astype(np.int32), loss_mask=loss_mask,
              segment_ids=segment_ids, positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)),
              images=rng.integers(0, 256, (B, M, RES, RES, 3)).astype(np.uint8), image_mask=image_mask)


def _setup(stage, accum_steps=1, loss_chunk=0):
  cfg = _cfg()
  model = QwenVL(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  frozen = optimizer.stage_frozen_patterns(stage)
  tx, sched, labels = optimizer.make_optimizer(_opt(), params, frozen=frozen, total_steps=10, vit_layers=2)
  fn = step_lib.make_train_step(graphdef, tx, labels, sched, accum_steps=accum_steps, stop_vision_grad=stage == 3,
                            loss_chunk=loss_chunk)
  return cfg, graphdef, params, tx, labels, fn


def _run(fn, params, tx, n=2, in_shardings=None, out_shardings=None, mesh=None, rules=None):
  jitted = jax.jit(fn) if in_shardings is None else jax.jit(fn, in_shardings=in_shardings,
                                                            out_shardings=out_shardings)
  state = step_lib.TrainState(jnp.int32(0), params, tx.init(params))
  losses = []
  for i in range(n):
    batch = _batch(i)
    if mesh is not None:
      with sharding.use_rules(mesh, rules):
        state, m = jitted(state, batch)
    else:
      state, m = jitted(state, batch)
    losses.append(float(m["loss"]))
  return state, losses


@pytest.fixture(scope="module")
def stage3_single():
  cfg, graphdef, params, tx, labels, fn = _setup(3)
  state, losses = _run(fn, params, tx)
  return params, state, losses


@pytest.mark.slow
@pytest.mark.parametrize("rules_name,ici", [("fsdp", {"fsdp": 8}), ("fsdp_tp", {"fsdp": 4, "tensor": 2})])
def test_sharded_step_equals_single_device(stage3_single, rules_name, ici):
  params0, single, single_losses = stage3_single
  _, graphdef, params, tx, labels, fn = _setup(3)
  mesh, rules = sharding.make_mesh(ici), sharding.load_rules(rules_name)
  _, abstract = nnx.split(nnx.eval_shape(lambda: QwenVL(_cfg(), rngs=nnx.Rngs(0))))
  param_sh = nnx.to_pure_dict(sharding.state_shardings(abstract, rules, mesh))
  sharded_params = jax.device_put(params, param_sh)
  assert any(len(s.device_set) == 8 and not s.is_fully_replicated for s in jax.tree.leaves(param_sh))
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_sh = optimizer.opt_state_shardings(tx, jax.eval_shape(tx.init, params), param_sh, replicated)
  state_sh = step_lib.TrainState(replicated, param_sh, opt_sh)
  batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  state, losses = _run(fn, sharded_params, tx, in_shardings=(state_sh, batch_sh),
                       out_shardings=(state_sh, replicated), mesh=mesh, rules=rules)
  np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
  # The Adam moments are sharded like their parameters (not replicated on every device); parameters with no
  # sharded axis (e.g. the qkv bias) stay replicated, and so do their moments.
  names = lambda path: tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
  param_replicated = {names(p): x.sharding.is_fully_replicated
                      for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  moments = [(names(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0] if x.ndim > 1]
  assert moments and any(not x.sharding.is_fully_replicated for _, x in moments)
  for path, x in moments:  # a moment's path ends with its parameter's (after the multi_transform label)
    param = next(path[i:] for i in range(len(path)) if path[i:] in param_replicated)
    assert x.sharding.is_fully_replicated == param_replicated[param], (path, x.sharding)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(single.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5)


@pytest.mark.slow
def test_frozen_params_do_not_move_and_trainable_do(stage3_single):
  params0, state, losses = stage3_single
  before = {optimizer.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params0)[0]}
  after = {optimizer.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  is_frozen = optimizer.make_is_frozen(optimizer.stage_frozen_patterns(3))
  for path in before:
    if is_frozen(path):
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    else:
      assert not np.array_equal(after[path], before[path]), f"trainable {path} did not change"
  assert all(np.isfinite(losses))


@pytest.mark.slow
def test_accumulation_equals_whole_batch():
  _, _, params, tx, _, fn1 = _setup(1, accum_steps=1)
  _, _, _, _, _, fn2 = _setup(1, accum_steps=2)
  s1, l1 = _run(fn1, params, tx)
  s2, l2 = _run(fn2, params, tx)
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5)


def _dot_flops(jaxpr) -> float:
  """Matmul FLOPs of a jaxpr: dot_general / conv, recursing into scans (x length) and other sub-jaxprs."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
      continue
    mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else (value,)):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          total += mult * _dot_flops(inner)
        elif hasattr(sub, "eqns"):
          total += mult * _dot_flops(sub)
  return total


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_step_computes_what_flops_py_counts(stage):
  """The step's traced matmuls equal the analytic count: frozen towers get no weight gradients and a frozen ViT
  no backward pass at all (so flops.py's accounting is what the step really does)."""
  cfg, _, params, tx, labels, fn = _setup(stage)
  state = jax.eval_shape(lambda p: step_lib.TrainState(jnp.int32(0), p, tx.init(p)), params)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch())
  traced = _dot_flops(jax.make_jaxpr(fn)(state, batch).jaxpr)
  is_frozen = optimizer.make_is_frozen(optimizer.stage_frozen_patterns(stage))
  counted = flops.train_step_flops(cfg, batch=B, seq_len=T, max_images=M, is_trainable=lambda p: not is_frozen(p))
  # The model computes the full T x T causal scores, MaxText accounting counts half; add the other half back
  # (x3: forward + gradients w.r.t. q, k, v, as the adapter trains in every stage).
  l = cfg.llm
  causal_half = 3 * l.layers * 2 * B * T * T * l.heads * l.head_dim
  # Small extras flops.py ignores: the bicubic position-table interpolations.
  np.testing.assert_allclose(traced, counted.total + causal_half, rtol=0.01)


@pytest.mark.slow
def test_chunked_loss_step_equals_the_full_logits_step():
  """The chunked loss (16-token chunks over T = 48; `QwenVL.features` then the chunked head) trains exactly as the full logits do: same
  losses (rtol 1e-5), same parameters after two steps (atol 2e-6)."""
  results = []
  for chunk in (0, 16):
    _, _, params, tx, _, fn = _setup(3, loss_chunk=chunk)
    results.append(_run(fn, params, tx))
  (s0, l0), (s1, l1) = results
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6), s0.params,
               s1.params)
