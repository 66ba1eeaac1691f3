"""Bookkeeping of an evaluation run: sharding, per-process prediction ledgers (resume), merge, final JSON.

Layout for an output file `OUT.json`:
  OUT.json.partial/lock                  held by the job writing the folder (`output_lock`): one job per output
  OUT.json.partial/run.json              the settings that decide the predictions, of the run that started
  OUT.json.partial/process-00000.jsonl   one ledger per process: a JSON line per finished example,
  OUT.json.partial/process-00001.jsonl   {"id": example id, "prediction": str or int[, "extra": {...}]}
  OUT.json                               written once, atomically, by process 0 at the end; never overwritten

A run proceeds as:
  1. every process: `check_output_free(OUT)`; process 0: `check_run_settings(partial_dir(OUT), settings)` (a
     resumed run with other settings would mix predictions of two setups); `done = read_ledgers(partial_dir(OUT))`;
     `todo = [e for e in examples if e.example_id not in done]`; `mine = shard(todo, count, index)`.
     All processes must read the ledgers *before any of them appends* (a barrier between step 1 and 2),
     so that they agree on `todo` and the shards partition it.
  2. every process: `ledger = PredictionLedger(partial_dir(OUT), index)`; `ledger.append([...])` after each
     batch (flushed and fsynced, so a killed run loses at most the batch in flight).
  3. barrier; process 0: `finalize(task, examples, partial_dir(OUT), OUT)`, which removes OUT.json.partial/
     (kept when it holds predictions past `max_examples`, an earlier run's, for a later run to score).
On resume the same steps skip what any earlier process finished, whatever the earlier process count was; the
settings are compared as the caller resolves them (the runner: paths resolved, so another spelling of the same
checkpoint resumes). A folder without a finished prediction holds nothing to protect: another run's settings
replace its own, and a run that stops before its first prediction removes it (`discard_unstarted`).
The ledgers must be on storage all processes see (one host, NFS, or a FUSE-mounted bucket); the output is a local
(or mounted) path, never a URL.

A line torn by a crash (no final newline) is ignored when reading and cut off before the next append; any
other unreadable line is an error that names the file and line.
"""
import json
import logging
import os
import pathlib
import sys
import tempfile
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, TypeVar, Union

from qwenvl_jax import errors, new_files
from qwenvl_jax.evaluation import output_lock
from qwenvl_jax.evaluation.readers import EvalExample

PathLike = Union[str, os.PathLike]
T = TypeVar("T")


def shard(items: Sequence[T], num_shards: int, index: int) -> List[T]:
  """Contiguous shard `index` of `num_shards`; the first len % num_shards shards get one more item.

  The shards partition `items` in order (each item exactly once, no padding), like the reference's
  InferenceSampler.
  """
  if num_shards < 1 or not 0 <= index < num_shards:
    raise ValueError(f"need num_shards >= 1 and 0 <= index < num_shards, got {num_shards}, {index}")
  base, extra = divmod(len(items), num_shards)
  start = index * base + min(index, extra)
  return list(items[start:start + base + (index < extra)])


def partial_dir(output_path: PathLike) -> pathlib.Path:
  """The directory of the per-process ledgers that belong to the final file `output_path`."""
  output_path = pathlib.Path(output_path)
  return output_path.with_name(output_path.name + ".partial")


def check_output_free(output_path: PathLike) -> None:
  """Fails early (before any work) when the final results file already exists; creates its folder when missing.

  Raises:
    errors.ConfigError: the path is a URL (gs://...): the results and their ledgers are written with local file
      operations (fsync, hard links, atomic renames), which pathlib would silently apply to a local folder
      named `gs:`; or it names a folder (ends with a slash, or is one).
    errors.UserFileExistsError: the results file exists, or a file stands where its folder should be.
  """
  if "://" in os.fspath(output_path):
    raise errors.ConfigError(f"the results file {os.fspath(output_path)} is a URL; results and their resume "
                             "ledgers are written to local (or mounted) storage only",
                             "write to a local path, or to a mounted bucket (e.g. gcsfuse), and copy it afterwards")
  text = os.fspath(output_path)
  if text.endswith(("/", os.sep)) or os.path.isdir(text):
    # pathlib drops a trailing slash: `results/` became a results file named `results`.
    raise errors.ConfigError(f"the results file {text} is a folder; the output names the results JSON file itself",
                             f"e.g. {os.path.join(text, 'TASK.json')}")
  output_path = pathlib.Path(output_path)
  if output_path.exists():
    raise errors.UserFileExistsError(f"the results file {output_path} already exists; it is never overwritten",
                                     "choose another output path or move it away")
  try:
    output_path.parent.mkdir(parents=True, exist_ok=True)
  except (FileExistsError, NotADirectoryError) as e:
    raise errors.UserFileExistsError(f"cannot create the folder of the results file {output_path}: a file is in "
                                     "the way", "choose another output path") from e


