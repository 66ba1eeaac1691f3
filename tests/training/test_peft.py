"""LoRA runs of the trainer: only adapters train and hold AdamW state, the bf16 base never moves, the loss falls,
and a stopped LoRA run resumes exactly (dropout keys derive from the step).

Tolerances: resumed losses equal the uninterrupted run's to float32 round-off (rtol 1e-6), as in test_trainer.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.model import tiny
from qwenvl_jax.training import optimizer, peft, step as step_lib, train
from qwenvl_jax.training.stage_config import stage_config
from tests.training.helpers import read_losses, small_config
from tests.training.test_step import _batch, _opt

RES = 56


def _lora_setup(**lora):
  config = stage_config(3, "lora=8")
  for k, v in lora.items():
    config.lora[k] = v
  cfg = tiny(dtype="float32", remat_policy="none").with_image_size(RES)
  model = peft.model_fn(cfg, config)()
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  opt = _opt()
  opt.lr = 1e-2
  tx, sched, labels = optimizer.make_optimizer(opt, params, frozen=peft.frozen_patterns(config), total_steps=100,
                                               vit_layers=2)
  fn = step_lib.make_train_step(graphdef, tx, labels, sched, stop_vision_grad=True, loss_chunk=16,
                                dropout_seed=peft.dropout_seed(config, 0))
  return params, tx, fn


def _flat(tree):
  return {optimizer.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def lora_run():
  """Six LoRA steps on one repeated batch: (initial params, final state, losses)."""
  params, tx, fn = _lora_setup()
  state = step_lib.TrainState(jnp.int32(0), params, tx.init(params))
  jitted = jax.jit(fn)
  batch = _batch(0)
  losses = []
  for _ in range(6):
    state, m = jitted(state, batch)
    losses.append(float(m["loss"]))
  return params, state, losses


def test_base_is_bitwise_unchanged_and_every_adapter_b_moved(lora_run):
  before, state, _ = lora_run
  before, after = _flat(before), _flat(state.params)
  adapters = [k for k in before if k.endswith(("/lora_a", "/lora_b"))]
  assert len(adapters) == 8  # qkv, out, w1, w2 of the LLM
  for k, v in before.items():
    if k in adapters:
      continue
    np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(v), err_msg=k)
    if v.ndim >= 2:
      assert v.dtype == jnp.bfloat16, k  # no float32 master copy of the frozen base
  for k in adapters:
    assert after[k].dtype == jnp.float32
    if k.endswith("/lora_b"):
      assert not np.array_equal(np.asarray(after[k]), np.asarray(before[k])), k


def test_only_adapters_hold_optimizer_state(lora_run):
  before, state, _ = lora_run
  adapter_size = sum(int(v.size) for k, v in _flat(before).items() if k.endswith(("/lora_a", "/lora_b")))
  # mu and nu of AdamW for each adapter, plus scalar counters.
  held = sum(int(x.size) for x in jax.tree.leaves(state.opt_state))
  assert 2 * adapter_size <= held <= 2 * adapter_size + 16


def test_lora_loss_falls(lora_run):
  _, _, losses = lora_run
  # A random-init tiny base: rank-8 adapters move the loss by a tenth of a nat in 6 steps (0.14 measured).
  assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow
def test_stopped_lora_run_resumes_exactly(tmp_path):
  """A 6-step LoRA run (dropout 0.05) stopped at step 3 and rerun gives the uninterrupted run's losses."""
  overrides = {"lora.rank": 8, "total_steps": 6, "checkpoint.every": 3}
  full = train(small_config(2, tmp_path / "full", **overrides))
  assert full.status == "completed"
  first = train(small_config(2, tmp_path / "resumed", stop_at_step=3, **overrides))
  assert (first.status, first.last_checkpoint) == ("preempted", 3)
  train(small_config(2, tmp_path / "resumed", **overrides))
  reference, resumed = read_losses(tmp_path / "full"), read_losses(tmp_path / "resumed")
  np.testing.assert_allclose([resumed[s] for s in range(1, 7)], [reference[s] for s in range(1, 7)], rtol=1e-6)
