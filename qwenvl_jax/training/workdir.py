"""The run directory: where it is, and whether this config may resume what it holds.

A workdir records the config that created it in `config.json`. A later run in the same workdir resumes from its
latest checkpoint only if the config is the same up to the keys that may change between restarts (run length,
logging and checkpoint cadence, launcher settings); otherwise it refuses with the differing keys, so a user's
checkpoints are never continued with (or overwritten by) a different experiment by accident.

`config.resume`: 'auto' (resume a matching run, refuse a different one), 'force' (resume whatever is there; the
new config is recorded beside the old one once its checkpoint has restored), 'never' (refuse any workdir that
already holds checkpoints).

Remote workdirs: every workdir operation of the trainer (this file, `checkpointing`, `metrics`, the tokenizer file
of `experiment`) goes through `etils.epath.Path`, so `--workdir=gs://bucket/run` (what `launch/tpu.py` requires:
all workers of a pod write there) is used as given; only local paths are made absolute. epath reads and writes
gs:// through fsspec, so a TPU VM needs `pip install gcsfs==2026.10.1` (it also brings google-cloud-storage,
which tensorboardX needs for gs:// event files). It is not in requirements.txt: nothing here can reach GCS, and
the tests use an in-memory filesystem in its place (tests/training/test_remote_paths.py).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from etils import epath
import jax
import ml_collections

from qwenvl_jax import errors, new_files, tree_paths

# Keys that may differ between a run and its resumption (cpu_options: how the same parameters are computed; a run
# from before it existed resumes too).
RESUMABLE_KEYS = ("total_steps", "stop_at_step", "log_every", "checkpoint", "workdir", "resume", "progress_bar",
                  "tensorboard", "peak_flops_per_device", "distributed", "init", "eval_every", "eval",
                  "profile_steps", "cpu_options")


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (`gs://bucket/dir`, `s3://...`) rather than a local path."""
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute, a URL (`gs://bucket/dir`) kept as given."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def resolve(config: ml_collections.ConfigDict) -> str:
  """`config.workdir`, or `./runs/stage<N>` when empty: a local path made absolute, a URL kept as given."""
  return absolute(config.workdir or os.path.join("runs", f"stage{config.stage}"))


# The fsspec package of each URL scheme: epath reads and writes URLs through fsspec (without TensorFlow installed),
# whose filesystems for object stores are separate packages.
_URL_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "az": "adlfs", "abfs": "adlfs"}


def check_usable(workdir: str) -> None:
  """Refuses a workdir that is another tool's folder or lies inside a run's checkpoints folder, a URL whose
  filesystem package is not installed, and a local workdir that is a file or lies under a file (checked before
  anything is written).

  Raises:
    errors.UserFileExistsError: naming the file or the run in the way.
    errors.UserError: a URL (gs://) whose filesystem package (gcsfs) is not installed, naming the package.
  """
  # Another tool's folder (a model download holds a config.json and a tokenizer.model of its own): refused here,
  # before checkpoints/ or a config.json of ours is written into it.
  record = epath.Path(workdir) / "config.json"
  try:
    is_record = record.is_file()
  except ImportError as e:  # the first access to a URL: fsspec names the missing package in a 60-line traceback
    scheme = workdir.partition("://")[0]
    package = _URL_PACKAGES.get(scheme)
    raise errors.UserError(
        f"workdir {workdir}: {scheme}:// paths need the {package} package, which is not installed" if package else
        f"workdir {workdir}: {e}", hint=f"pip install {package}" if package else None) from e
  if is_record:
    _check_is_run_config(record)
  _check_not_in_checkpoints(workdir)
  if is_remote(workdir):
    return
  path = os.path.abspath(workdir)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    what = "is a file" if path == os.path.abspath(workdir) else f"lies under {path}, which is a file"
    raise errors.UserFileExistsError(f"workdir {workdir} {what}, not a folder", "choose another --workdir")
  own_vocab = os.path.join(workdir, "tokenizer.model")
  if os.path.isfile(own_vocab):
    from qwenvl_jax import text  # pylint: disable=g-import-not-at-top
    try:
      text.SentencePieceTokenizer(own_vocab)
    except ValueError as e:
      raise errors.UserFileExistsError(f"{own_vocab} is not the synthetic vocabulary of a qwenvl_jax run ({e})",
                                       hint="choose another --workdir") from e


