"""How a training run's steps are named (`checkpoint.run_layout`): the one rule of the trainer's
`config.init=trainer:`, convert's `--src` and the loaders' `--checkpoint`."""

import os

from qwenvl_jax.checkpoint import run_layout


def test_split_step_takes_the_last_at_unless_the_whole_exists(tmp_path):
  assert run_layout.split_step("runs/a") == ("runs/a", "")
  assert run_layout.split_step("runs/a@b@12") == ("runs/a@b", "12")
  named = tmp_path / "run@2"  # a folder whose name holds an '@' is a run, not step 2 of `run`
  named.mkdir()
  assert run_layout.split_step(str(named)) == (str(named), "")
  assert run_layout.split_step(f"{named}@5") == (str(named), "5")


def test_step_folder_reads_a_steps_folder_or_its_params_and_nothing_else():
  cwd = os.getcwd()
  assert run_layout.step_folder("runs/a/checkpoints/5") == (os.path.join(cwd, "runs/a"), 5)
  assert run_layout.step_folder("runs/a/checkpoints/5/params/") == (os.path.join(cwd, "runs/a"), 5)
  assert run_layout.step_folder("gs://bucket/run/checkpoints/40/params") == ("gs://bucket/run", 40)
  for other in ("runs/a", "runs/a/checkpoints", "runs/a/checkpoints/x", "runs/a/checkpoints/5/opt_state",
                "runs/a/steps/5", "/checkpoints/5"):
    assert run_layout.step_folder(other) is None, other


def test_finished_steps_are_the_steps_holding_their_params(tmp_path):
  assert run_layout.finished_steps(str(tmp_path)) == []
  for step, done in ((10, True), (2, True), (30, False)):  # 30: being written (no params yet)
    (tmp_path / "checkpoints" / str(step) / ("params" if done else "opt_state")).mkdir(parents=True)
  (tmp_path / "checkpoints" / "tmp.orbax").mkdir()
  assert run_layout.finished_steps(str(tmp_path)) == [2, 10]
