"""Where a training run keeps its checkpoints, and how a user names one step of it.

A run (the trainer's workdir) holds `config.json` and `checkpoints/<step>/{params, opt_state, data, meta}`; a step
is finished once its `params` folder exists (Orbax writes a step under a temporary name and renames it when done).
A user names one step as `RUN@STEP` (`config.init=trainer:`, `convert --src`, `--checkpoint` of generate, serve
and evaluate) or by its folder, `RUN/checkpoints/STEP` or `RUN/checkpoints/STEP/params`.

The rules live here, one layer below their users: the trainer (`training`) and the loaders (`inference`) read the
same names and may not import each other. Paths are local (made absolute) or URLs (`gs://bucket/run`, kept).
"""

from __future__ import annotations

import os

from etils import epath


def _path(path: str | os.PathLike) -> epath.Path:
  path = os.fspath(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


def split_step(spec: str) -> tuple[str, str]:
  """(run, step text or '') of `RUN[@STEP]`: the last '@' names the step, unless the whole is an existing path (a
  run whose folder name holds an '@'). The step text is not checked: callers say in their own terms that it must be
  a number."""
  run, at, step = spec.rpartition("@")
  if not at or _path(spec).exists():
    return spec, ""
  return run, step


def step_folder(path: str) -> tuple[str, int] | None:
  """(run, step) when `path` is a step's folder, `RUN/checkpoints/STEP` or `RUN/checkpoints/STEP/params` (a
  local run made absolute), else None. Only the names are read; nothing needs to exist."""
  folder = os.fspath(_path(path)).rstrip("/")
  if folder.endswith("/params"):
    folder = folder[:-len("/params")]
  run, _, step = folder.rpartition("/")
  run, _, name = run.rpartition("/")
  if step.isdigit() and name == "checkpoints" and run:
    return run, int(step)
  return None


def finished_steps(run: str) -> list[int]:
  """The steps of a run's `checkpoints/` that hold their params (a step being written has none yet), ascending."""
  directory = _path(run) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit() and (d / "params").is_dir())
