"""Report assembly (rule order, totals, deterministic samples) and the never-overwrite rule."""
import json

import pytest

from qwenvl_jax.cleaning import report
from qwenvl_jax.cleaning.config import RULES


def test_build_report_lists_every_rule_in_order():
  samples = {"emoji": [(report.sample_rank(k), {"id": k}) for k in ("k3", "k1", "k2")]}
  out = report.build_report(counts={"emoji": 3, "malformed": 2}, samples=samples, kept=5, header={"inputs": ["x"]})
  assert list(out["rejected"]) == list(RULES) and out["rule_order"] == list(RULES)
  assert out["rejected"]["emoji"] == 3 and out["rejected"]["language"] == 0
  assert out["num_pairs"] == 10 and out["kept"] == 5 and out["inputs"] == ["x"]
  ranked = sorted(("k3", "k1", "k2"), key=report.sample_rank)
  assert [s["id"] for s in out["samples"]["emoji"]] == ranked
  assert set(out["samples"]) == {"emoji"}
  json.dumps(out)


def test_unknown_rule_is_an_error():
  with pytest.raises(ValueError, match="no_such_rule"):
    report.build_report(counts={"no_such_rule": 1}, samples={}, kept=0, header={})


def test_write_new_never_overwrites(tmp_path):
  path = tmp_path / "sub" / "r.json"
  report.write_new(str(path), {"kept": 1})
  assert report.read(str(path)) == {"kept": 1}
  with pytest.raises(FileExistsError, match="already exists"):
    report.write_new(str(path), {"kept": 2})
  assert report.read(str(path)) == {"kept": 1}


def test_write_new_that_fails_leaves_no_report(tmp_path, monkeypatch):
  path = tmp_path / "clean_report.json"

  def half(p, _):
    p = str(p)
    with open(p, "w", encoding="utf-8") as f:
      f.write('{"kept": 1')
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(report, "write_partial", half)
  with pytest.raises(OSError, match="No space left"):
    report.write_new(str(path), {"kept": 1})
  assert not path.exists()
