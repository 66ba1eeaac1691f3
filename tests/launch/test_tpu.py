"""launch/tpu.py end to end with --dry-run, and the printed commands run against fake gcloud / fake workers."""
import os
import subprocess
import time

import pytest

from tests.launch.conftest import (dry_commands, launch, read_recorded, ssh_command, write_recorder)

SLICE = ["--name=qwenvl-s2", "--zone=us-east5-a", "--topology=v5p-128"]
MULTI = ["--name=qwenvl-ms", "--zone=us-east5-a", "--topology=v5e-256", "--num_slices=2"]
CONFIG = "configs/stage2.py:model=qwen_vl_7b,res=448"
SYSTEM = "--config.data.system=You are a helpful assistant. It's \"quoted\"; $HOME stays literal"
TRAIN = [f"--config={CONFIG}", "--workdir=gs://bucket/runs/stage 2", "--data_dir=gs://bucket/tfds", "--run=s2-a",
         "--env", "LIBTPU_INIT_ARGS=--xla_tpu_a=true --xla_tpu_b=1"]


def gcloud_calls(commands):
  return [c for c in commands if c[0] == "gcloud"]


def test_create_direct_queued_and_multi_slice():
  (direct,) = dry_commands(["create", *SLICE, "--spot"])
  assert direct[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "qwenvl-s2"]
  assert "--accelerator-type=v5p-128" in direct and "--version=v2-alpha-tpuv5" in direct and "--spot" in direct

  queued = dry_commands(["create", *SLICE, "--queued", "--wait"])
  assert queued[0][3:6] == ["queued-resources", "create", "qwenvl-s2"] and "--node-id=qwenvl-s2" in queued[0]
  assert "--runtime-version=v2-alpha-tpuv5" in queued[0]
  assert queued[1][3:5] == ["queued-resources", "describe"]

  (multi,) = dry_commands(["create", *MULTI, "--reserved"])
  assert "--node-count=2" in multi and "--node-prefix=qwenvl-ms" in multi
  # v5e is "v5litepod" to gcloud, with its own runtime.
  assert "--accelerator-type=v5litepod-256" in multi and "--runtime-version=v2-alpha-tpuv5-lite" in multi


def test_install_ships_the_checkout_to_every_worker():
  commands = dry_commands(["install", *SLICE])
  archive = next(c for c in commands if c[0] == "git")
  assert archive[-1] == "HEAD" and "archive" in archive
  tarball = archive[archive.index("-o") + 1]
  scp, ssh = gcloud_calls(commands)
  assert scp[4] == "scp" and scp[5] == tarball and "--worker=all" in scp
  assert ssh[4] == "ssh" and "--worker=all" in ssh
  assert "jax[tpu]==0.10.2" in ssh_command(ssh)


def test_train_passes_config_flags_and_env_to_every_worker():
  commands = dry_commands(["train", *SLICE, *TRAIN, "--", SYSTEM, "--config.total_steps=10"])
  (ssh,) = gcloud_calls(commands)
  assert ssh[4:6] == ["ssh", "qwenvl-s2"] and "--worker=all" in ssh
  assert "qwenvl_jax.train" in ssh_command(ssh)


def test_multi_slice_train_runs_once_per_slice_with_its_slice_id():
  commands = dry_commands(["train", *MULTI, *TRAIN])
  describe, *sshs = gcloud_calls(commands)
  assert describe[4:6] == ["describe", "qwenvl-ms-0"]
  assert [c[5] for c in sshs] == ["qwenvl-ms-0", "qwenvl-ms-1"]
  for index, ssh in enumerate(sshs):
    remote = ssh_command(ssh)
    assert f"MEGASCALE_SLICE_ID={index}" in remote and "MEGASCALE_NUM_SLICES=2" in remote
    assert "--config.mesh.dcn.data=2" in remote and "--worker=all" in ssh


@pytest.mark.parametrize("sub,extra,worker", [
    ("logs", ["--run=s2-a"], "--worker=0"),
    ("logs", ["--run=s2-a", "--worker=all"], "--worker=all"),
    ("stop", ["--run=s2-a"], "--worker=all"),
])
def test_logs_and_stop(sub, extra, worker):
  (ssh,) = dry_commands([sub, *SLICE, *extra])
  assert worker in ssh and "s2-a" in ssh_command(ssh)


