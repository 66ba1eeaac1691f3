"""Evaluation during training: the evaluation job's code on the trainer's current parameters.

`python -m qwenvl_jax.train ... --config.eval_every=N` builds a `TrainingEvaluator` from `config.eval` and hands it to
`training.train(config, eval_fn=...)` (the entry point sits above both packages; training never imports
evaluation). Every N steps and at the last step, every process calls it with the step's parameters; it runs the same
code as `python -m qwenvl_jax.evaluate` (`runner.predict`: examples sharded over processes, batches sharded over the
mesh's data and fsdp axes, greedy decoding with the task's token limits; `EvalTask.score`), on the trainer's own mesh,
rules, tokenizer and model config, and returns `{"eval/<task>/<metric>": score, ...}` on process 0 for the metrics log
and TensorBoard.

`config.eval`: `task` (a task name, or its config file `configs/eval/<task>.py`), `data_path` ('' = a synthetic
held-out set when the run trains on the synthetic data: captions or grounding, drawn with the evaluation seed at the
run's resolution, written to a temporary folder; else the config file's data, else the task's official file),
`annotation_path`, `image_root`, `max_examples` (the first N; 0 = all), `per_device_batch_size`.
Everything is checked, and the examples read, when the evaluator is built: before the trainer writes anything.

Shapes: the model holds the trainer's (sharded) parameter arrays; images uint8[S, S, 3] as the eval job's.
"""
from __future__ import annotations

import importlib.util
import logging
import pathlib
import sys
import tempfile
import time
from typing import Any

import jax
import ml_collections
from flax import nnx

from qwenvl_jax import errors
from qwenvl_jax.evaluation import job as job_lib
from qwenvl_jax.evaluation import prompts, runner, synthetic_sets
from qwenvl_jax.evaluation import tasks as tasks_lib
from qwenvl_jax.inference import decode
from qwenvl_jax.model import QwenVL

_SYNTHETIC_WRITERS = {"caption": synthetic_sets.write_caption_set, "grounding": synthetic_sets.write_grounding_set}


def _task_and_defaults(spec: str) -> tuple[tasks_lib.EvalTask, dict[str, str]]:
  """The task of a name or of a `configs/eval/<task>.py` file, and that file's data defaults."""
  if not spec.endswith(".py"):
    return _task(spec), {}
  path = pathlib.Path(spec)
  if not path.is_file():
    raise errors.UserFileNotFoundError(
        f"config.eval.task: no evaluation config file {spec} (e.g. configs/eval/flickr.py)")
  module_spec = importlib.util.spec_from_file_location(f"qwenvl_eval_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  file_config = module.get_config()
  defaults = {k: file_config.get(k, "") or "" for k in ("data_path", "annotation_path", "image_root")}
  return _task(file_config.task), defaults


def check_task(spec: str) -> None:
  """Refuses (errors.UserError) a `config.eval.task` that names no task nor an evaluation config file; the trainer
  checks it while evaluation is off too, so a misspelt task does not surface only when a resumed run turns it on."""
  _task_and_defaults(spec)


def _task(name: str) -> tasks_lib.EvalTask:
  try:
    task = tasks_lib.get_task(name)
  except KeyError as e:
    raise errors.ConfigError(f"config.eval.task: {e.args[0]}") from None
  if task.metric is None:  # its score, None, failed to log at the first evaluation step
    scored = task.same_dataset(scored=True)
    raise errors.ConfigError(f"config.eval.task={name!r} is a submission split: it has no metric to log",
                             hint=f"e.g. --config.eval.task={scored[0]}" if scored else None)
  return task


class TrainingEvaluator:
  """`eval_fn` of `training.train`: built once from the experiment config, called at each evaluation step."""

  def __init__(self, config: ml_collections.ConfigDict):
    every = config.eval_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
      raise errors.ConfigError(f"config.eval_every must be an integer >= 0 (0 = off), got {every!r}")
    self.every = every
    e = config.eval
    if e.max_examples < 0 or e.per_device_batch_size < 1:
      raise errors.ConfigError(f"config.eval.max_examples must be >= 0 and config.eval.per_device_batch_size >= 1, got "
                       f"{e.max_examples}, {e.per_device_batch_size}")
    self.task, defaults = _task_and_defaults(e.task)
    data_path, image_root = e.data_path, e.image_root
    annotation_path = e.annotation_path or None
    self._tempdir = None
    if not data_path and config.data.source == "synthetic":
      writer = _SYNTHETIC_WRITERS.get(self.task.kind)
      if writer is None:
        raise errors.ConfigError(f"config.eval.task={self.task.name!r} ({self.task.kind}) has no synthetic held-out "
                                 f"set (captions and grounding do): give its data with --config.eval.data_path=...")
      # Every process writes the same seeded set to its own temporary folder: no shared disk is needed.
      self._tempdir = tempfile.TemporaryDirectory(prefix="qwenvl_eval_")
      n = e.max_examples or 32
      data_path = writer(self._tempdir.name, n=n, image_size=config.res,
                         max_shapes=config.data.get("synthetic_max_shapes", synthetic_sets.MAX_SHAPES))
      image_root = self._tempdir.name
    elif not data_path:  # the config file's data, else the task's official file
      data_path = defaults.get("data_path") or self.task.data_file
      image_root = image_root or defaults.get("image_root", "")
      annotation_path = annotation_path or defaults.get("annotation_path") or self.task.annotation_file or None
    self.examples = self.task.read(data_path, annotation_path=annotation_path)
    if e.max_examples:
      self.examples = self.examples[:e.max_examples]
    if not self.examples:
      raise errors.ConfigError(f"config.eval: {data_path} holds no examples of task {self.task.name!r}")
    self.task.check_ground_truth(self.examples)
    # A wrong image root fails here, before training, rather than at the first evaluation step.
    prompts.check_images(self.examples, image_root, prompts.data_folder(data_path), flag="--config.eval.image_root")
    self.data_path = str(data_path)
    self._job_config = ml_collections.ConfigDict({
        "image_root": image_root, "image_root_flag": "--config.eval.image_root", "data_path": self.data_path,
        "per_device_batch_size": e.per_device_batch_size,
        "buckets": decode.DEFAULT_BUCKETS, "seed": 0})
    self._job = None

  def describe(self) -> str:
    return f"{self.task.name} ({self.task.metric}) on {len(self.examples)} examples of {self.data_path}"

  def __call__(self, step: int, model: QwenVL, *, cfg, tokenizer, mesh, rules) -> dict[str, float] | None:
    """Scores the task with `model` (the trainer's parameters; all processes call it); {"eval/<task>/<metric>":
    score, ...} on process 0, None on the others."""
    started = time.perf_counter()
    if self._job is None:
      if jax.process_index() == 0:  # (not at construction: JAX must not start before distributed init)
        print(f"evaluating every {self.every} steps: {self.describe()}", file=sys.stderr, flush=True)
      self._job = job_lib.EvalJob(self._job_config, self.task, model=(tokenizer, cfg, mesh, rules, model))
    else:  # the same jitted decoding, the new step's arrays
      self._job.generator.state = nnx.state(model)
    predictions = runner.predict(self._job, self.examples)
    if predictions is None:
      return None
    result = self.task.score(self.examples, predictions)
    prefix = f"eval/{self.task.name}"
    scores = {f"{prefix}/{result['metric']}": float(result["score"]), f"{prefix}/examples": len(self.examples),
              f"{prefix}/seconds": time.perf_counter() - started}
    logging.info("step %d: %s", step, scores)
    return scores

  def close(self) -> None:
    if self._tempdir is not None:
      self._tempdir.cleanup()