def create(workdir: str) -> None:
  """Creates a local workdir (process 0 only).

  Nothing is created for a URL: object stores have no directories, and gcsfs' `makedirs` would try to create a
  missing bucket rather than fail.
  """
  if jax.process_index() == 0 and not is_remote(workdir):
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)


def create_shared(workdir: str) -> None:
  """`create`s the workdir and refuses, on every process, a multi-process run whose processes do not see one and
  the same local workdir (with one process, or for a URL, only `create`: every host that names a bucket path sees
  the same one).

  Process 0 writes a probe file with a random token, every process reads it back, and all learn who did not see
  it. Without this, a workdir local to each host (`--workdir=/tmp/run` on every host, or different --workdir
  flags) trained until the first checkpoint, where the others' parts of it were missing: one process failed and
  the rest waited 5 minutes and aborted, leaving a checkpoint that never completed; a resume saw checkpoints on one
  host only. Every outcome is shared before anyone raises, so no process is left waiting in a collective.

  Raises:
    errors.UserError: process 0 cannot write there, or naming the processes that do not see its file.
  """
  # URLs are skipped: a bucket is shared by construction, and gcsfs answers `is_file` from the listing that
  # `contents` cached on each process, without the probe written since (a correct gs:// run would be refused).
  if jax.process_count() == 1 or is_remote(workdir):
    create(workdir)
    return
  import uuid  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  token = np.frombuffer(uuid.uuid4().bytes, np.uint8)
  written = 1
  if jax.process_index() == 0:
    try:  # the folder too: a mkdir that fails on process 0 alone would strand the others in the broadcast below
      create(workdir)
      (epath.Path(workdir) / f".shared-probe-{token.tobytes().hex()}").write_text(
          "qwenvl_jax: every process of a run reads this file back")
    except Exception as e:  # pylint: disable=broad-except  (said on every process below, not raised on one alone)
      written = 0
      print(f"workdir {workdir}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
  # Process 0 has written the file (or failed to) before it sends the token; the others look for that file.
  sent = np.asarray(multihost_utils.broadcast_one_to_all(np.concatenate([token, np.uint8([written])])), np.uint8)
  if not sent[-1]:
    raise errors.UserError(f"workdir {workdir}: process 0 cannot create it or write a file there (its log says why)",
                           hint="every process needs the same --workdir on writable storage all hosts see")
  probe = epath.Path(workdir) / f".shared-probe-{sent[:-1].tobytes().hex()}"
  try:
    seen = probe.is_file()
  except Exception:  # pylint: disable=broad-except  (an unreadable folder is one this process does not see)
    seen = False
  blind = np.nonzero(np.asarray(multihost_utils.process_allgather(np.int32(seen))) == 0)[0].tolist()
  if jax.process_index() == 0:
    try:
      probe.unlink()
    except OSError:
      pass  # a hidden probe file left behind is harmless; failing here alone would strand the other processes
  if blind:
    raise errors.UserError(
        f"workdir {workdir} is not one folder shared by the {jax.process_count()} processes: process(es) "
        f"{', '.join(map(str, blind))} do not see the file process 0 wrote there (a local folder on each host?)",
        hint="every process needs the same --workdir on storage all hosts see: a gs:// path, NFS or gcsfuse")


def contents(workdir: str) -> frozenset[str] | None:
  """The names of the entries in `workdir`, or None when it does not exist (taken before a run writes into it)."""
  path = epath.Path(workdir)
  return frozenset(p.name for p in path.iterdir()) if path.is_dir() else None


def has_checkpoint(workdir: str) -> bool:
  """Whether `<workdir>/checkpoints` holds a finished step (a folder named by its step; Orbax's temporary folders
  of an unfinished save are not)."""
  path = epath.Path(workdir) / "checkpoints"
  return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


# What the trainer writes at the top of its workdir before its first logged step, and a failed start removes.
# `profile/` is not among them: a trace of the steps before a crash is what one wants to read after it.
_START_FILES = ("config.json", "tokenizer.model", "checkpoints", "tensorboard")


def remove_new(workdir: str, before: frozenset[str] | None) -> None:
  """Undoes a start that failed before its first checkpoint (process 0 only): removes what the trainer writes
  (`_START_FILES`, metrics.jsonl and its temporaries) when it was not in `before` (the workdir's `contents` when
  the run started), and the workdir itself when it did not exist then and is left empty. Nothing that was there
  before is touched, nor anything else that appeared meanwhile (another job's run in a shared folder named as the
  workdir by mistake), and a workdir holding a checkpoint is left as it is.

  Without this, a start that failed after the config checks (a data source whose every record is bad, found when
  the first batch is read) left a config.json that refused the corrected command and a checkpoints/ that looked
  like a run. A run that logged a step is no failed start: it keeps everything (its metrics.jsonl is the record
  of what it did before a non-finite loss stopped it, or Ctrl-C, before its first checkpoint).
  """
  if jax.process_index() != 0 or has_checkpoint(workdir):
    return
  path = epath.Path(workdir)
  if not path.is_dir():
    return
  logged = path / "metrics.jsonl"
  if logged.is_file() and logged.read_text().strip():
    return
  for entry in path.iterdir():
    written = entry.name in _START_FILES or entry.name.startswith("metrics.jsonl")
    if written and (before is None or entry.name not in before):
      entry.rmtree() if entry.is_dir() else entry.unlink()
  if before is None and not is_remote(workdir) and not any(path.iterdir()):
    path.rmdir()


def _comparable(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  as_dict = json.loads(config.to_json()) if isinstance(config, ml_collections.ConfigDict) else config
  flat = tree_paths.flatten(as_dict)
  return {k: v for k, v in flat.items() if k.split(".")[0] not in RESUMABLE_KEYS}


def config_differences(old: dict, new: ml_collections.ConfigDict) -> list[str]:
  """'key: old -> new' for every key that differs outside RESUMABLE_KEYS."""
  a, b = _comparable(old), _comparable(new)
  return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


# Fields every run's config.json has: a config.json without them belongs to something else (a model folder).
_RUN_KEYS = ("stage", "model", "optimizer", "total_steps")


def _is_run_config(path: epath.Path) -> bool:
  """Whether `path` is a run's config.json (a JSON object with the `_RUN_KEYS` fields)."""
  try:
    recorded = json.loads(path.read_text()) if path.is_file() else None
  except (json.JSONDecodeError, UnicodeDecodeError, OSError):
    return False
  return isinstance(recorded, dict) and all(k in recorded for k in _RUN_KEYS)


def _check_not_in_checkpoints(workdir: str) -> None:
  """Refuses a workdir inside the checkpoints/ folder of a run (`RUN/checkpoints`, `RUN/checkpoints/10`): a new
  run would train from scratch among that run's checkpoints, where its manager keeps and deletes steps."""
  path = epath.Path(workdir)
  for folder in (path, *path.parents):
    if folder.name == "checkpoints" and _is_run_config(folder.parent / "config.json"):
      run = folder.parent
      raise errors.UserFileExistsError(
          f"workdir {workdir} lies inside the checkpoints folder of the run {run}",
          hint=f"to resume that run use --workdir={run}; to train from its weights use --config.init=trainer:{run} "
               "with a workdir of its own")


def _check_is_run_config(path) -> None:
  try:
    recorded = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.UserFileExistsError(f"{path} is not a qwenvl_jax run's config (not JSON: {e})",
                                     hint="choose another --workdir") from e
  if not isinstance(recorded, dict) or not all(k in recorded for k in _RUN_KEYS):
    raise errors.UserFileExistsError(f"{path} is not a qwenvl_jax run's config (no {'/'.join(_RUN_KEYS)} fields; "
                                     "another tool's folder?)", hint="choose another --workdir")


def check_and_record(workdir: str, config: ml_collections.ConfigDict, latest_step: int | None) -> bool:
  """Refuses a workdir this config may not resume (see module docstring) and records the config on a new run.

  Returns whether this is a forced resume with a changed config, which the trainer records with
  `record_resumed` once a checkpoint has restored (written before, it outlived a resume that failed).

  Raises:
    FileExistsError: the workdir holds checkpoints of a different config, or any checkpoint with resume='never'.
  """
  if config.resume not in ("auto", "force", "never"):
    raise ValueError(f"config.resume must be 'auto', 'force' or 'never', got {config.resume!r}")
  path = epath.Path(workdir) / "config.json"
  if latest_step is not None:
    if config.resume == "never":
      raise FileExistsError(f"{workdir} already holds checkpoints (latest step {latest_step}) and "
                            "config.resume='never'; choose another --workdir, or resume with --config.resume=auto")
    if not path.exists() and config.resume != "force":
      raise FileExistsError(f"{workdir} holds checkpoints (latest step {latest_step}) but no config.json saying "
                            "which config wrote them; choose another --workdir, or continue them with this config "
                            "via --config.resume=force")
    if path.exists():
      old = json.loads(path.read_text())
      diffs = config_differences(old, config)
      if diffs and config.resume != "force":
        raise FileExistsError(
            f"{workdir} holds checkpoints (latest step {latest_step}) of a different config:\n  "
            + "\n  ".join(diffs)
            + "\nChoose another --workdir, or continue those checkpoints with the new config via "
              "--config.resume=force.")
      if old.get("total_steps") != config.total_steps and jax.process_index() == 0:
        # Resumable, but not neutral: the schedule's decay is laid over the new length.
        print(f"note: total_steps {old.get('total_steps')} -> {config.total_steps} (the run started with "
              f"{old.get('total_steps')}): the learning-rate schedule now spans {config.total_steps} steps, so "
              f"the rate at step {latest_step + 1} is that schedule's, not the old one's", flush=True)
      return bool(diffs)
    return False
  if jax.process_index() == 0 and not path.exists():
    _write_whole(path, config.to_json(indent=2))
  elif jax.process_index() == 0:
    old = json.loads(path.read_text())
    diffs = config_differences(old, config)
    if diffs:
      # A run that died before its first checkpoint: nothing to resume, but the file is the user's record.
      raise FileExistsError(f"{path} records a different config and there is no checkpoint to resume:\n  "
                            + "\n  ".join(diffs) + f"\nChoose another --workdir or remove {path}.")
  return False


def record_resumed(workdir: str, config: ml_collections.ConfigDict, step: int) -> str:
  """Writes the config of a forced resume from `step` beside the run's `config.json` (process 0), as
  `config.resumed_at_<step>.json` (`-<k>` added when an earlier forced resume from the same step left one: each
  is the record of a config that ran). Returns its path."""
  directory = epath.Path(workdir)
  path, k = directory / f"config.resumed_at_{step}.json", 0
  if jax.process_index() != 0:  # only process 0 writes (and probes: another would see its file)
    return os.fspath(path)
  while path.exists():
    k += 1
    path = directory / f"config.resumed_at_{step}-{k}.json"
  _write_whole(path, config.to_json(indent=2))
  return os.fspath(path)


def _write_whole(path: epath.Path, text: str) -> None:
  """Writes a record whole or not at all. A run killed while writing its config.json used to leave half of it,
  which the rerun refused as another tool's file ("not JSON"). An object store's write is whole already."""
  if is_remote(path):
    path.write_text(text)
  else:
    new_files.replace_whole(path, text)
