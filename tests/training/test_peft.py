"""LoRA runs of the trainer: only adapters train and hold AdamW state, the bf16 base never moves, the loss falls,
and a stopped LoRA run resumes exactly (dropout keys derive from the step), also after a real SIGTERM.

Tolerances: resumed losses equal the uninterrupted run's to float32 round-off (rtol 1e-6), as in test_trainer.py.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import errors
from qwenvl_jax.model import tiny
from qwenvl_jax.training import optimizer, peft, step as step_lib, train
from qwenvl_jax.training.stage_config import stage_config
from tests import background
from tests.training.helpers import read_losses, sigterm_and_rerun, small_config, small_flags, stopped_and_rerun
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


LORA_RUN = {"lora.rank": 8, "total_steps": 24, "checkpoint.every": 12}
STEPS = range(1, 25)


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory):
  """{step: loss} of an uninterrupted 24-step LoRA run (dropout 0.05)."""
  workdir = tmp_path_factory.mktemp("lora_full")
  assert train(small_config(2, workdir, **LORA_RUN)).status == "completed"
  return read_losses(workdir)


@pytest.mark.slow
def test_stopped_lora_run_resumes_exactly(lora_reference, tmp_path):
  """The LoRA run (dropout 0.05) stopped at step 12 and rerun gives the uninterrupted run's losses."""
  first = train(small_config(2, tmp_path, stop_at_step=12, **LORA_RUN))
  assert (first.status, first.last_checkpoint) == ("preempted", 12)
  train(small_config(2, tmp_path, **LORA_RUN))
  resumed = read_losses(tmp_path)
  np.testing.assert_allclose([resumed[s] for s in STEPS], [lora_reference[s] for s in STEPS], rtol=1e-6)


lora_sigterm_run = background.finished_work(__name__, "lora_sigterm_run", lambda folder: sigterm_and_rerun(
    folder, small_flags(2, folder / "run", **{**LORA_RUN, "checkpoint.every": 100}), step=2))


@pytest.mark.slow
def test_sigterm_stops_a_lora_run_and_the_rerun_resumes_exactly(lora_reference, lora_sigterm_run):
  """`python -m qwenvl_jax.train` of the same LoRA run gets a real SIGTERM after step 2: it saves the next step and
  exits 143; the rerun resumes from that checkpoint (adapters, AdamW state, data position, dropout keys) and
  logs the uninterrupted run's losses. Both run in tests/background.py's job, from the session's start."""
  _, saved, _, rerun = stopped_and_rerun(lora_sigterm_run)
  assert 2 <= saved < 24, saved  # saved on the signal, not at a checkpoint boundary (every 100)
  workdir = lora_sigterm_run[0] / "run"
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed {workdir} from step {saved}" in rerun.stderr
  # The start line says what a LoRA run trains (it showed the frozen-path regex '(?!.*/lora_[ab]$).*').
  assert ("LoRA r=8 on llm/blocks/attn/qkv, llm/blocks/attn/out, llm/blocks/mlp/w1, llm/blocks/mlp/w2: 24,576 "
          "trained parameters, the rest frozen") in rerun.stderr
  resumed = read_losses(workdir)
  np.testing.assert_allclose([resumed[s] for s in STEPS], [lora_reference[s] for s in STEPS], rtol=1e-6)


def test_run_spec_reads_a_step_folder_and_names_what_is_not_a_lora_run(tmp_path):
  """`convert --mode=merge_lora/export_peft --src=` took `RUN/checkpoints/STEP` (how generate and serve name a step)
  for a workdir ("checkpoints/3/config.json not found"), a bad step for `config.init` (a flag the user never gave)
  or an int() error, and a merged params checkpoint or a missing path for a run without its config.json."""
  run = tmp_path / "run"
  (run / "checkpoints" / "3" / "params").mkdir(parents=True)
  (run / "config.json").write_text(stage_config(3, "lora=8").to_json())
  assert peft.run_spec(str(run)) == (str(run), None)
  assert peft.run_spec(f"{run}@3") == (str(run), 3)
  assert peft.run_spec(str(run / "checkpoints" / "3")) == (str(run), 3)
  assert peft.run_spec(str(run / "checkpoints" / "3" / "params")) == (str(run), 3)
  at = tmp_path / "a@b"  # a folder whose name holds an '@' is a workdir, not a step
  at.mkdir()
  assert peft.run_spec(str(at)) == (str(at), None)
  with pytest.raises(ValueError, match="the step after '@' .* must be a number"):
    peft.run_spec(f"{run}@abc")
  with pytest.raises(FileNotFoundError, match="does not exist .*LoRA run's workdir"):
    peft.run_spec(str(tmp_path / "nope"))
  merged = tmp_path / "merged"
  merged.mkdir()
  (merged / "_METADATA").write_text("{}")
  with pytest.raises(FileNotFoundError, match="is a params checkpoint, not a LoRA training run"):
    peft.run_spec(str(merged))
  with pytest.raises(FileNotFoundError, match=r"has no finished step 9 \(its steps: 3\)") as e:
    peft.load_run(f"{run}@9")
  assert "config.init" not in str(e.value)
  (run / "checkpoints" / "5").mkdir()  # a step being written: no params yet
  with pytest.raises(FileNotFoundError, match=r"has no finished step 5 \(its steps: 3\)"):
    peft.load_run(f"{run}@5")
  (at / "checkpoints" / "2").mkdir(parents=True)  # the '@' folder as a LoRA run: read as itself, not split at '@'
  (at / "config.json").write_text(stage_config(3, "lora=8").to_json())
  with pytest.raises(FileNotFoundError, match=rf"^{at} holds no finished checkpoint yet"):
    peft.load_run(str(at))
  # A full fine-tuning run says what to do with it instead; a Hugging Face folder (its own config.json) was
  # called a run with 'config.lora.rank 0'.
  full = tmp_path / "full"
  (full / "checkpoints" / "2" / "params").mkdir(parents=True)
  (full / "config.json").write_text(stage_config(3, None).to_json())
  with pytest.raises(errors.ConfigError, match="is not a LoRA run") as e:
    peft.load_run(str(full))
  assert "--mode=orbax_to_torch" in e.value.hint
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text('{"model_type": "qwen", "tie_word_embeddings": false}')
  with pytest.raises(errors.ConfigError, match=r"is not a training run \(no checkpoints/"):
    peft.load_run(str(hf))


def test_a_config_without_a_lora_section_passes_the_field_checks():
  """A config written before LoRA existed (no `lora` block) is a full fine-tuning run; the check of
  `lora.modules_to_save` read `config.lora` and failed with an AttributeError traceback."""
  peft.check_fields(ml_collections.ConfigDict({"stage": 2}))
