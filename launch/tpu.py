#!/usr/bin/env python3
"""Launch Qwen-VL training on a Cloud TPU slice: create, install, train, logs, stop, delete (or `up` = all four).

Run from a checkout on any machine with gcloud (Python standard library only, JAX not needed):

  python launch/tpu.py up --name=qwenvl-s2 --zone=us-east5-a --topology=v5p-128 \\
      --config=configs/stage2.py:model=qwen_vl_7b --workdir=gs://my-bucket/runs/stage2 \\
      --data_dir=gs://my-bucket/tfds --run=s2-try1 --follow -- --config.total_steps=1000

Every subcommand takes --dry-run, which prints each command (one per line, shell-quoted) instead of running it.
Arguments after `--` go to `python -m qwenvl_jax.train` unchanged, after the launcher's own flags (so they win).
Pass the same --name/--zone/--num_slices/--queued to every subcommand: they say which TPU VMs to talk to.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=wrong-import-position
import _gcloud  # noqa: E402
import _remote  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_TARBALL = "qwenvl_jax.tar.gz"
MEGASCALE_PORT = "8080"


class Runner:
  """Runs commands, or with `dry_run` only prints them (stdout, one shell-quoted line each)."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def note(self, text: str) -> None:
    print(f"# {text}", file=sys.stdout if self.dry_run else sys.stderr, flush=True)

  def run(self, argv: list[str]) -> None:
    if self.dry_run:
      print(shlex.join(argv), flush=True)
      return
    print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
    subprocess.run(argv, check=True)

  def output(self, argv: list[str], placeholder: str) -> str:
    """The command's stdout, stripped; in a dry run, `placeholder`."""
    if self.dry_run:
      print(shlex.join(argv), flush=True)
      return placeholder
    print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def _slice(args: argparse.Namespace) -> _gcloud.Slice:
  return _gcloud.Slice(name=args.name, zone=args.zone, project=args.project, topology=args.topology,
                       num_slices=args.num_slices, queued=args.queued)


def _jax_tpu_requirement(repo: str) -> str:
  """'jax[tpu]==<the jax pin of requirements.txt>', so workers run the JAX the project is tested with."""
  path = os.path.join(repo, "requirements.txt")
  with open(path, encoding="utf-8") as f:
    for line in f:
      match = re.fullmatch(r"jax==([^\s#]+)", line.strip())
      if match:
        return f"jax[tpu]=={match.group(1)}"
  raise ValueError(f"no 'jax==<version>' pin in {path}; the workers' JAX version must be pinned")


def _gcs(flag: str, value: str) -> str:
  if not value.startswith("gs://"):
    raise ValueError(f"--{flag} {value!r} must be a gs:// path: every worker of the slice reads or writes it")
  return value


def cmd_create(args, runner: Runner) -> None:
  s = _slice(args)
  for argv in _gcloud.create(s, runtime_version=args.runtime_version, spot=args.spot, reserved=args.reserved):
    runner.run(argv)
  if args.wait or args.command == "up":
    wait_active(s, runner, args.timeout)


def wait_active(s: _gcloud.Slice, runner: Runner, timeout: float) -> None:
  """Polls a queued resource until it is ACTIVE (a direct `tpu-vm create` returns when the VM is up)."""
  commands = _gcloud.wait_ready(s)
  if not commands:
    return
  deadline = time.monotonic() + timeout
  while True:
    state = runner.output(commands[0], "ACTIVE")
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      raise RuntimeError(f"queued resource {s.name} is {state}; see: gcloud compute tpus queued-resources "
                         f"describe {s.name} --zone={s.zone}")
    if time.monotonic() > deadline:
      raise TimeoutError(f"queued resource {s.name} is still {state or 'unknown'} after {timeout:.0f} s")
    runner.note(f"{s.name} is {state or 'not visible yet'}; checking again in 30 s")
    time.sleep(30)


def cmd_install(args, runner: Runner) -> None:
  s = _slice(args)
  repo = os.path.abspath(args.repo)
  requirement = _jax_tpu_requirement(repo)
  local = os.path.join(tempfile.gettempdir(), f"qwenvl_jax-{s.name}.tar.gz")
  dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True, check=False).stdout.strip()
  if dirty:
    runner.note(f"uncommitted changes in {repo} are not shipped: the workers get git ref {args.ref}")
  runner.run(["git", "-C", repo, "archive", "--format=tar.gz", "-o", local, args.ref])
  for node in s.nodes:
    runner.run(_gcloud.scp(s, node, local, REMOTE_TARBALL))
  script = _remote.install_script(REMOTE_TARBALL, requirement)
  for node in s.nodes:
    runner.run(_gcloud.ssh(s, node, script))
  runner.run(["rm", "-f", local])


