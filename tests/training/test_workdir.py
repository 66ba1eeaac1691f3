"""The workdir guard: resume only a run of the same config; never continue someone else's checkpoints silently."""
import json

import pytest

from qwenvl_jax import errors, new_files
from qwenvl_jax.training import workdir
from tests.training.helpers import free_port, small_config, start_process_of_two, stderr_of_all


def test_new_run_records_its_config(tmp_path):
  c = small_config(2, tmp_path)
  workdir.check_and_record(str(tmp_path), c, latest_step=None)
  assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["lr"] == c.optimizer.lr


def test_a_run_stopped_while_recording_its_config_leaves_nothing_and_reruns(tmp_path, monkeypatch):
  # Stopped before the rename: no half config.json, which the rerun used to refuse as "not JSON", and no temporary.
  def stopped(*_):
    raise KeyboardInterrupt
  monkeypatch.setattr(new_files.os, "replace", stopped)
  with pytest.raises(KeyboardInterrupt):
    workdir.check_and_record(str(tmp_path), small_config(2, tmp_path), latest_step=None)
  assert not list(tmp_path.iterdir())
  monkeypatch.undo()
  workdir.check_usable(str(tmp_path))
  workdir.check_and_record(str(tmp_path), small_config(2, tmp_path), latest_step=None)
  assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_same_config_resumes_and_run_length_may_change(tmp_path):
  workdir.check_and_record(str(tmp_path), small_config(2, tmp_path), latest_step=None)
  workdir.check_and_record(str(tmp_path), small_config(2, tmp_path, total_steps=99, log_every=5), latest_step=4)


def test_a_run_recorded_before_cpu_options_existed_resumes(tmp_path):
  # cpu_options chooses how the same parameters are computed: a record without it (or with another value) resumes.
  record = json.loads(small_config(2, tmp_path).to_json())
  del record["cpu_options"]
  (tmp_path / "config.json").write_text(json.dumps(record))
  workdir.check_and_record(str(tmp_path), small_config(2, tmp_path, cpu_options="off"), latest_step=4)


def test_different_config_is_refused_unless_forced(tmp_path):
  workdir.check_and_record(str(tmp_path), small_config(2, tmp_path), latest_step=None)
  changed = small_config(2, tmp_path, seq_len=32, **{"data.seed": 3})
  with pytest.raises(FileExistsError, match=r"data\.seed: 0 -> 3\n  seq_len: 64 -> 32"):
    workdir.check_and_record(str(tmp_path), changed, latest_step=4)
  changed.resume = "force"
  assert workdir.check_and_record(str(tmp_path), changed, latest_step=4)
  # Recorded once the checkpoint has restored (the trainer calls record_resumed), not before: a failed restore
  # left a record of a config that never ran.
  assert not list(tmp_path.glob("config.resumed_at_*"))
  assert workdir.record_resumed(str(tmp_path), changed, 4) == str(tmp_path / "config.resumed_at_4.json")
  assert json.loads((tmp_path / "config.resumed_at_4.json").read_text())["seq_len"] == 32
  changed.seq_len = 16  # a second forced resume from the same step keeps the first record
  assert workdir.record_resumed(str(tmp_path), changed, 4) == str(tmp_path / "config.resumed_at_4-1.json")
  assert json.loads((tmp_path / "config.resumed_at_4.json").read_text())["seq_len"] == 32
  # The original record is kept.
  assert json.loads((tmp_path / "config.json").read_text())["seq_len"] == 64


def test_checkpoints_without_a_record_are_refused(tmp_path):
  with pytest.raises(FileExistsError, match="no config.json"):
    workdir.check_and_record(str(tmp_path), small_config(2, tmp_path), latest_step=7)


def test_resume_never(tmp_path):
  workdir.check_and_record(str(tmp_path), small_config(2, tmp_path), latest_step=None)
  with pytest.raises(FileExistsError, match="resume='never'"):
    workdir.check_and_record(str(tmp_path), small_config(2, tmp_path, resume="never"), latest_step=2)
  with pytest.raises(ValueError, match="config.resume"):
    workdir.check_and_record(str(tmp_path), small_config(2, tmp_path, resume="maybe"), latest_step=2)


