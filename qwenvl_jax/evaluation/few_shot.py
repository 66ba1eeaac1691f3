"""Few-shot prompts of the evaluation job: which training examples go in front of a query (captioning and VQA).

RECIPES §2.1 (`--few-shot k`): k random training examples, each formatted with the task's template plus
` {answer}`, concatenated in front of the query (`EvalTask.few_shot_prefix` formats them). The shots come from a
pool built from the training data (`shot_pool`):
  caption  one shot per (image, caption): the reference samples the train file's `annotations[]` (image, caption);
           `readers.read_caption_json` (and the TFDS caption schemas) give one example per image with all its
           captions, which is the same set regrouped.
  vqa      one shot per question, answered with its first answer (the jsonl's `answer`; TFDS `answers[0]`).
Examples without an answer cannot be shots and are left out of the pool.

Drawing (`ShotSampler`): the k shots of a query are a pure function of (seed, the query's example id), drawn
without replacement, so sharded, batched and resumed runs show every query the same shots whatever the process
count or batch size. The reference instead draws from Python's global `random` seeded once per process, so its
shots depend on the process count and the order the data loader visits the queries: the exact shots differ, the
distribution is the same. A shot never shows the query itself: shots with the query's example id or image are
excluded, which matters when the training file is the evaluated file (the official Flickr30K config points its
"train" entry at the test file).

Usage:
  sampler = ShotSampler(shot_pool(task, task.read(train_path)), k=4, seed=0)
  text = few_shot_prompt(task, query, sampler.draw(query))
"""
import dataclasses
import hashlib
import json
import logging
from typing import Dict, List, Sequence, Set

import numpy as np

from qwenvl_jax import errors
from qwenvl_jax.evaluation.readers import EvalDataError, EvalExample

KINDS = ("caption", "vqa")


def check_kind(task) -> None:
  """Raises errors.ConfigError (a ValueError) unless `task` takes few-shot prompts (captioning and VQA, as the
  reference)."""
  if task.kind not in KINDS:
    raise errors.ConfigError(f"task {task.name!r}: few-shot prompts exist only for captioning and VQA (RECIPES "
                             f"§2.1); a {task.kind} task is evaluated with few_shot=0")


def shot_pool(task, examples: Sequence[EvalExample]) -> List[EvalExample]:
  """The candidate shots of `task` from its training examples, one answer each (module docstring).

  Raises:
    errors.ConfigError: a task kind without few-shot prompts.
    EvalDataError: no example has an answer to show.
  """
  check_kind(task)
  pool = []
  for e in examples:
    if task.kind == "caption":
      pool.extend(dataclasses.replace(e, references=(r,)) for r in e.references)
    elif e.references:
      pool.append(dataclasses.replace(e, references=e.references[:1]))
  if not pool:
    raise EvalDataError(f"task {task.name!r}: none of the {len(examples)} few-shot examples has an answer or caption "
                        f"to show")
  unanswered = sum(not e.references for e in examples)
  if unanswered:
    logging.warning("few-shot pool: %d of %d examples have no answer and are left out", unanswered, len(examples))
  return pool


def few_shot_prompt(task, query: EvalExample, shots: Sequence[EvalExample]) -> str:
  """The raw prompt of `query` with its shots in front (the query's own prompt when there are none)."""
  return (task.few_shot_prefix(shots) if shots else "") + task.prompt(query)


class ShotSampler:
  """Draws the k shots of each query from a pool, as a pure function of (seed, query example id)."""

  def __init__(self, pool: Sequence[EvalExample], k: int, seed: int):
    if k < 1:
      raise ValueError(f"a ShotSampler draws k >= 1 shots, got k={k}")
    if not pool:
      raise ValueError("a ShotSampler needs a non-empty pool")
    self.pool, self.k, self.seed = list(pool), k, seed
    self._by_id: Dict[object, Set[int]] = {}
    self._by_image: Dict[str, Set[int]] = {}
    for i, shot in enumerate(self.pool):
      self._by_id.setdefault(_key(shot.example_id), set()).add(i)
      self._by_image.setdefault(shot.image, set()).add(i)

  def check(self, queries: Sequence[EvalExample]) -> None:
    """Raises `EvalDataError` (naming the first) when some query cannot get k shots; run before any work."""
    for query in queries:
      self._excluded(query)

  def draw(self, query: EvalExample) -> List[EvalExample]:
    """The k shots of `query`, in prompt order; never one with the query's id or image.

    Raises:
      EvalDataError: fewer than k pool entries remain once the query is excluded.
    """
    excluded = self._excluded(query)
    n = len(self.pool)
    rng = np.random.default_rng(_seed_words(self.seed, query.example_id))
    chosen: List[int] = []
    seen = set(excluded)
    while len(chosen) < self.k:
      # Rejection sampling without replacement: O(k) draws while the pool is much larger than k + excluded; a
      # nearly exhausted pool takes more draws but always ends (enough entries remain, checked above).
      i = int(rng.integers(n))
      if i not in seen:
        seen.add(i)
        chosen.append(i)
    return [self.pool[i] for i in chosen]


  def _excluded(self, query: EvalExample) -> Set[int]:
    """Pool indices the query may not see (its own id or image); raises when fewer than k others remain."""
    excluded = self._by_id.get(_key(query.example_id), set()) | self._by_image.get(query.image, set())
    if len(self.pool) - len(excluded) < self.k:
      raise EvalDataError(f"few_shot={self.k}: only {len(self.pool) - len(excluded)} few-shot examples remain for "
                          f"example {query.example_id!r} once those of its own id or image are excluded")
    return excluded


def _key(example_id) -> str:
  """Ids compare by type and value (the query 5 is not the shot "5")."""
  return json.dumps(example_id)


def _seed_words(seed: int, example_id) -> np.ndarray:
  """uint32[8]: a stable hash of (seed, example id) (Python's `hash` of a str changes between processes)."""
  digest = hashlib.sha256(json.dumps([int(seed), example_id]).encode("utf-8")).digest()
  return np.frombuffer(digest, np.uint32)