def _ledger_lines(path: pathlib.Path):
  """Yields (line number, record) of the complete lines of a ledger; a torn last line is skipped."""
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")
  if lines[-1]:
    logging.warning("%s: ignoring an incomplete last line (a run stopped while writing it)", path)
  for lineno, raw in enumerate(lines[:-1], start=1):
    try:
      record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}:{lineno}: unreadable ledger line ({e})") from e
    if not isinstance(record, dict) or "id" not in record or "prediction" not in record:
      raise ValueError(f"{path}:{lineno}: a ledger line must be an object with 'id' and 'prediction'")
    yield lineno, record


def read_ledgers(directory: PathLike) -> Dict[Any, Dict[str, Any]]:
  """All finished records of all process ledgers in `directory`, by example id ({} when there are none).

  Raises:
    ValueError: an unreadable line, or one example recorded twice with different predictions.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return {}
  records: Dict[Any, Dict[str, Any]] = {}
  where: Dict[Any, str] = {}
  for path in sorted(directory.glob("process-*.jsonl")):
    for lineno, record in _ledger_lines(path):
      example_id = record["id"]
      if isinstance(example_id, list):  # JSON arrays are not hashable ids
        raise ValueError(f"{path}:{lineno}: an example id must be a number or a string, got {example_id!r}")
      if example_id in records and records[example_id]["prediction"] != record["prediction"]:
        raise ValueError(f"example {example_id!r} has two different predictions: {where[example_id]} and "
                         f"{path}:{lineno}")
      records.setdefault(example_id, record)
      where.setdefault(example_id, f"{path}:{lineno}")
  return records


def check_run_settings(directory: PathLike, settings: Mapping[str, Any], *,
                       resolve_recorded: Optional[Callable[[str, Any], Any]] = None) -> None:
  """Records `settings` (JSON-able) in `directory/run.json`, or checks them against those recorded there.

  The settings are what decides the predictions (checkpoint, data, few-shot draw, ...): ledgers written under
  other settings must not be merged into this run's results. Ledgers of a version that wrote no run.json are
  taken as they are (the settings are recorded from now on). A folder that holds no finished prediction yet (a
  run that failed before its first batch) holds nothing to mix: its settings are replaced by these.

  Args:
    directory: the ledger folder (`partial_dir(OUT)`).
    settings: this run's settings, paths already resolved the way the caller records them.
    resolve_recorded: (key, recorded value) -> the value to compare with `settings[key]`; lets a value recorded
      in another spelling (a relative path, as earlier versions recorded it) match its resolved form.

  Raises:
    ValueError: `directory` holds the predictions of a run with other settings (the differing keys are named).
  """
  directory = pathlib.Path(directory)
  path = directory / "run.json"
  settings = json.loads(json.dumps(dict(settings)))  # as they read back (tuples become lists)
  if path.exists():
    try:
      recorded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: unreadable ({e}); it holds the settings of the run that started these ledgers") from e
    resolve = resolve_recorded or (lambda key, value: value)
    # A setting the recorded run.json lacks was added by a later version (the int4 group size): the earlier run
    # could not record it, and its ledgers are taken as ledgers without a run.json are.
    differ = sorted(k for k in recorded if resolve(k, recorded.get(k)) != settings.get(k))
    if not differ:
      return
    finished = len(read_ledgers(directory))
    if finished:
      changes = ", ".join(f"{k}: {recorded.get(k)!r} -> {settings.get(k)!r}" for k in differ)
      raise ValueError(f"{directory} holds {finished} predictions of a run with other settings ({changes}); "
                       f"resuming would mix them into one result: rerun with the settings recorded in {path} to "
                       f"resume, or choose another output")
    logging.info("%s: no prediction finished under the recorded settings; recording this run's", directory)
  directory.mkdir(parents=True, exist_ok=True)
  new_files.replace_whole(path, json.dumps(settings, indent=1), tmp_prefix=".run.")


def discard_unstarted(directory: PathLike, settings: Mapping[str, Any]) -> bool:
  """Removes the ledger folder `directory` when it holds no finished prediction and records `settings` (a run that
  failed before its first batch leaves nothing behind); returns whether it did. A folder with predictions, or
  one another run recorded other settings in meanwhile, is left as it is."""
  directory = pathlib.Path(directory)
  try:
    if json.loads((directory / "run.json").read_text(encoding="utf-8")) != json.loads(json.dumps(dict(settings))):
      return False
  except (OSError, ValueError):  # no folder, no run.json, or not ours to judge
    return False
  try:
    if read_ledgers(directory):
      return False
  except ValueError:  # an unreadable ledger line: someone's data, left for the error that names it
    return False
  if not all(_written_here(p.name) for p in directory.iterdir()):
    return False  # something this module did not write
  _remove_ledgers(directory)
  return True


def _written_here(name: str) -> bool:
  """Whether `name` in a ledger folder is a file this module writes there."""
  return (name in ("run.json", output_lock.LOCK_FILE) or name.startswith(".run.")
          or (name.startswith("process-") and name.endswith(".jsonl")))


def _remove_ledgers(directory: pathlib.Path) -> None:
  """Removes the files this module writes in the ledger folder, then the folder if nothing else is left in it (a
  folder of that name that held files of the user's keeps them)."""
  for p in directory.iterdir():
    if _written_here(p.name) and not p.is_dir():
      p.unlink(missing_ok=True)
  try:
    directory.rmdir()
  except OSError:
    logging.warning("%s holds files this run did not write: kept", directory)


class PredictionLedger:
  """The append-only ledger of finished examples of one process."""

  def __init__(self, directory: PathLike, process_index: int):
    if process_index < 0:
      raise ValueError(f"process_index must be >= 0, got {process_index}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self.path = directory / f"process-{process_index:05d}.jsonl"
    self._cut_torn_tail()

  def _cut_torn_tail(self):
    """Removes an incomplete last line, so the next record does not get glued onto it."""
    if not self.path.exists():
      return
    with open(self.path, "rb+") as f:
      data = f.read()
      keep = data.rfind(b"\n") + 1
      if keep != len(data):
        f.truncate(keep)

  def append(self, records: Sequence[Mapping[str, Any]]) -> None:
    """Appends finished examples ({"id", "prediction"[, "extra"]}) durably (flush + fsync)."""
    lines = []
    for record in records:
      if "id" not in record or "prediction" not in record:
        raise ValueError(f"a ledger record needs 'id' and 'prediction', got keys {sorted(record)}")
      lines.append(json.dumps(dict(record), ensure_ascii=False, allow_nan=False) + "\n")
    if not lines:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write("".join(lines))
      f.flush()
      os.fsync(f.fileno())


def merge_predictions(records: Mapping[Any, Mapping[str, Any]], examples: Sequence[EvalExample]) -> List[Any]:
  """The predictions aligned with `examples`.

  Raises:
    ValueError: the ledgers lack some examples, or hold ids that are not examples of this set (ledgers of
      another data file), naming up to five of them.
  """
  ids = [e.example_id for e in examples]
  known = set(ids)
  unknown = [i for i in records if i not in known]
  if unknown:
    raise ValueError(f"the ledgers hold {len(unknown)} predictions for ids that are not in the evaluated "
                     f"examples, e.g. {unknown[:5]} (ledgers of another data file?)")
  missing = [i for i in ids if i not in records]
  if missing:
    raise ValueError(f"{len(missing)} of {len(ids)} examples have no prediction yet, e.g. {missing[:5]}")
  return [records[i]["prediction"] for i in ids]


def write_results(output_path: PathLike, payload: Mapping[str, Any]) -> None:
  """Writes the results JSON atomically; an existing file is never replaced.

  The JSON is written to a temporary file in the same folder, fsynced, then hard-linked to its name, which
  fails if the name exists (atomic no-clobber); where hard links are not supported it is renamed after a
  final existence check.
  """
  output_path = pathlib.Path(output_path)
  check_output_free(output_path)
  text = json.dumps(payload, ensure_ascii=False, allow_nan=False, indent=1)
  fd, tmp = tempfile.mkstemp(dir=output_path.parent, prefix=f".{output_path.name}.", suffix=".tmp")
  try:
    os.fchmod(fd, 0o644)  # mkstemp makes it private; a results file is meant to be shared
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, output_path)
    except FileExistsError as e:
      raise FileExistsError(f"the results file {output_path} appeared while writing; it is not overwritten") from e
    except OSError:  # no hard links here (some network file systems)
      check_output_free(output_path)
      os.rename(tmp, output_path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def summary_line(payload: Mapping[str, Any], output_path: PathLike) -> str:
  """The one line `python -m qwenvl_jax.evaluate` prints for the results `payload`: `TASK METRIC SCORE`, or for a
  submission split (no metric, which printed `TASK None None`) how many predictions went where."""
  if payload["metric"] is None:
    return (f"{payload['task']}: {payload['num_examples']} predictions, no metric (a submission split) -> "
            f"{os.fspath(output_path)}")
  tokenizer = payload["details"].get("tokenizer")  # CIDEr: the caption normalisation used
  return (f"{payload['task']} {payload['metric']} {payload['score']}"
          + (f" (caption tokenizer: {tokenizer})" if tokenizer else ""))


def finalize(task, examples: Sequence[EvalExample], directory: PathLike, output_path: PathLike, *,
             config: Optional[Mapping[str, Any]] = None, left_out: Collection[Any] = ()) -> Dict[str, Any]:
  """Process 0, after all processes finished: merge the ledgers, score, write `output_path`.

  Args:
    task: the `tasks.EvalTask` evaluated.
    examples: all examples of the run, in data-file order.
    directory: the ledger folder (`partial_dir(output_path)`).
    output_path: the final JSON; must not exist.
    config: anything worth recording with the score (checkpoint, data path, decoding settings).
    left_out: ids of the data that are not evaluated (past `max_examples`): their predictions, made by an earlier
      run of the same data with a larger `max_examples`, are not merged.

  Returns:
    The payload written: {"task", "metric", "score", "details", "num_examples", "config", "predictions":
    [{"id", "image", "prediction", "score", ...ground truth, "extra"?}]}.
  """
  check_output_free(output_path)
  ledgers = read_ledgers(directory)
  records = {i: r for i, r in ledgers.items() if i not in left_out}
  beyond = len(ledgers) - len(records)  # finished predictions past max_examples: not scored here, not deleted
  predictions = merge_predictions(records, examples)
  result = task.score(examples, predictions)
  per_example = result["per_example"] or [None] * len(examples)
  rows = []
  for e, prediction, score in zip(examples, predictions, per_example):
    row: Dict[str, Any] = {"id": e.example_id, "image": e.image, "prediction": prediction, "score": score}
    if e.references:
      row["references"] = list(e.references)
    if e.bbox is not None:
      row["bbox"], row["size"] = list(e.bbox), list(e.size)
    if e.answer_index is not None:
      row["answer_index"] = e.answer_index
    if "extra" in records[e.example_id]:
      row["extra"] = records[e.example_id]["extra"]
    rows.append(row)
  payload = {"task": task.name, "metric": result["metric"], "score": result["score"], "details": result["details"],
             "num_examples": len(examples), "config": dict(config or {}), "predictions": rows}
  write_results(output_path, payload)
  if beyond:
    # An earlier run with a larger max_examples made them (hours of a full VQAv2 run, say): kept for a resume.
    print(f"{beyond} predictions past max_examples stay in {os.fspath(directory)}: move {os.fspath(output_path)} "
          "away and rerun with a larger max_examples (or none) to score them", file=sys.stderr, flush=True)
    return payload
  # The results file holds every prediction: the ledgers have served (a rerun now refuses the existing output).
  _remove_ledgers(pathlib.Path(directory))
  return payload