def test_a_different_config_without_checkpoints_is_refused(tmp_path):
  workdir.check_and_record(str(tmp_path), small_config(2, tmp_path), latest_step=None)
  with pytest.raises(FileExistsError, match="no checkpoint to resume"):
    workdir.check_and_record(str(tmp_path), small_config(2, tmp_path, seq_len=32), latest_step=None)


def test_default_workdir_is_per_stage(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = small_config(3, "")
  assert workdir.resolve(c) == str(tmp_path / "runs" / "stage3")


def test_another_tools_folder_is_refused_before_anything_is_written(tmp_path):
  """A model download holds a config.json and a tokenizer.model of its own: training into it used to write
  checkpoints/ and then fail with an 80-line config diff, or a traceback about the tokenizer."""
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps({"architectures": ["QWenLMHeadModel"], "model_type": "qwen"}))
  with pytest.raises(FileExistsError, match=r"config.json is not a qwenvl_jax run's config"):
    workdir.check_usable(str(hf))
  vocab = tmp_path / "vocab"
  vocab.mkdir()
  (vocab / "tokenizer.model").write_text("not a sentencepiece model")
  with pytest.raises(FileExistsError, match=r"tokenizer.model is not the synthetic vocabulary of a qwenvl_jax run"):
    workdir.check_usable(str(vocab))
  assert sorted(p.name for p in hf.iterdir()) == ["config.json"]
  run = tmp_path / "run"
  workdir.check_and_record(str(run.mkdir() or run), small_config(2, run), latest_step=None)
  workdir.check_usable(str(run))  # our own record passes


def test_resuming_with_more_steps_says_the_schedule_is_stretched(tmp_path, capsys):
  workdir.check_and_record(str(tmp_path), small_config(2, tmp_path, total_steps=120), latest_step=None)
  workdir.check_and_record(str(tmp_path), small_config(2, tmp_path, total_steps=130), latest_step=120)
  assert "note: total_steps 120 -> 130" in capsys.readouterr().out
  workdir.check_and_record(str(tmp_path), small_config(2, tmp_path, total_steps=120), latest_step=60)
  assert "note" not in capsys.readouterr().out


def test_a_workdir_inside_a_runs_checkpoints_folder_is_refused(tmp_path):
  """`--workdir=runs/X/checkpoints` trained a new run from scratch among run X's checkpoints."""
  run = tmp_path / "run"
  (run / "checkpoints" / "10").mkdir(parents=True)
  workdir.check_and_record(str(run), small_config(2, run), latest_step=None)
  for inside in (run / "checkpoints", run / "checkpoints" / "10", run / "checkpoints" / "new" / "deeper"):
    with pytest.raises(errors.UserFileExistsError,
                       match=rf"workdir {inside} lies inside the checkpoints folder of the run {run} \(to resume "
                             rf"that run use --workdir={run}; to train from its weights use "
                             rf"--config.init=trainer:{run} with a workdir of its own\)"):
      workdir.check_usable(str(inside))
  assert not (run / "checkpoints" / "new").exists()
  workdir.check_usable(str(run))  # the run itself resumes
  (tmp_path / "mine" / "checkpoints").mkdir(parents=True)  # a folder named checkpoints of no run is just a folder
  workdir.check_usable(str(tmp_path / "mine" / "checkpoints" / "run"))


@pytest.mark.multiprocess
def test_a_workdir_that_the_processes_do_not_share_is_refused_on_every_process(tmp_path):
  """`--workdir=run` on two hosts whose `run` are different folders (here: two current folders): the run used to
  train until the first checkpoint, where process 1 failed and process 0 waited 5 minutes and aborted."""
  port = free_port()
  procs = []
  for i in range(2):
    (tmp_path / f"host{i}").mkdir()
    procs.append(start_process_of_two("run", i, port, cwd=tmp_path / f"host{i}",
                                      **{"distributed.initialization_timeout": 120}))
  errs = stderr_of_all(procs, timeout=300)
  for p, err in zip(procs, errs):
    assert p.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "is not one folder shared by the 2 processes: process(es) 1 do not see the file process 0 wrote" in err
  # Nothing is left behind: process 0's new workdir is removed, process 1 wrote nothing.
  assert not (tmp_path / "host0" / "run").exists() and not (tmp_path / "host1" / "run").exists()
