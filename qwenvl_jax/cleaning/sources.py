"""Input shards of the cleaning job: sharded JSONL (optionally gzipped) or Parquet files of image-text rows.

Shards are the unit of reading: each worker reads whole files, row by row (Parquet in record batches, so memory
stays bounded whatever the file size), and every row becomes a `filters.RawPair` keyed by "<path>:<row>" (a
JSONL line number from 1, as editors and the trainer's bad-record names count; a Parquet row index from 0, as
pyarrow counts).
That key is unique and stable across runs, which is what TFDS needs to shuffle deterministically. A row's default
id (and its locator in the report) is "<name>:<row>", the name being the shard's file name, or, for shards of one
file name in several folders (`2023/part-0.parquet`, `2024/part-0.parquet`), as many trailing folders as tell
them apart (`shard_names`): the ids of one job's pairs are unique, and the same in every run of the same inputs.
A line that is not valid JSON, or not a JSON object, becomes a `MalformedRow` (counted as "malformed"), never an
exception; a file that cannot be opened at all is an error, because it means the job would silently lose a whole
shard.

Paths may be local or any filesystem Apache Beam knows (gs://, s3://, hdfs:// with the matching extras).
"""
import collections
import contextlib
import gzip
import io
import itertools
import json
import os
import zlib
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from qwenvl_jax import errors
from qwenvl_jax.cleaning.filters import MalformedRow, RawPair

FORMATS = ("auto", "jsonl", "parquet")
_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_PARQUET_BATCH_ROWS = 256


def shard_format(path: str, input_format: str = "auto") -> str:
  """"jsonl" or "parquet" for one shard.

  Raises:
    ValueError: unknown `input_format`, or "auto" and the file name has no known suffix.
  """
  if input_format not in FORMATS:
    raise errors.ConfigError(f"input_format must be one of {FORMATS}, got {input_format!r}")
  if input_format != "auto":
    return input_format
  name = path.lower()
  if name.endswith(_JSONL_SUFFIXES):
    return "jsonl"
  if name.endswith(_PARQUET_SUFFIXES):
    return "parquet"
  raise errors.ConfigError(f"cannot tell the format of input shard {path!r} from its name (expected one of "
                   f"{_JSONL_SUFFIXES + _PARQUET_SUFFIXES}); pass input_format='jsonl' or 'parquet'")


def match_shards(patterns: Sequence[str], input_format: str = "auto") -> list[str]:
  """Expands file patterns (globs allowed) to a sorted list of shard paths, each file once however it is spelt.

  Raises:
    ValueError: no pattern given, a pattern matches no file, or a shard's format is unknown.
  """
  if isinstance(patterns, str) or not patterns:
    raise errors.ConfigError(f"give a non-empty list of input file patterns, got {patterns!r}")
  by_file: dict[str, str] = {}  # the file -> the first spelling of it matched
  for pattern, result in zip(patterns, FileSystems.match(list(patterns))):
    found = [m.path for m in result.metadata_list]
    if not found:
      raise errors.ConfigError(f"input pattern {pattern!r} matches no file")
    for path in found:
      if "://" not in path and os.path.isdir(path):  # was "cannot tell the format ... pass input_format"
        raise errors.ConfigError(f"input {pattern!r} is a folder; --input takes files or patterns",
                                 f"e.g. --input={os.path.join(pattern, '*.jsonl')}")
      # One local file matched as raw/a.jsonl and /data/raw/a.jsonl (or ./raw/a.jsonl) was read twice: its pairs
      # went into the dataset twice, under the same default ids.
      by_file.setdefault(path if "://" in path else os.path.realpath(path), path)
  paths = sorted(by_file.values())
  for path in paths:
    shard_format(path, input_format)
  return paths


def shard_names(paths: Sequence[str]) -> dict[str, str]:
  """The name of each of a job's shard paths in its rows' default ids: the file name, with as many trailing folders
  as tell apart the shards that share it (raw/2023/part-0.parquet and raw/2024/part-0.parquet are
  "2023/part-0.parquet" and "2024/part-0.parquet"; a.jsonl beside them stays "a.jsonl").

  The same paths always get the same names; `paths` are distinct files (`match_shards`), so the names are unique.
  """
  parts = {path: path.replace(os.sep, "/").rstrip("/").split("/") for path in paths}
  depth = dict.fromkeys(paths, 1)
  while True:
    names = {path: "/".join(parts[path][-depth[path]:]) for path in paths}
    count = collections.Counter(names.values())
    clashing = [path for path in paths if count[names[path]] > 1 and depth[path] < len(parts[path])]
    if not clashing:
      return names
    for path in clashing:
      depth[path] += 1


def read_shard(path: str, input_format: str = "auto", image_root: str | None = None,
               name: str | None = None) -> Iterator[RawPair]:
  """Yields every row of one shard as a `RawPair`, in file order.

  Args:
    path: the shard.
    input_format: "auto" (from the file name), "jsonl" or "parquet".
    image_root: folder relative image paths resolve against; None = the shard's own folder.
    name: the shard in the rows' default ids and report locators (`shard_names`); None = its file name.

  Raises:
    errors.InputFormatError: the shard cannot be read to its end (a truncated download: a gzip stream or Parquet
      footer cut short), naming the shard and the last row read (the job stops rather than lose the rest of the shard).
  """
  root = image_root if image_root is not None else os.path.dirname(path)
  name = name or os.path.basename(path)
  rows = _jsonl_rows(path) if shard_format(path, input_format) == "jsonl" else _parquet_rows(path)
  index = None
  try:
    for index, row in rows:
      yield RawPair(key=f"{path}:{index}", source=f"{name}:{index}", row=row, root=root)
  except (OSError, EOFError, zlib.error, pa.ArrowException) as e:
    where = "at its start" if index is None else f"after row {index}"
    raise errors.InputFormatError(f"input shard {path} cannot be read {where}: {type(e).__name__}: {e}",
                                  "re-download or re-write the shard, or leave it out of --input") from e


def _open(path: str):
  return FileSystems.open(path, compression_type="uncompressed")


def _jsonl_rows(path: str) -> Iterator[tuple[int, object]]:
  with _open(path) as raw:
    stream = gzip.open(raw) if path.lower().endswith(".gz") else raw
    # utf-8-sig: a byte order mark (Windows tools write one) is dropped instead of breaking the first row's JSON.
    lines = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="\n")
    for index, line in enumerate(lines, start=1):  # a line number, as editors and the trainer's record ids count
      if not line.strip():
        continue  # Blank lines (e.g. a trailing newline pair) are not rows.
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        row = MalformedRow(f"line is not JSON: {e}")
      if not isinstance(row, (dict, MalformedRow)):
        row = MalformedRow(f"line is a JSON {type(row).__name__}, not an object")
      yield index, row


def _parquet_rows(path: str) -> Iterator[tuple[int, object]]:
  with _open(path) as stream:
    index = 0
    for batch in pq.ParquetFile(stream).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
      for row in batch.to_pylist():
        yield index, row
        index += 1


def peek_rows(path: str, input_format: str = "auto", limit: int = 100) -> list[dict]:
  """The rows among the first `limit` of a shard that parse as objects (to check the columns before a job starts;
  a Parquet shard reads only its first record batch)."""
  with contextlib.closing(read_shard(path, input_format)) as pairs:
    return [pair.row for pair in itertools.islice(pairs, limit) if isinstance(pair.row, dict)]
