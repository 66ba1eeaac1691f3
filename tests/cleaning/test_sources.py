"""Reading JSONL (plain and gzipped) and Parquet shards into keyed rows; matching input patterns."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwenvl_jax import errors
from qwenvl_jax.cleaning import sources
from qwenvl_jax.cleaning.filters import MalformedRow


def test_jsonl_rows_keys_and_malformed_lines(tmp_path):
  path = tmp_path / "part-0.jsonl"
  path.write_text('{"text": "a", "image": "x.jpg"}\n\n{broken\n[1, 2]\n{"text": "é", "image": "y.jpg"}\n',
                  encoding="utf-8")
  pairs = list(sources.read_shard(str(path)))
  # Line numbers from 1, as an editor shows them (blank line 2 skipped).
  assert [p.key for p in pairs] == [f"{path}:1", f"{path}:3", f"{path}:4", f"{path}:5"]
  assert [p.source for p in pairs] == ["part-0.jsonl:1", "part-0.jsonl:3", "part-0.jsonl:4", "part-0.jsonl:5"]
  assert pairs[0].row == {"text": "a", "image": "x.jpg"} and pairs[3].row["text"] == "é"
  assert isinstance(pairs[1].row, MalformedRow) and "not JSON" in pairs[1].row.reason
  assert isinstance(pairs[2].row, MalformedRow) and "list" in pairs[2].row.reason
  assert {p.root for p in pairs} == {str(tmp_path)}


def test_gzipped_jsonl_and_image_root(tmp_path):
  rows = [{"text": f"t{i}", "image": f"{i}.jpg"} for i in range(3)]
  path = tmp_path / "p.jsonl.gz"
  path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
  pairs = list(sources.read_shard(str(path), image_root="/images"))
  assert [p.row for p in pairs] == rows and {p.root for p in pairs} == {"/images"}


def test_invalid_utf8_becomes_replacement_characters_not_a_crash(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"text": "caf\xe9", "image": "x.jpg"}\n')
  [pair] = sources.read_shard(str(path))
  assert pair.row["text"] == "caf\ufffd"


def test_parquet_rows_in_order_across_batches(tmp_path):
  n = sources._PARQUET_BATCH_ROWS + 5
  table = pa.table({"text": [f"t{i}" for i in range(n)], "image": [bytes([i % 256]) for i in range(n)]})
  path = tmp_path / "p.parquet"
  pq.write_table(table, path, row_group_size=100)
  pairs = list(sources.read_shard(str(path)))
  assert [p.row["text"] for p in pairs] == [f"t{i}" for i in range(n)]
  assert pairs[-1].key == f"{path}:{n - 1}" and pairs[7].row["image"] == bytes([7])


def test_forced_format_overrides_the_suffix(tmp_path):
  path = tmp_path / "rows.txt"
  path.write_text('{"text": "a", "image": "b"}\n')
  assert len(list(sources.read_shard(str(path), input_format="jsonl"))) == 1
  with pytest.raises(ValueError, match="cannot tell the format"):
    list(sources.read_shard(str(path)))


def test_match_shards(tmp_path, monkeypatch):
  for name in ("b.jsonl", "a.parquet", "c.jsonl.gz"):
    (tmp_path / name).write_bytes(b"")
  found = sources.match_shards([str(tmp_path / "*.jsonl*"), str(tmp_path / "*.parquet"), str(tmp_path / "b.*")])
  assert found == [str(tmp_path / n) for n in ("a.parquet", "b.jsonl", "c.jsonl.gz")]
  # The same file spelt differently (relative, absolute, ./, //) is one shard, not four copies of its pairs.
  monkeypatch.chdir(tmp_path)
  spellings = ["b.jsonl", str(tmp_path / "b.jsonl"), "./b.jsonl", ".//b.jsonl"]
  assert len(sources.match_shards(spellings)) == 1
  with pytest.raises(ValueError, match="matches no file"):
    sources.match_shards([str(tmp_path / "*.csv")])
  with pytest.raises(ValueError, match="non-empty list"):
    sources.match_shards(str(tmp_path / "b.jsonl"))
  (tmp_path / "d.csv").write_bytes(b"")
  with pytest.raises(ValueError, match="d.csv"):
    sources.match_shards([str(tmp_path / "*")])
  with pytest.raises(ValueError, match="input_format"):
    sources.match_shards([str(tmp_path / "b.jsonl")], input_format="csv")
  # A folder given as the input: named as one, with a pattern to use (it was "cannot tell the format ... pass
  # input_format", which no format fixes).
  (tmp_path / "raw").mkdir()
  with pytest.raises(errors.ConfigError, match="input 'raw' is a folder") as e:
    sources.match_shards(["raw"])
  assert e.value.hint == "e.g. --input=raw/*.jsonl"


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
  """Windows tools (Notepad, Excel's "UTF-8" export, PowerShell) start a file with a BOM; the first row of every such
  shard was rejected as malformed ("Unexpected UTF-8 BOM"), and the shard's columns went unchecked."""
  rows = [{"text": "a red bus", "image": "x.jpg"}, {"text": "一只猫", "image": "y.jpg"}]
  data = "\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  (tmp_path / "bom.jsonl").write_text(data, encoding="utf-8")
  (tmp_path / "bom.jsonl.gz").write_bytes(gzip.compress(data.encode("utf-8")))
  for name in ("bom.jsonl", "bom.jsonl.gz"):
    assert [p.row for p in sources.read_shard(str(tmp_path / name))] == rows
    assert sources.peek_rows(str(tmp_path / name)) == rows


def test_a_shard_cut_short_is_one_error_naming_it(tmp_path):
  """An interrupted download (a gzip stream or a Parquet file cut short) ended the job with Beam's traceback of a
  bare EOFError / ArrowInvalid; now it is an InputFormatError naming the shard and the last row read."""
  rows = [{"text": f"caption {i} " + "x" * 64, "image": f"{i}.jpg"} for i in range(500)]
  data = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
  (tmp_path / "cut.jsonl.gz").write_bytes(data[:len(data) // 2])
  with pytest.raises(errors.InputFormatError, match=r"cut.jsonl.gz cannot be read after row \d+: EOFError"):
    list(sources.read_shard(str(tmp_path / "cut.jsonl.gz")))
  pq.write_table(pa.table({"text": ["a"], "image": [b"x"]}), tmp_path / "full.parquet")
  (tmp_path / "cut.parquet").write_bytes((tmp_path / "full.parquet").read_bytes()[:-20])
  with pytest.raises(errors.InputFormatError, match="cut.parquet cannot be read at its start"):
    sources.peek_rows(str(tmp_path / "cut.parquet"))


def test_shards_of_one_file_name_get_names_their_folders_tell_apart():
  """raw/2023/part-0.parquet and raw/2024/part-0.parquet both gave their rows the default ids 'part-0.parquet:N':
  two pairs of one dataset under one id."""
  paths = ["/d/raw/2023/part-0.parquet", "/d/raw/2024/part-0.parquet", "/d/raw/a.jsonl", "/e/x/2023/part-0.parquet",
           "gs://b/lang=en/part-0.parquet"]
  names = sources.shard_names(paths)
  assert names == {"/d/raw/2023/part-0.parquet": "raw/2023/part-0.parquet",
                   "/d/raw/2024/part-0.parquet": "2024/part-0.parquet", "/d/raw/a.jsonl": "a.jsonl",
                   "/e/x/2023/part-0.parquet": "x/2023/part-0.parquet",
                   "gs://b/lang=en/part-0.parquet": "lang=en/part-0.parquet"}
  assert sources.shard_names(list(reversed(paths))) == names  # whatever the order
  assert sources.shard_names(["/d/a.jsonl"]) == {"/d/a.jsonl": "a.jsonl"}


def test_a_shard_name_makes_the_default_id(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
  pairs = list(sources.read_shard(str(tmp_path / "a.jsonl"), name="2023/a.jsonl"))
  assert [(p.key, p.source) for p in pairs] == [(f"{tmp_path / 'a.jsonl'}:1", "2023/a.jsonl:1")]
