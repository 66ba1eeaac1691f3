"""Per-stage trainable masks, no optimizer state for frozen parameters, the schedule and ViT layer-wise decay."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from qwenvl_jax import sharding
from qwenvl_jax.model import QwenVL, tiny
from qwenvl_jax.training import optimizer
from tests.training.helpers import load_stage_config


def _opt_config(**kw):
  c = dict(lr=1e-3, min_lr=1e-5, warmup_steps=10, schedule="cosine", b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05,
           wd_exclude=r".*/(bias|scale)", grad_clip=1.0, vit_layer_decay=1.0, mu_dtype="")
  c.update(kw)
  return ml_collections.ConfigDict(c)


@pytest.fixture(scope="module")
def abstract_params():
  _, state = sharding.abstract_model(lambda: QwenVL(tiny(), rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(state)


def _paths(tree):
  return {optimizer.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


# What trains in each stage, written from the paper / finetune.py (SPEC §6, Gotcha 22), by top-level prefix.
# The resampler's sin-cos table is `requires_grad_(False)` in the reference: fixed, except that finetune.py's
# `attn_pool.requires_grad_(True)` (fix_vit) switches it on.
_FIXED = "adapter/resampler/pos_embed"
EXPECTED_TRAINABLE = {
    (1, True): lambda p: p.startswith(("visual/", "adapter/")) and p != _FIXED,
    (2, True): lambda p: p != _FIXED,
    (3, True): lambda p: p.startswith(("llm/", "adapter/resampler/")),
    (3, False): lambda p: p.startswith(("llm/", "adapter/")) and p != _FIXED,
}


@pytest.mark.parametrize("stage,fix_vit", sorted(EXPECTED_TRAINABLE))
def test_stage_masks(abstract_params, stage, fix_vit):
  labels = optimizer.param_labels(abstract_params, optimizer.stage_frozen_patterns(stage, fix_vit=fix_vit))
  flat = {optimizer.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
  expected = EXPECTED_TRAINABLE[(stage, fix_vit)]
  wrong = [p for p, v in flat.items() if (v == optimizer.TRAINABLE) != expected(p)]
  assert not wrong, f"stage {stage} fix_vit={fix_vit} mislabels {wrong}"
  if stage == 3 and fix_vit:
    # The official recipe trains the resampler's sin-cos table but not ln_post / proj.
    assert flat["adapter/resampler/pos_embed"] == optimizer.TRAINABLE
    assert flat["adapter/proj"] == flat["adapter/ln_post/scale"] == optimizer.FROZEN
  else:
    assert flat["adapter/resampler/pos_embed"] == optimizer.FROZEN


@pytest.mark.parametrize("stage,fix_vit", sorted(EXPECTED_TRAINABLE))
def test_frozen_params_have_no_optimizer_state(abstract_params, stage, fix_vit):
  frozen = optimizer.stage_frozen_patterns(stage, fix_vit=fix_vit)
  tx, _, labels = optimizer.make_optimizer(_opt_config(), abstract_params, frozen=frozen, total_steps=100,
                                           vit_layers=2)
  opt_state = jax.eval_shape(tx.init, abstract_params)
  trainable, frozen_flat = optimizer.split_by_labels(abstract_params, labels)
  state_paths = [optimizer.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]]
  for path in frozen_flat:
    assert not any(s.endswith(path) for s in state_paths), f"frozen {path} has optimizer state"
  # Adam keeps exactly two moments per trainable parameter (plus scalar counters).
  n_trainable = sum(x.size for x in trainable.values())
  moments = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
  assert moments == 2 * n_trainable


def test_pattern_matching_nothing_is_an_error(abstract_params):
  with pytest.raises(ValueError, match="lm/"):
    optimizer.param_labels(abstract_params, ("lm/.*",))


def test_invalid_regex_is_an_error():
  with pytest.raises(ValueError, match="frozen-parameter pattern .* is not a regular expression"):
    optimizer.make_is_frozen(("llm/(",))


def test_unknown_stage():
  with pytest.raises(ValueError, match="stage"):
    optimizer.stage_frozen_patterns(4)


def test_schedule_warmup_then_cosine_to_min():
  sched = optimizer.make_schedule(_opt_config(lr=1e-3, min_lr=1e-5, warmup_steps=10), total_steps=110)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 0.5e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
  # Halfway through the cosine: the midpoint of peak and floor.
  np.testing.assert_allclose(float(sched(60)), (1e-3 + 1e-5) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(sched(110)), 1e-5, rtol=1e-6)
  const = optimizer.make_schedule(_opt_config(schedule="constant", warmup_steps=10), total_steps=110)
  np.testing.assert_allclose(float(const(100)), 1e-3, rtol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    optimizer.make_schedule(_opt_config(schedule="linear"), total_steps=10)


def test_vit_layer_decay_scales_by_depth():
  layers, decay = 3, 0.5
  updates = {"visual": {"blocks": {"w": jnp.ones((layers, 2))}, "conv1": jnp.ones((2,))},
             "llm": {"w": jnp.ones((2,))}}
  out, _ = optimizer.vit_layer_decay(decay, layers).update(updates, optax.EmptyState())
  np.testing.assert_allclose(out["visual"]["blocks"]["w"][:, 0], [decay ** 3, decay ** 2, decay ** 1])
  np.testing.assert_allclose(out["visual"]["conv1"], decay ** 4)
  np.testing.assert_allclose(out["llm"]["w"], 1.0)


def test_weight_decay_skips_biases_and_norms():
  params = {"a": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,)), "scale": jnp.ones((2,))}}
  tx, _, _ = optimizer.make_optimizer(_opt_config(lr=1.0, warmup_steps=0, weight_decay=0.5, grad_clip=0.0),
                                      params, frozen=(), total_steps=10, vit_layers=1)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # Zero gradients: Adam contributes 0, so the update is -lr * wd * p where decay applies, else 0.
  np.testing.assert_allclose(updates["a"]["kernel"], -0.5)
  np.testing.assert_allclose(updates["a"]["bias"], 0.0)
  np.testing.assert_allclose(updates["a"]["scale"], 0.0)


def test_bf16_second_moment_tracks_the_float32_adam():
  """`nu_dtype=bfloat16` stores nu in bf16 and gives the float32 AdamW's updates to bf16 rounding."""
  params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8), "b": jnp.zeros(8)}
  grads = [jax.tree.map(lambda p, k=k: jnp.sin(p * (k + 1.0)) + 0.1 * k, params) for k in range(5)]
  results = {}
  for name, kw in {"f32": {}, "bf16": dict(mu_dtype="bfloat16", nu_dtype="bfloat16")}.items():
    tx, _, _ = optimizer.make_optimizer(_opt_config(warmup_steps=0, **kw), params, frozen=(), total_steps=10,
                                        vit_layers=1)
    state, p = tx.init(params), params
    for g in grads:
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    results[name] = (p, state)
  adam = [s for s in jax.tree.leaves(results["bf16"][1], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert adam and all(x.dtype == jnp.bfloat16 for s in adam for x in jax.tree.leaves((s.mu, s.nu)))
  for a, b, p0 in zip(jax.tree.leaves(results["f32"][0]), jax.tree.leaves(results["bf16"][0]),
                      jax.tree.leaves(params)):
    assert a.dtype == b.dtype == jnp.float32  # the parameters themselves stay float32
    # bf16 rounding of the moments (8 mantissa bits) moves each parameter by < 1 % of its total movement.
    moved = np.abs(np.asarray(a) - np.asarray(p0)).max()
    assert np.abs(np.asarray(b) - np.asarray(a)).max() <= 0.01 * moved
  assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                 for a, b in zip(jax.tree.leaves(results["f32"][0]), jax.tree.leaves(results["bf16"][0])))


def _opt_state_specs() -> dict[str, list]:
  """Optimizer-state PartitionSpecs of the 9.6B model in every stage under fsdp_tp on a (1, 4, 2) mesh, keyed by
  `jax.tree_util.keystr` of the optimizer-state leaf (abstract: nothing is allocated)."""
  from qwenvl_jax.model import qwen_vl_7b  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.training import setup  # pylint: disable=import-outside-toplevel
  mesh, rules = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}), sharding.load_rules("fsdp_tp")
  out = {}
  for stage in (1, 2, 3):
    config = load_stage_config(stage, "model=qwen_vl_7b")
    built = setup.build_step(config, qwen_vl_7b(), mesh, rules)
    for path, s in jax.tree_util.tree_flatten_with_path(built.opt_shardings)[0]:
      out[f"stage{stage}{jax.tree_util.keystr(path)}"] = [list(a) if isinstance(a, tuple) else a for a in s.spec]
  return out