def _trainer_args(args, s: _gcloud.Slice) -> list[str]:
  flags = [f"--config={args.config}", f"--workdir={_gcs('workdir', args.workdir)}",
           # JAX finds the pod's other hosts from the TPU metadata; the trainer's 'auto' only looks at env vars.
           "--config.distributed.initialize=yes"]
  if args.data_dir:
    flags.append(f"--config.data.data_dir={_gcs('data_dir', args.data_dir)}")
  if s.num_slices > 1:
    flags.append(f"--config.mesh.dcn.data={s.num_slices}")
  return flags + list(args.trainer_args)


def cmd_train(args, runner: Runner) -> None:
  s = _slice(args)
  run = _remote.check_run_name(args.run or f"{s.name}-{time.strftime('%Y%m%d-%H%M%S')}")
  trainer_args = _trainer_args(args, s)
  env = _remote.parse_env(args.env)
  if s.num_slices > 1:
    # Multi-slice: every slice must know the coordinator (worker 0 of the first slice) and its own index.
    coordinator = runner.output(_gcloud.worker0_ip(s), f"<internal IP of {s.nodes[0]} worker 0>")
    env.update(MEGASCALE_COORDINATOR_ADDRESS=coordinator, MEGASCALE_PORT=MEGASCALE_PORT,
               MEGASCALE_NUM_SLICES=str(s.num_slices))
  for index, node in enumerate(s.nodes):
    node_env = dict(env, MEGASCALE_SLICE_ID=str(index)) if s.num_slices > 1 else env
    runner.run(_gcloud.ssh(s, node, _remote.train_script(run, trainer_args, node_env)))
  runner.note(f"run {run}: stream its log with: python launch/tpu.py logs --name={s.name} --zone={s.zone} "
              f"--run={run}" + (f" --num_slices={s.num_slices}" if s.num_slices > 1 else ""))
  if args.follow:
    runner.run(_gcloud.ssh(s, s.nodes[0], _remote.logs_script(run), worker="0"))


def cmd_logs(args, runner: Runner) -> None:
  s = _slice(args)
  if not 0 <= args.node < len(s.nodes):
    raise ValueError(f"--node {args.node}: there are {len(s.nodes)} slice(s)")
  runner.run(_gcloud.ssh(s, s.nodes[args.node], _remote.logs_script(args.run, follow=not args.no_follow),
                         worker=args.worker))


def cmd_stop(args, runner: Runner) -> None:
  s = _slice(args)
  for node in s.nodes:
    runner.run(_gcloud.ssh(s, node, _remote.stop_script(args.run)))


def cmd_delete(args, runner: Runner) -> None:
  for argv in _gcloud.delete(_slice(args), yes=args.yes):
    runner.run(argv)


def cmd_up(args, runner: Runner) -> None:
  cmd_create(args, runner)
  cmd_install(args, runner)
  cmd_train(args, runner)


def check_args(args) -> None:
  """Every check of the arguments that needs no command, run before the first one: `up` creates a paid slice and
  installs for minutes before `train` would find a bad --workdir.

  Raises:
    ValueError: naming the flag.
  """
  s = _slice(args)  # name, zone, topology, slice count
  if args.command in ("create", "up") and args.timeout <= 0:
    raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
  if args.command in ("install", "up"):
    repo = os.path.abspath(args.repo)
    if not os.path.isdir(os.path.join(repo, ".git")) and not os.path.isfile(os.path.join(repo, ".git")):
      raise ValueError(f"--repo {args.repo}: not a git checkout (its committed files are what the workers get)")
    _jax_tpu_requirement(repo)
  if args.command in ("train", "up"):
    _trainer_args(args, s)  # --workdir and --data_dir must be gs://
    if args.run:
      _remote.check_run_name(args.run)
    _remote.parse_env(args.env)
    config_file = os.path.join(REPO_ROOT, args.config.partition(":")[0])
    if not os.path.isfile(config_file) and not os.path.isfile(args.config.partition(":")[0]):
      raise ValueError(f"--config {args.config}: no such config file")
  if args.command in ("logs", "stop"):
    _remote.check_run_name(args.run)
  if args.command == "logs" and not 0 <= args.node < len(s.nodes):
    raise ValueError(f"--node {args.node}: there are {len(s.nodes)} slice(s)")