def test_delete_direct_and_queued():
  (direct,) = dry_commands(["delete", *SLICE])
  assert direct[3:6] == ["tpu-vm", "delete", "qwenvl-s2"] and "--quiet" not in direct
  (queued,) = dry_commands(["delete", *MULTI, "--yes"])
  assert queued[3:6] == ["queued-resources", "delete", "qwenvl-ms"] and "--force" in queued and "--quiet" in queued


def test_up_is_create_install_train_in_order():
  commands = gcloud_calls(dry_commands(["up", *SLICE, *TRAIN, "--follow"]))
  verbs = [c[4] for c in commands]
  assert verbs == ["create", "scp", "ssh", "ssh", "ssh"]
  assert "tail -n +1 -F" in ssh_command(commands[-1]) and "--worker=0" in commands[-1]


def test_dry_run_runs_nothing_and_real_run_runs_what_dry_run_prints(fake_gcloud, tmp_path):
  env, log = fake_gcloud
  args = ["train", *SLICE, *TRAIN, "--", SYSTEM]
  printed = gcloud_calls(dry_commands(args, env))
  assert read_recorded(log) == []
  proc = launch(args, env)
  assert proc.returncode == 0, proc.stderr
  assert [["gcloud", *call] for call in read_recorded(log)] == printed


def test_failing_gcloud_stops_the_launcher_with_its_status(tmp_path):
  fake = tmp_path / "bin" / "gcloud"
  fake.parent.mkdir()
  fake.write_text("#!/bin/bash\nexit 7\n")
  fake.chmod(0o755)
  proc = launch(["delete", *SLICE, "--yes"], dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}"))
  assert proc.returncode == 7 and "exited with status 7" in proc.stderr


def test_train_command_survives_quoting_on_a_worker(tmp_path):
  """Runs the remote train command with bash as sshd would, in a fake $HOME whose venv python records argv."""
  commands = dry_commands(["train", *SLICE, *TRAIN, "--", SYSTEM, "--config.total_steps=10"])
  remote = ssh_command(gcloud_calls(commands)[0])
  home = tmp_path / "home"
  (home / "qwenvl_jax").mkdir(parents=True)
  argv_log = tmp_path / "python_calls"
  write_recorder(home / "qwenvl_venv" / "bin" / "python", argv_log)
  # The recorder also records LIBTPU_INIT_ARGS, to check that env values keep their spaces.
  python = home / "qwenvl_venv" / "bin" / "python"
  python.write_text(python.read_text().replace('for a in "$@"', 'for a in "$LIBTPU_INIT_ARGS" "$@"'))
  run = subprocess.run(["bash", "-c", remote], env=dict(os.environ, HOME=str(home)), capture_output=True,
                       text=True, timeout=30, check=False)
  assert run.returncode == 0, run.stderr
  assert "started s2-a" in run.stdout
  deadline = time.monotonic() + 30  # The trainer runs in the background; wait for its record.
  while not read_recorded(argv_log) and time.monotonic() < deadline:
    time.sleep(0.05)
  (call,) = read_recorded(argv_log)
  assert call == ["--xla_tpu_a=true --xla_tpu_b=1", "-m", "qwenvl_jax.train", f"--config={CONFIG}",
                  "--workdir=gs://bucket/runs/stage 2", "--config.distributed.initialize=yes",
                  "--config.data.data_dir=gs://bucket/tfds", SYSTEM, "--config.total_steps=10"]
  assert (home / "qwenvl_jax_logs" / "s2-a.pid").read_text().strip().isdigit()
  # A second start of the same run must not truncate the first one's log.
  (home / "qwenvl_jax_logs" / "s2-a.log").write_text("step 1\n")
  again = subprocess.run(["bash", "-c", remote], env=dict(os.environ, HOME=str(home)), capture_output=True,
                         text=True, timeout=30, check=False)
  assert again.returncode == 1 and "already started" in again.stderr
  assert (home / "qwenvl_jax_logs" / "s2-a.log").read_text() == "step 1\n"


