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
  "duplicate_ids": {"ids": int, "pairs": int,    # kept ids that more than one kept pair carries (0, 0: none)
                    "samples": [{"id", "pairs"}, ...]},  # the sample_size smallest such ids
  "similarity": {                   # every pair that got a score (score column or scorer), per detected language
    "bin_width": 0.01,
    "by_language": {"en": {"threshold": 0.28, "scored": int, "below": int, "at_or_above": int,
                           "histogram": {"0.27": int, "0.28": int, ...},   # lower bin edge -> pairs, non-empty only
                           "samples_below": [{"id", "text", "score"}, ...],  # nearest the threshold first
                           "samples_above": [...]}, ...}},
  "dataset": "<path of the TFDS dataset version folder>"
}
```
The sample of a rule is the `sample_size` rejected pairs whose keys hash lowest: a deterministic pseudo-random
pick that does not depend on how the runner split the work. Ids (`--id_key`, or derived from the shard and row) are
counted over the kept pairs: a repeated one is reported, not refused, since the dataset itself does not need ids to
be unique, but a user who joins it back to their source by id does.
"""
import hashlib
import json
import math
import os
from typing import Any, Mapping, Sequence

from etils import epath

from qwenvl_jax.cleaning.config import RULES


SCORE_BIN_WIDTH = 0.01


def sample_rank(key: str) -> str:
  """Order in which rejected pairs enter a rule's sample (lowest first); stable across runners and runs."""
  return hashlib.sha1(key.encode("utf-8")).hexdigest()


def scored_record(outcome, cfg) -> dict[str, Any]:
  """What the report keeps of a scored pair (a `filters.Kept` or a low-similarity `filters.Rejected`)."""
  threshold = cfg.threshold(outcome.language)
  return {"language": outcome.language, "score": float(outcome.score), "threshold": threshold,
          "side": "above" if outcome.score >= threshold else "below", "rank": sample_rank(outcome.key),
          "sample": {"id": outcome.id, "text": getattr(outcome, "cleaned", "") or outcome.text,
                     "score": round(float(outcome.score), 6)}}


def score_bin(score: float) -> str:
  """The lower edge of the histogram bin of a score, as a key ("0.28" holds [0.28, 0.29))."""
  # The small offset keeps scores that are bin edges in their own bin despite float division (0.29 / 0.01 < 29).
  edge = math.floor(score / SCORE_BIN_WIDTH + 1e-9) * SCORE_BIN_WIDTH
  return f"{edge + 0.0:.2f}"


def closeness(record: Mapping[str, Any]) -> tuple[float, int]:
  """Order of scored pairs in a side's sample (largest first): nearest the threshold, then a stable hash."""
  return -abs(record["score"] - record["threshold"]), -int(record["rank"][:15], 16)


def similarity_section(*, histogram: Sequence[tuple[tuple[str, str, str], int]],
                       near_threshold: Sequence[tuple[tuple[str, str], Sequence[Mapping[str, Any]]]],
                       sample_size: int | None = None) -> dict[str, Any]:
  """The report's "similarity" section.

  Args:
    histogram: ((language, side, bin edge), count) with side "below" or "above" the language's threshold.
    near_threshold: ((language, side), records) of `scored_record`s, any order; the nearest are kept.
    sample_size: records kept per language and side (None = all given).
  """
  by_language: dict[str, dict[str, Any]] = {}

  def entry(language: str) -> dict[str, Any]:
    return by_language.setdefault(language, {"threshold": None, "scored": 0, "below": 0, "at_or_above": 0,
                                             "histogram": {}, "samples_below": [], "samples_above": []})

  for (language, side, edge), count in histogram:
    e = entry(language)
    e["histogram"][edge] = e["histogram"].get(edge, 0) + int(count)
    e["scored"] += int(count)
    e["below" if side == "below" else "at_or_above"] += int(count)
  for (language, side), records in near_threshold:
    e = entry(language)
    ordered = sorted(records, key=closeness, reverse=True)[:sample_size]
    e["samples_" + side] = [r["sample"] for r in ordered]
    if ordered:
      e["threshold"] = ordered[0]["threshold"]
  for e in by_language.values():
    e["histogram"] = dict(sorted(e["histogram"].items(), key=lambda kv: float(kv[0])))
  return {"bin_width": SCORE_BIN_WIDTH, "by_language": dict(sorted(by_language.items()))}


def build_report(*, counts: Mapping[str, int], samples: Mapping[str, Sequence[tuple[str, dict]]], kept: int,
                 header: Mapping[str, Any], similarity: Mapping[str, Any] | None = None,
                 duplicate_ids: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Assembles the report.

  Args:
    counts: rejected pairs per rule (rules absent from it rejected nothing).
    samples: per rule, (sample_rank, sample) pairs, any order.
    kept: pairs written to the dataset.
    header: run description placed first (inputs, config, scorer, dataset path).
    similarity: the `similarity_section` (None: no pair was scored).
    duplicate_ids: {ids, pairs, samples} of the ids several kept pairs carry (None: no id repeats).

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
      "duplicate_ids": dict(duplicate_ids or {"ids": 0, "pairs": 0, "samples": []}),
      "similarity": similarity or {"bin_width": SCORE_BIN_WIDTH, "by_language": {}},
  }


def duplicate_ids_warning(report: Mapping[str, Any]) -> str | None:
  """The line `clean` prints when kept pairs share ids (None when none do)."""
  repeated = report["duplicate_ids"]
  if not repeated["ids"]:
    return None
  examples = ", ".join(repr(s["id"]) for s in repeated["samples"][:3])
  return (f"warning: {repeated['ids']} id(s) are carried by more than one kept pair ({repeated['pairs']} pairs"
          + (f", e.g. {examples}" if examples else "") + "): see duplicate_ids in the report")


def write_new(path: str, report: Mapping[str, Any]) -> None:
  """Writes the report as JSON to a path that must not exist yet.

  A write that fails (a full disk, Ctrl-C) removes what it wrote: a truncated report stayed at the final path
  beside the published dataset, and the retry was refused.

  Raises:
    FileExistsError: the path exists (reports are never overwritten).
  """
  if epath.Path(path).exists():
    raise FileExistsError(f"report {os.fspath(path)} already exists; choose another --report path")
  try:
    write_partial(path, report)
  except BaseException:
    epath.Path(path).unlink(missing_ok=True)
    raise


def write_partial(path: str, report: Mapping[str, Any]) -> None:
  """Writes the pipeline's own temporary copy of the report (a retried Beam bundle may write it twice)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def read(path: str) -> dict[str, Any]:
  """Loads a report written by `write_new`."""
  return json.loads(epath.Path(path).read_text())