class _Parser(argparse.ArgumentParser):
  """argparse with a mistake as one `error:` line and a hint, exit 2 (argparse prints its whole usage above it)."""

  def error(self, message: str):
    command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
    print(f"error: {message}\n  hint: python launch/tpu.py {command + ' ' if command else ''}--help lists the flags",
          file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", required=True, help="TPU VM name; queued-resource id and node prefix if queued")
  common.add_argument("--zone", required=True, help="GCE zone, e.g. us-east5-a")
  common.add_argument("--project", default="", help="GCP project (default: gcloud's)")
  common.add_argument("--topology", default="v5p-8", help="accelerator type: v5p-128, v4-128, v5e-256, v6e-64 ...")
  common.add_argument("--num_slices", "--num-slices", type=int, default=1, help="slices over DCN (queued)")
  common.add_argument("--queued", action="store_true", help="use a queued resource even for one slice")
  common.add_argument("--dry_run", "--dry-run", action="store_true", help="print the commands, run nothing")

  create = argparse.ArgumentParser(add_help=False)
  create.add_argument("--runtime_version", default="", help="TPU VM software (default per generation)")
  create.add_argument("--spot", action="store_true", help="spot capacity (can be preempted)")
  create.add_argument("--reserved", action="store_true", help="use the project's reservation")
  create.add_argument("--wait", action="store_true", help="wait until a queued resource is ACTIVE")
  create.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait for ACTIVE")

  install = argparse.ArgumentParser(add_help=False)
  install.add_argument("--repo", default=REPO_ROOT, help="checkout to ship (default: this one)")
  install.add_argument("--ref", default="HEAD", help="git ref to ship")

  train = argparse.ArgumentParser(add_help=False)
  train.add_argument("--config", required=True, help="experiment config, e.g. configs/stage2.py:model=qwen_vl_7b")
  train.add_argument("--workdir", required=True, help="gs:// run directory (checkpoints, metrics)")
  train.add_argument("--data_dir", default="", help="gs:// TFDS data dir (config.data.data_dir)")
  train.add_argument("--run", default="", help="run name for the log files (default: <name>-<time>)")
  train.add_argument("--env", action="append", default=[], help="NAME=VALUE for the trainer (repeatable)")
  train.add_argument("--follow", action="store_true", help="stream worker 0's log after starting")

  run_name = argparse.ArgumentParser(add_help=False)
  run_name.add_argument("--run", required=True, help="run name given to `train`")

  parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("create", parents=[common, create], help="create the slice(s)").set_defaults(fn=cmd_create)
  sub.add_parser("install", parents=[common, install], help="ship this checkout to every worker and pip install"
                 ).set_defaults(fn=cmd_install)
  sub.add_parser("train", parents=[common, train], help="start the trainer on every worker").set_defaults(
      fn=cmd_train)
  logs = sub.add_parser("logs", parents=[common, run_name], help="stream a run's log")
  logs.add_argument("--worker", default="0", help="worker index, or 'all'")
  logs.add_argument("--node", type=int, default=0, help="slice index (multi-slice)")
  logs.add_argument("--no_follow", action="store_true", help="print the log and return")
  logs.set_defaults(fn=cmd_logs)
  sub.add_parser("stop", parents=[common, run_name], help="SIGTERM the run (it checkpoints first)").set_defaults(
      fn=cmd_stop)
  delete = sub.add_parser("delete", parents=[common], help="delete the slice(s)")
  delete.add_argument("--yes", action="store_true", help="do not ask before deleting")
  delete.set_defaults(fn=cmd_delete)
  sub.add_parser("up", parents=[common, create, install, train], help="create + install + train").set_defaults(
      fn=cmd_up)
  return parser


def main(argv: list[str]) -> int:
  trainer_args: list[str] = []
  if "--" in argv:
    cut = argv.index("--")
    argv, trainer_args = argv[:cut], argv[cut + 1:]
  if {"--dry-run", "--dry_run"} & set(trainer_args):
    # The trainer has no such flag: the user meant the launcher's, and must not get a real launch instead.
    print("error: --dry-run after '--' would go to the trainer; put it before '--'", file=sys.stderr)
    return 2
  args = _parser().parse_args(argv)
  args.trainer_args = trainer_args
  if trainer_args and args.command not in ("train", "up"):
    print(f"error: arguments after '--' are for the trainer; `{args.command}` takes none", file=sys.stderr)
    return 2
  try:
    check_args(args)
    args.fn(args, Runner(args.dry_run))
  except (ValueError, RuntimeError, TimeoutError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except subprocess.CalledProcessError as e:
    print(f"error: `{shlex.join(e.cmd)}` exited with status {e.returncode}", file=sys.stderr)
    return e.returncode or 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