@pytest.mark.parametrize("args,culprit", [
    (["train", *SLICE, f"--config={CONFIG}", "--workdir=/tmp/run", "--run=a"], "--workdir"),
    (["train", *SLICE, f"--config={CONFIG}", "--workdir=gs://b/r", "--data_dir=/data", "--run=a"], "--data_dir"),
    (["train", *SLICE, f"--config={CONFIG}", "--workdir=gs://b/r", "--env=1BAD=x", "--run=a"], "--env"),
    (["train", *SLICE, f"--config={CONFIG}", "--workdir=gs://b/r", "--run=a b"], "--run"),
    (["create", "--name=Bad_Name", "--zone=z", "--topology=v5p-8"], "--name"),
    (["create", "--name=ok", "--zone=z", "--topology=v5p128"], "--topology"),
    (["create", "--name=ok", "--zone=z", "--topology=v5p-8", "--spot", "--reserved"], "--spot"),
    (["delete", *SLICE, "--", "--config.x=1"], "after '--'"),
    (["train", *SLICE, f"--config={CONFIG}", "--workdir=gs://b/r", "--", "--dry-run"], "before '--'"),
    (["logs", *SLICE, "--run=a", "--node=3"], "--node"),
    # Sizes no slice has: sent to gcloud as they were.
    (["create", "--name=ok", "--zone=z", "--topology=v5p-129"], "N is even and at least 8"),
    (["create", "--name=ok", "--zone=z", "--topology=v5e-3"], "the slices are v5e-1, v5e-4"),
])
def test_bad_input_names_the_culprit(args, culprit, fake_gcloud):
  env, log = fake_gcloud
  cut = args.index("--") if "--" in args else len(args)
  proc = launch([*args[:cut], "--dry-run", *args[cut:]], env)
  assert read_recorded(log) == []
  assert proc.returncode == 2
  assert culprit in proc.stderr and proc.stdout.strip() == ""


@pytest.mark.parametrize("args,message", [
    (["create", "--name=ok", "--topology=v5p-8"], "error: the following arguments are required: --zone"),
    (["crate", "--name=ok", "--zone=z"], "error: argument command: invalid choice: 'crate'"),
    (["create", "--name=ok", "--zone=z", "--num_slices=two"], "error: argument --num_slices/--num-slices: invalid"),
])
def test_an_argument_mistake_is_one_line_and_a_hint(args, message, fake_gcloud):
  """argparse printed its usage (5 lines for create) above the line that matters."""
  env, log = fake_gcloud
  proc = launch([*args, "--dry-run"], env)
  assert read_recorded(log) == [] and proc.returncode == 2 and proc.stdout == ""
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 2 and lines[0].startswith(message) and lines[1].startswith("  hint: python launch/tpu.py")


UP = ["up", *SLICE, f"--config={CONFIG}", "--run=s2-a"]


@pytest.mark.parametrize("args,culprit", [
    ([*UP, "--workdir=/tmp/run"], "--workdir"),
    ([*UP, "--workdir=gs://b/r", "--data_dir=/data"], "--data_dir"),
    ([*UP, "--workdir=gs://b/r", "--env=1BAD=x"], "--env"),
    ([*UP[:-1], "--run=a b", "--workdir=gs://b/r"], "--run"),
    ([*UP[:3], "--config=configs/stage9.py", "--workdir=gs://b/r"], "--config"),
    ([*UP, "--workdir=gs://b/r", "--repo=/nonexistent"], "--repo"),
    ([*UP, "--workdir=gs://b/r", "--timeout=0"], "--timeout"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_up_checks_every_argument_before_any_command(args, culprit, dry_run, fake_gcloud):
  """`up` creates a paid slice and installs for minutes: a bad argument must stop it before the first gcloud call
  (issue 17: a local --workdir was refused only after create + install)."""
  env, log = fake_gcloud
  proc = launch([*args, "--dry-run"] if dry_run else args, env)
  assert read_recorded(log) == []
  assert proc.returncode == 2, proc.stderr
  assert culprit in proc.stderr and proc.stdout.strip() == ""