def test_opt_state_shardings_match_golden_file():
  """Each Adam moment sharded like its parameter, scalars replicated, frozen parameters without state: the specs
  recorded before `opt_state_shardings` moved to `optax.tree_map_params` (UPDATE_GOLDEN=1 rewrites the file)."""
  import json, os, pathlib  # pylint: disable=import-outside-toplevel,multiple-imports
  got = _opt_state_specs()
  path = pathlib.Path(__file__).parents[1] / "golden" / "opt_state_shardings_fsdp_tp.json"
  if os.environ.get("UPDATE_GOLDEN"):
    path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
  assert got == json.loads(path.read_text()), "optimizer-state shardings changed; UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("max_norm", [1e3, 0.5])  # not clipping, clipping
def test_clip_by_global_norm_equals_optax(max_norm):
  rng = np.random.default_rng(3)
  grads = {"a": jnp.asarray(rng.normal(size=(4, 5)).astype(np.float32)),
           "b": {"c": jnp.asarray(rng.normal(size=(7,)).astype(np.float32))}}
  got, _ = optimizer.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
  want, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    if max_norm > 100:
      np.testing.assert_array_equal(g, w)  # a multiply by 1
    else:
      np.testing.assert_allclose(g, w, rtol=1e-6)
  norm = float(optax.tree.norm(got))
  assert norm == pytest.approx(min(max_norm, float(optax.tree.norm(grads))), rel=1e-6)
