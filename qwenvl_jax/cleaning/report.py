"""The JSON report of a cleaning run: pairs read, kept, rejected per rule, and a sample of rejected pairs per rule.

Layout (rules always listed in `config.RULES` order, with 0 for rules that dropped nothing):
```
{
  "inputs": [...], "num_shards": int, "config": {...CleanConfig...}, "scorer": str | null,
  "num_pairs": int,                 # rows read = kept + sum(rejected)
  "kept": int,
  "rejected": {"malformed": int, "text_too_short": int, ...},
  "rule_order": ["malformed", ...],
  "samples": {"malformed": [{"id", "source", "reason", "text", "cleaned", "image"}, ...], ...},
  "dataset": "<path of the TFDS dataset version folder>"
}
```
The sample of a rule is the `sample_size` rejected pairs whose keys hash lowest: a deterministic pseudo-random
pick that does not depend on how the runner split the work.
"""
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

from etils import epath

from qwenvl_jax.cleaning.config import RULES


def sample_rank(key: str) -> str:
  """Order in which rejected pairs enter a rule's sample (lowest first); stable across runners and runs."""
  return hashlib.sha1(key.encode("utf-8")).hexdigest()


def build_report(*, counts: Mapping[str, int], samples: Mapping[str, Sequence[tuple[str, dict]]], kept: int,
                 header: Mapping[str, Any]) -> dict[str, Any]:
  """Assembles the report.

  Args:
    counts: rejected pairs per rule (rules absent from it rejected nothing).
    samples: per rule, (sample_rank, sample) pairs, any order.
    kept: pairs written to the dataset.
    header: run description placed first (inputs, config, scorer, dataset path).

  Raises:
    ValueError: a count names a rule that is not in `RULES`.
  """
  unknown = set(counts) - set(RULES)
  if unknown:
    raise ValueError(f"counts for unknown rules {sorted(unknown)}; rules are {RULES}")
  rejected = {rule: int(counts.get(rule, 0)) for rule in RULES}
  return {
      **header,
      "num_pairs": kept + sum(rejected.values()),
      "kept": int(kept),
      "rejected": rejected,
      "rule_order": list(RULES),
      "samples": {rule: [s for _, s in sorted(samples.get(rule, ()), key=lambda rs: rs[0])]
                  for rule in RULES if samples.get(rule)},
  }


def write_new(path: str, report: Mapping[str, Any]) -> None:
  """Writes the report as JSON to a path that must not exist yet.

  Raises:
    FileExistsError: the path exists (reports are never overwritten).
  """
  if epath.Path(path).exists():
    raise FileExistsError(f"report {os.fspath(path)} already exists; choose another --report path")
  write_partial(path, report)


def write_partial(path: str, report: Mapping[str, Any]) -> None:
  """Writes the pipeline's own temporary copy of the report (a retried Beam bundle may write it twice)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def read(path: str) -> dict[str, Any]:
  """Loads a report written by `write_new`."""
  return json.loads(epath.Path(path).read_text())
