"""The training loop end to end on the tiny model: learning, exact resume, refusals, NaN stop, init across stages.

All runs use `helpers.SMALL` (56 px, 8 x 64 tokens, 24 steps) on the 8 fake CPU devices. Resumed runs must
reproduce the uninterrupted run's losses to float32 round-off (rtol 1e-6): the same compiled step sees the same
restored parameters, optimizer state and data-iterator position.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import errors, sharding
from qwenvl_jax.checkpoint import restore_params
from qwenvl_jax.model import QwenVL, tiny
from qwenvl_jax.training import checkpointing, experiment, train
from tests.training.helpers import read_losses, small_config


@pytest.mark.slow
def test_loss_falls_well_below_its_start(uninterrupted):
  workdir, result, losses = uninterrupted
  assert result.status == "completed" and result.step == 24
  assert sorted(losses) == list(range(1, 25))
  start = losses[1]
  end = np.mean([losses[s] for s in (22, 23, 24)])
  assert end < 0.7 * start, f"loss went from {start:.3f} to {end:.3f}"
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "24", "params"))


@pytest.mark.slow
def test_planned_stop_then_resume_gives_the_same_losses(uninterrupted, tmp_path):
  _, _, reference = uninterrupted
  first = train(small_config(2, tmp_path, stop_at_step=10))
  assert (first.status, first.step, first.last_checkpoint) == ("preempted", 10, 10)
  second = train(small_config(2, tmp_path))
  assert (second.status, second.step) == ("completed", 24)
  resumed = read_losses(tmp_path)
  assert sorted(resumed) == list(range(1, 25))
  np.testing.assert_allclose([resumed[s] for s in range(1, 25)], [reference[s] for s in range(1, 25)], rtol=1e-6)


@pytest.mark.slow
def test_the_cpu_formulations_train_as_the_accelerators_program_does(uninterrupted, tmp_path):
  """The reference run uses the CPU formulations (`cpu_options='auto'` on this CPU backend); the accelerators'
  program (`'off'`) gives the same losses up to float rounding of reordered sums, compounded over 8 steps."""
  _, _, reference = uninterrupted
  config = small_config(2, tmp_path, stop_at_step=8, cpu_options="off")
  assert not experiment.cpu_formulations(config) and experiment.cpu_formulations(small_config(2, tmp_path))
  assert train(config).step == 8
  losses = read_losses(tmp_path)
  np.testing.assert_allclose([losses[s] for s in range(1, 9)], [reference[s] for s in range(1, 9)], rtol=2e-4)


@pytest.mark.slow
def test_rerun_of_a_finished_run_changes_nothing(uninterrupted):
  workdir, _, _ = uninterrupted
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  result = train(small_config(2, workdir))
  assert result.status == "up_to_date" and result.step == 24
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.mark.slow
def test_different_config_in_the_same_workdir_is_refused(uninterrupted):
  workdir, _, _ = uninterrupted
  with pytest.raises(FileExistsError, match=r"optimizer\.lr: 0\.003 -> 0\.001"):
    train(small_config(2, workdir, **{"optimizer.lr": 1e-3}))
  with pytest.raises(FileExistsError, match="resume='never'"):
    train(small_config(2, workdir, resume="never"))


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(uninterrupted, tmp_path):
  workdir, _, _ = uninterrupted
  # Continue a copy of the finished run with a learning rate so large that step 25's update norm overflows float32
  # (a NaN rate, which did the same, is now refused by the config check).
  run = small_config(2, tmp_path)
  for name in ("config.json", "tokenizer.model"):
    shutil.copy(workdir / name, tmp_path / name)
  shutil.copytree(workdir / "checkpoints" / "24", tmp_path / "checkpoints" / "24")
  run.total_steps = 30
  run.optimizer.lr = 1e38
  run.resume = "force"
  with pytest.raises(FloatingPointError, match="at step 25.*last good checkpoint is step 24"):
    train(run)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["24"]
  assert (tmp_path / "config.resumed_at_24.json").is_file()


@pytest.mark.slow
def test_a_forced_resume_that_changes_the_parameters_is_one_line_and_records_nothing(uninterrupted, tmp_path):
  """`--config.resume=force` with LoRA on a full run: the restore failed on the first array (a tensorstore message
  cut mid-word among ~400 lines of its reads' tracebacks) and left config.resumed_at_24.json, a config that never
  ran. Now the stored names and shapes are compared first; the checkpoint is not set aside as damaged."""
  workdir, _, _ = uninterrupted
  run = small_config(2, tmp_path)
  for name in ("config.json", "tokenizer.model"):
    shutil.copy(workdir / name, tmp_path / name)
  shutil.copytree(workdir / "checkpoints" / "24", tmp_path / "checkpoints" / "24")
  run.total_steps, run.resume, run.lora.rank = 30, "force", 4
  with pytest.raises(errors.ConfigError, match=r"checkpoints/24 holds other parameters than this config builds: "
                                               r"missing \(\d+\): \['llm\.blocks\.attn"):
    train(run)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["24"]
  assert not list(tmp_path.glob("config.resumed_at_*"))


@pytest.mark.slow
def test_init_from_another_stage_across_resolutions(uninterrupted):
  """A stage at another resolution starts from a finished run's parameters (they do not depend on it)."""
  workdir, _, _ = uninterrupted
  path = checkpointing.resolve_params_checkpoint(f"trainer:{workdir}")
  assert path == os.path.join(workdir, "checkpoints", "24", "params")
  assert checkpointing.resolve_params_checkpoint(f"trainer:{workdir}@20").endswith(os.path.join("20", "params"))
  with pytest.raises(FileNotFoundError, match="no step 7"):
    checkpointing.resolve_params_checkpoint(f"trainer:{workdir}@7")
  mesh, rules = sharding.make_mesh({"fsdp": -1}), sharding.load_rules("fsdp")
  restored = {}
  for res in (56, 112):
    cfg = tiny(image_pad_id=12).with_image_size(res)
    _, abstract = sharding.abstract_model(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
    state = restore_params(path, abstract, sharding.state_shardings(abstract, rules, mesh))
    restored[res] = nnx.to_pure_dict(state)
  for a, b in zip(jax.tree.leaves(restored[56]), jax.tree.leaves(restored[112])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["res"] == 56


def test_init_from_a_workdir_whose_name_holds_an_at(tmp_path):
  """`trainer:runs/a@b` was split at its first '@' (workdir runs/a, step 'b'); the last '@' names a step."""
  run = tmp_path / "a@b"
  (run / "checkpoints" / "3" / "params").mkdir(parents=True)
  (run / "checkpoints" / "5").mkdir()  # being written: no params yet
  assert checkpointing.resolve_params_checkpoint(f"trainer:{run}") == str(run / "checkpoints" / "3" / "params")
  assert checkpointing.resolve_params_checkpoint(f"trainer:{run}@3") == str(run / "checkpoints" / "3" / "params")
  with pytest.raises(FileNotFoundError, match=r"no step 5 .*\(steps: \[3\]\)"):
    checkpointing.resolve_params_checkpoint(f"trainer:{run}@5")
  with pytest.raises(ValueError, match="the step after '@' must be a number"):
    checkpointing.resolve_params_checkpoint(f"trainer:{tmp_path / 'other'}@abc")


def test_bad_init_spec():
  with pytest.raises(ValueError, match="trainer:WORKDIR"):
    checkpointing.resolve_params_checkpoint("orbax:/x")
