"""The batch evaluation job behind `python -m qwenvl_jax.evaluate`: one official task over all hosts and devices.

Procedure (RECIPES §2.1, with the bookkeeping of `evaluation.results`):
  1. every process reads the task's data file; process 0 locks the output's ledger folder (`output_lock`: a
     second job with this output is refused), reads the ledgers of an earlier partial run and tells the others
     which examples are done (so all agree on the rest, `todo`);
  2. `todo` is cut into contiguous shards, one per process (`results.shard`, like the reference's
     InferenceSampler: every example exactly once, no drop_last); each process walks its shard in batches of
     `per_device_batch_size x local devices` rows; the last batches are padded with empty rows, and processes
     with a shorter shard run padding-only batches, so every process runs the same jitted steps;
  3. each batch is one global array sharded over the mesh's batch axes; generation is greedy with the task's
     max/min new tokens (multiple choice: the options' mean token loss instead); the new tokens are gathered to
     process 0, which decodes them like the reference (`skip_special_tokens=True`, stripped) and appends them to
     its ledger (flushed and fsynced: a killed run resumes after its last finished batch);
  4. process 0 merges the ledgers, scores and writes the results JSON (score + every prediction), never replacing
     an existing file. Progress is a tqdm bar on process 0.
Prompts are the official raw prompts (`tasks.EvalTask.prompt`); images are read from the paths in the data file,
relative to `image_root`, with the data pipeline's PIL preprocessing.

Few-shot (`config.few_shot` = k > 0, captioning and VQA; `few_shot`): k training examples from
`config.few_shot_path` are formatted with the task's template plus " {answer}" and put in front of each query, as
the reference's `--few-shot k`. The shots of a query are a pure function of (`config.seed`, its example id), so
sharded and resumed runs show it the same shots; the reference draws from a global RNG instead (same
distribution, different shots). Rows then hold k + 1 images.

Data (`config.data_path`): a file in the task's official format (`readers`), or a prepared TFDS dataset,
`tfds:NAME[/CONFIG][:VERSION][:SPLIT]` (under `config.tfds_data_dir`) or `array_record:FOLDER[:SPLIT]` (split
default `test`), mapped to examples by the public schemas of the task's kind (`tfds_readers`; never downloaded).
TFDS images stay encoded in the dataset: the prompt shows a stable pseudo-path (`<img>tfds:NAME:SPLIT/INDEX</img>`,
never opened) and the image bytes are read from the record when its batch is built, with the same PIL
preprocessing.

`config.data_path=synthetic` scores a held-out synthetic set (`synthetic_sets`, captioning and grounding tasks),
the quick start's evaluation of a model trained on the built-in synthetic data: `max_examples` (default 32)
examples drawn with the evaluation seed at the model's resolution (a training run's `res`) and the run's
`data.synthetic_max_shapes`, written to a temporary folder that is removed afterwards (the set is a pure function of
these, so a resumed run sees the same examples).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
from tqdm import tqdm

from qwenvl_jax import distributed, errors
from qwenvl_jax.evaluation import collectives, prompts
from qwenvl_jax.evaluation import few_shot as few_shot_lib
from qwenvl_jax.evaluation import output_lock, results, synthetic_sets
from qwenvl_jax.evaluation import tasks as tasks_lib
from qwenvl_jax.evaluation import tfds_readers
from qwenvl_jax.evaluation.job import EvalJob, check_tokenizer
from qwenvl_jax.evaluation.readers import EvalDataError, EvalExample
from qwenvl_jax.inference import loading, model_source
from qwenvl_jax.model.config import get_preset

SYNTHETIC = "synthetic"   # config.data_path of a held-out synthetic set (module docstring)
_SYNTHETIC_WRITERS = {"caption": synthetic_sets.write_caption_set, "grounding": synthetic_sets.write_grounding_set}
_SYNTHETIC_DEFAULT_SIZE = 32


def _write_synthetic_set(config, task: tasks_lib.EvalTask, root: str) -> str:
  """Writes the held-out synthetic set of `task` for the model `config` names into `root`; returns its data file."""
  writer = _SYNTHETIC_WRITERS.get(task.kind)
  if writer is None:
    raise errors.ConfigError(f"config.data_path={SYNTHETIC}: task {task.name!r} ({task.kind}) has no synthetic "
                             "held-out set; captioning (e.g. configs/eval/flickr.py) and grounding "
                             "(configs/eval/refcoco_val.py) do")
  source = model_source.resolve(config.checkpoint or None, model=config.model or None,
                                tokenizer=config.tokenizer or None, image_size=_image_size(config))
  image_size = source.image_size or get_preset(source.preset, image_pad_id=0).vision.image_size
  max_shapes = synthetic_sets.MAX_SHAPES
  if source.run_dir:  # the shapes per scene the run was trained on
    with open(os.path.join(source.run_dir, "config.json"), encoding="utf-8") as f:
      max_shapes = json.load(f).get("data", {}).get("synthetic_max_shapes", max_shapes)
  return writer(root, n=config.max_examples or _SYNTHETIC_DEFAULT_SIZE, image_size=image_size,
                max_shapes=max_shapes)


# Integer fields: (lowest value, what the lowest value means).
_INTEGER_FIELDS = {"per_device_batch_size": (1, ""), "max_examples": (0, " (0 = all)"),
                   "max_batches": (0, " (0 = all)"), "few_shot": (0, " (0 = none)"), "quantize_group_size": (1, "")}
# Settings that are local paths: recorded resolved, so another spelling of the same file resumes the run.
_PATH_SETTINGS = ("checkpoint", "params", "data_path", "few_shot_path")


def check_config(config) -> None:
  """Refuses config values that would fail late or silently mean something else (before any data is read).

  Raises:
    errors.ConfigError: naming the field and what it accepts.
  """
  for name, (low, meaning) in _INTEGER_FIELDS.items():
    value = config.get(name, low)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise errors.ConfigError(f"config.{name}={value!r} must be an integer >= {low}{meaning}")
  image_size = config.get("image_size")
  if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 0):
    raise errors.ConfigError(f"config.image_size={image_size!r} must be a positive integer (0 or unset = the "
                             "checkpoint's resolution, else the preset's)")
  loading.quantization_config(config.get("quantize"), config.get("quantize_group_size"))  # mode, power of two
  loading.check_attention(config.get("attention", "xla"), flag="--config.attention")


def _check_official_files(config, task: tasks_lib.EvalTask) -> None:
  """Refuses a data or annotation path that is another task's official file (what its `configs/eval/` file sets):
  `--config.task=` over another task's config kept that task's files, which were then scored under this task's
  name and metric without a word.

  Raises:
    errors.ConfigError: naming the field and the task whose file it is.
  """
  for field, official in (("data_path", lambda t: t.data_file), ("annotation_path", lambda t: t.annotation_file)):
    value = config.get(field) or ""
    if not value or os.path.normpath(value) == os.path.normpath(official(task) or "."):
      continue
    owners = [t.name for t in tasks_lib.TASKS.values()
              if official(t) and os.path.normpath(official(t)) == os.path.normpath(value)]
    if owners:
      raise errors.ConfigError(f"config.{field}={value} is the official file of task {owners[0]!r}, not of task "
                               f"{task.name!r} (config.task)",
                               hint=f"evaluate {task.name} with its own config in configs/eval/, or set "
                                    f"--config.{field} to a file of {task.name}")


def _image_size(config) -> int | None:
  """The image size the config asks for; None (0 or unset) = the checkpoint's, else the preset's."""
  return config.get("image_size") or None


def _weights_quantization(config, params: str | None) -> str:
  """How the weights that ran are quantized: `config.quantize` (quantized while restoring) or else what the params
  checkpoint was saved as (`convert --mode=quantize`), which `quantize` ("none") alone did not say."""
  from qwenvl_jax.inference import quantized  # pylint: disable=import-outside-toplevel
  mode = config.get("quantize")
  stored = quantized.checkpoint_quantization(params) if params and mode in (None, "", "none") else None
  qcfg = stored or loading.quantization_config(mode, config.get("quantize_group_size"))
  if qcfg is None:
    return "none"
  how = "as stored" if stored else "on load"
  return f"{qcfg.mode} ({how}{f', groups of {qcfg.group_size}' if qcfg.mode != 'int8' else ''})"


def _group_size(config) -> int | None:
  """The int4 group size that applies (None when the weights are not quantized in groups)."""
  return config.get("quantize_group_size") if config.get("quantize") in ("int4", "nf4") else None


def _resolved_path(path):
  """A local path resolved (absolute, symlinks and trailing slashes gone), so that two spellings of one file or
  folder compare equal; TFDS specs, URLs, `synthetic` and non-paths as they are."""
  if not isinstance(path, str) or not path or path == SYNTHETIC or tfds_readers.is_spec(path) or "://" in path:
    return path
  return os.path.realpath(path)


def _resolve_recorded(key: str, value):
  """A setting recorded in an earlier run.json (which may hold a path as typed), resolved as `_run` records it."""
  return _resolved_path(value) if key in _PATH_SETTINGS else value


def run(config) -> dict | None:
  """Runs one evaluation task as configured (`default_config`); returns the results on process 0 (None on the
  others, and when `max_batches` stopped the run before the end)."""
  if "distributed" in config:
    distributed.initialize(config.distributed)
    distributed.check_same_config(config)
  task = tasks_lib.get_task(config.task)
  output = config.output
  if not output:
    raise errors.ConfigError("config.output (the results JSON path) is required")
  check_config(config)
  _check_official_files(config, task)
  results.check_output_free(output)
  recorded = {}  # process 0: the settings this run recorded in (or checked against) OUTPUT.partial/run.json
  # Process 0 takes it before it touches OUTPUT.partial/: a second job with this output is refused.
  lock = output_lock.OutputLock(results.partial_dir(output))
  try:
    if config.data_path != SYNTHETIC:
      return _run(config, task, output, recorded=recorded, lock=lock)
    # Every process writes the same seeded set to its own temporary folder: no shared disk is needed.
    with tempfile.TemporaryDirectory(prefix="qwenvl_eval_") as root:
      config = config.copy_and_resolve_references()
      data_file = _write_synthetic_set(config, task, root)
      config.data_path, config.annotation_path, config.image_root = data_file, "", root
      return _run(config, task, output, recorded_data_path=SYNTHETIC, recorded=recorded, lock=lock)
  except BaseException:
    # A run that stopped before its first prediction leaves no `OUTPUT.partial/` behind (only its own: one
    # recorded under other settings is another run's).
    ledger_dir = results.partial_dir(output)
    if recorded and results.discard_unstarted(ledger_dir, recorded["settings"]):
      logging.info("removed %s: the run stopped before its first prediction", ledger_dir)
    raise
  finally:
    lock.release()


def _run(config, task: tasks_lib.EvalTask, output: str, recorded_data_path: str | None = None, *,
         recorded: dict, lock: output_lock.OutputLock) -> dict | None:
  """`run` once the data is in place; `recorded_data_path` stands for the data path in the run's settings and
  results (a synthetic set's temporary folder changes from run to run). Process 0 takes `lock` (the caller
  releases it) and puts the settings it recorded in the ledger folder into `recorded["settings"]`."""
  data_path = config.data_path or task.data_file
  annotation_path = config.annotation_path or None
  tfds_data_dir = config.get("tfds_data_dir") or None
  if annotation_path and tfds_readers.is_spec(data_path) and not os.path.exists(annotation_path):
    raise FileNotFoundError(f"the annotation file {annotation_path} does not exist; a TFDS dataset's own answers "
                            f"are used with --config.annotation_path=''")
  shots = _shot_sampler(config, task, tfds_data_dir)
  all_examples = task.read(data_path, annotation_path=annotation_path, tfds_data_dir=tfds_data_dir)
  examples = all_examples[:config.max_examples] if config.max_examples else all_examples
  if not examples:
    raise EvalDataError(f"the evaluation data {recorded_data_path or os.fspath(data_path)} holds no examples of "
                        f"task {task.name!r}")
  task.check_ground_truth(examples)  # a test split or a missing annotation file: now, not after every example ran
  if shots:
    shots.check(examples)
  # A wrong image_root fails here, before the model loads, rather than at the first batch.
  prompts.check_images(examples, config.image_root, prompts.data_folder(data_path))
  if shots:
    prompts.check_images(shots.pool, config.image_root, prompts.data_folder(config.few_shot_path))
  ledger_dir = results.partial_dir(output)
  # The params the checkpoint resolves to now: a run directory that trained on between an interrupted evaluation
  # and its rerun resolves to a later step, whose predictions must not be merged with the earlier step's. The job
  # loads this same source (resolved once: a step saved meanwhile is not loaded under the settings of another).
  source = model_source.resolve(config.checkpoint or None, model=config.model or None,
                                tokenizer=config.tokenizer or None, image_size=_image_size(config))
  check_tokenizer(source)
  params = source.params
  # Paths are recorded resolved: the same checkpoint or data file written another way (relative, absolute, a
  # trailing slash, a symlink) resumes the run.
  settings = {"task": task.name, "checkpoint": _resolved_path(config.checkpoint), "params": _resolved_path(params),
              "model": config.model, "tokenizer": config.tokenizer, "dtype": config.dtype,
              "image_size": _image_size(config), "quantize": config.get("quantize"),
              "quantize_group_size": _group_size(config), "kv_cache_dtype": config.get("kv_cache_dtype", "auto"),
              "attention": config.get("attention", "xla"),
              "data_path": recorded_data_path or _resolved_path(os.fspath(data_path)),
              "few_shot": shots.k if shots else 0,
              "few_shot_path": _resolved_path(config.few_shot_path) if shots else None,
              "seed": config.seed if shots or not config.checkpoint else None}  # seed: random weights, shot draw
  state = None
  if jax.process_index() == 0:
    try:
      lock.acquire(output)
      results.check_output_free(output)  # written meanwhile by a job that held the lock
      done = list(results.read_ledgers(ledger_dir))
      check_ids = recorded_data_path != SYNTHETIC  # a smaller synthetic set is the start of a larger one
      data_name = recorded_data_path or os.fspath(data_path)
      # Ledgers without run.json (an earlier version's): their ids are checked first, since the settings check
      # would record this run's settings for them. With run.json, the settings check names what differs.
      legacy = not (pathlib.Path(ledger_dir) / "run.json").exists()
      if check_ids and legacy:
        _check_ledger_ids(done, all_examples, ledger_dir, data_name)
      results.check_run_settings(ledger_dir, settings, resolve_recorded=_resolve_recorded)
      if check_ids and not legacy:
        _check_ledger_ids(done, all_examples, ledger_dir, data_name)
      recorded["settings"] = settings
      state = {"done": done}
    except (ValueError, errors.UserError) as e:  # every process raises it, none waits for the others
      state = {"error": e.message if isinstance(e, errors.UserError) else str(e), "hint": getattr(e, "hint", None)}
  state = collectives.broadcast_json(state)
  if "error" in state:
    # The output is another job's, or its ledgers another run's: the user's choice of output.
    raise errors.ConfigError(state["error"], state["hint"])
  done = set(state["done"])
  todo = [e for e in examples if e.example_id not in done]
  logging.info("task %s: %d examples, %d already done, %d to go", task.name, len(examples), len(done), len(todo))

  job = EvalJob(config, task, shots, source=source)
  mine = results.shard(todo, jax.process_count(), jax.process_index())
  longest = -(-len(todo) // jax.process_count())
  num_batches = -(-longest // job.local_rows)
  if config.max_batches:
    num_batches = min(num_batches, config.max_batches)
  ledger = results.PredictionLedger(ledger_dir, jax.process_index()) if jax.process_index() == 0 else None
  bar = tqdm(total=len(todo), desc=task.name, disable=jax.process_index() != 0 or not config.progress)
  started = time.time()
  for b in range(num_batches):
    chunk = mine[b * job.local_rows:(b + 1) * job.local_rows]
    if task.generates:
      records = _generated_records(job, chunk)
    else:
      chosen, losses = job.choose(chunk)
      records = [{"id": e.example_id, "prediction": c, "extra": {"option_losses": l}}
                 for e, c, l in zip(chunk, chosen, losses)]
      records = collectives.gather_json(records)
    if ledger is not None:
      ledger.append(records)
      bar.update(len(records))
  bar.close()
  collectives.barrier("qwenvl_eval_done")
  if jax.process_index() != 0:
    return None
  finished = results.read_ledgers(ledger_dir)
  if any(e.example_id not in finished for e in examples):
    missing = sum(e.example_id not in finished for e in examples)
    print(f"stopped after {num_batches} batches; {missing} examples left: run again with the same output to "
          "resume", file=sys.stderr, flush=True)
    return None
  # image_size: the resolution the model ran at (the checkpoint's or the preset's unless config.image_size set it).
  # step: the training step of a run's checkpoint (None for a converted one); prompt: the template the examples
  # were shown with; max_examples and examples_in_data: how much of the data the score covers.
  record = {"checkpoint": config.checkpoint, "params": params, "step": source.step, "model": config.model,
            "tokenizer": config.tokenizer, "dtype": config.dtype, "quantize": config.get("quantize"),
            "quantize_group_size": _group_size(config), "kv_cache_dtype": config.get("kv_cache_dtype", "auto"),
            "attention": job.cfg.attention_impl, "image_size": job.cfg.vision.image_size,
            "weights_quantization": _weights_quantization(config, params),
            "data_path": recorded_data_path or os.fspath(data_path), "annotation_path": annotation_path,
            "image_root": "" if recorded_data_path else config.image_root,
            "tfds_data_dir": tfds_data_dir, "few_shot": shots.k if shots else 0,
            "few_shot_path": config.few_shot_path if shots else None, "seed": config.seed,
            "prompt": task.prompt_template, "max_examples": config.max_examples,
            "examples_in_data": len(all_examples),
            "max_new_tokens": task.max_new_tokens, "min_new_tokens": task.min_new_tokens, "decoding": "greedy",
            "devices": jax.device_count(), "processes": jax.process_count(),
            "seconds_last_run": round(time.time() - started, 3)}
  # Examples past max_examples that a run with a larger max_examples finished are not part of this result (a
  # synthetic set holds max_examples examples: the larger set's others are not in it).
  evaluated = {e.example_id for e in examples}
  return results.finalize(task, examples, ledger_dir, output, config=record,
                          left_out={i for i in [e.example_id for e in all_examples] + list(done) if i not in evaluated})


def _check_ledger_ids(done: Sequence, examples: Sequence[EvalExample], ledger_dir, data: str) -> None:
  """Raises ValueError when the ledgers hold predictions of ids that `examples` (all of the data) lacks: the data
  file changed since the run started (or the ledgers are another data file's), which failed only after every
  remaining example ran."""
  ids = {e.example_id for e in examples}
  unknown = [i for i in done if i not in ids]
  if unknown:
    raise ValueError(f"{ledger_dir} holds {len(unknown)} predictions for ids that are not in {data}, e.g. "
                     f"{unknown[:5]}: the data changed since that run started; resuming would mix two data files: "
                     "choose another output, or move that folder away to start over")


def predict(job: EvalJob, examples: Sequence[EvalExample]) -> list[str | int] | None:
  """The predictions of `examples` (all processes call it; process 0 gets them in order, the others None): the
  same sharding, batching, padding and decoding as `run`, without ledgers or output file."""
  mine = results.shard(list(examples), jax.process_count(), jax.process_index())
  longest = -(-len(examples) // jax.process_count())
  got = {}
  for b in range(-(-longest // job.local_rows)):
    chunk = mine[b * job.local_rows:(b + 1) * job.local_rows]
    if job.task.generates:
      records = _generated_records(job, chunk)
    else:
      chosen, _ = job.choose(chunk)
      records = collectives.gather_json([{"id": e.example_id, "prediction": c} for e, c in zip(chunk, chosen)])
    got.update((r["id"], r["prediction"]) for r in records)
  if jax.process_index() != 0:
    return None
  return [got[e.example_id] for e in examples]


def _shot_sampler(config, task: tasks_lib.EvalTask, tfds_data_dir: str | None) -> few_shot_lib.ShotSampler | None:
  """The few-shot sampler of `config.few_shot` > 0 (its pool read from `config.few_shot_path`), else None."""
  k = config.get("few_shot", 0)  # an integer >= 0 (`check_config`)
  if not k:
    return None
  few_shot_lib.check_kind(task)
  path = config.get("few_shot_path")
  if not path:
    raise errors.ConfigError(f"few_shot={k} needs config.few_shot_path: the training examples to draw the shots "
                             f"from (a file in the format of {task.name!r}'s data, or a TFDS spec whose split "
                             "defaults to train)")
  pool = few_shot_lib.shot_pool(task, task.read(path, tfds_data_dir=tfds_data_dir, tfds_split="train"))
  logging.info("few-shot: %d shots per query from %d candidates in %s (seed %d)", k, len(pool), path, config.seed)
  return few_shot_lib.ShotSampler(pool, k, config.seed)


def _generated_records(job: EvalJob, chunk: Sequence[EvalExample]) -> list[dict]:
  """Generates a batch and returns, on process 0, the ledger records of every real row of all processes."""
  row_key, new_ids = job.generate(chunk)
  ids = [e.example_id for e in chunk] + [None] * (job.local_rows - len(chunk))
  all_ids = collectives.gather_json(ids)  # process p's ids at p * local_rows + i, as row_key counts
  records = []
  for key, row in sorted(zip(row_key.tolist(), new_ids), key=lambda kv: kv[0]):
    if all_ids[key] is None:
      continue
    # As the reference: only the new tokens, special tokens dropped (so `<box>` tags vanish), stripped.
    records.append({"id": all_ids[key], "prediction": job.tok.decode(row, skip_special_tokens=True).strip()})
  return records
