"""The batch evaluation job behind `python -m qwenvl_jax.evaluate`: one official task over all hosts and devices.

Procedure (RECIPES §2.1, with the bookkeeping of `evaluation.results`):
  1. every process reads the task's data file; process 0 reads the ledgers of an earlier partial run and tells
     the others which examples are done (so all agree on the rest, `todo`);
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
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from qwenvl_jax import config_args, distributed, sharding
from qwenvl_jax import text as qtext
from qwenvl_jax.data import images as image_lib
from qwenvl_jax.evaluation import few_shot as few_shot_lib
from qwenvl_jax.evaluation import multiple_choice as mc_lib
from qwenvl_jax.evaluation import results
from qwenvl_jax.evaluation import tasks as tasks_lib
from qwenvl_jax.evaluation import tfds_readers
from qwenvl_jax.evaluation.readers import EvalDataError, EvalExample
from qwenvl_jax.inference import decode, loading, model_source, scoring


# ----------------------------------------------------------------------------------------------------------------
# Multi-process helpers (no-ops with one process)
# ----------------------------------------------------------------------------------------------------------------

def _broadcast_json(obj: Any) -> Any:
  """Process 0's `obj` on every process."""
  if jax.process_count() == 1:
    return obj
  data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  n = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
  buf = np.zeros(n, np.uint8)
  if jax.process_index() == 0:
    buf[:] = data
  buf = multihost_utils.broadcast_one_to_all(buf)
  return json.loads(bytes(np.asarray(buf)).decode("utf-8"))


def _global_max(n: int) -> int:
  if jax.process_count() == 1:
    return n
  return int(np.max(multihost_utils.process_allgather(np.int32(n))))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole global array on this host (all rows, from every process)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------

def load_image(example: EvalExample, image_root: str, image_size: int) -> np.ndarray:
  """uint8[S, S, 3]: the example's image (the bytes of its `image_loader`, else its file, relative paths under
  `image_root`) with the data pipeline's PIL preprocessing.

  Raises:
    EvalDataError: a missing, unreadable or corrupt image, naming the example.
  """
  try:
    if example.image_loader is not None:
      source = example.image_loader()
    else:
      path = example.image
      source = path if not image_root or os.path.isabs(path) else os.path.join(image_root, path)
    return image_lib.preprocess_image(source, image_size)
  except (image_lib.ImageError, EvalDataError) as e:
    raise EvalDataError(f"example {example.example_id!r} (image {example.image}): {e}") from e


class PromptEncoder:
  """What the model is shown for each example: the raw prompt (few-shot: its shots' prompts and answers first),
  its ids with the image spans expanded, and the preprocessed images, in order."""

  def __init__(self, task: tasks_lib.EvalTask, tok: qtext.Tokenizer, *, image_tokens: int, image_size: int,
               image_root: str = "", shots: few_shot_lib.ShotSampler | None = None):
    self.task, self.tok, self.shots = task, tok, shots
    self.image_tokens, self.image_size, self.image_root = image_tokens, image_size, image_root

  @property
  def max_images(self) -> int:
    """Image slots a row needs: the query's and its shots'."""
    return 1 + (self.shots.k if self.shots else 0)

  def prompt(self, example: EvalExample) -> tuple[str, list[EvalExample]]:
    """The raw prompt text and the examples whose images it shows, in order (the shots', then the query's)."""
    shots = self.shots.draw(example) if self.shots else []
    return few_shot_lib.few_shot_prompt(self.task, example, shots), shots + [example]

  def encode(self, example: EvalExample, suffix: Sequence[int] = ()) -> tuple[list[int], list[np.ndarray]]:
    """The prompt's ids (image spans expanded, then `suffix`) and its images uint8[S, S, 3]."""
    text, shown = self.prompt(example)
    context = qtext.make_context(self.tok, text, chat_format="raw", n_image_tokens=self.image_tokens)
    if len(context.image_paths) != len(shown):
      raise EvalDataError(f"example {example.example_id!r}: its prompt holds {len(context.image_paths)} image spans, "
                          f"{len(shown)} expected (does a text field contain <img>...</img>?)")
    return context.tokens + list(suffix), [load_image(e, self.image_root, self.image_size) for e in shown]


class _Job:
  """The model, tokenizer and mesh of one run, and the per-batch work."""

  def __init__(self, config, task: tasks_lib.EvalTask, shots: few_shot_lib.ShotSampler | None = None, *,
               model: tuple | None = None):
    """`model`: (tokenizer, model config, mesh, rules, nnx model) already built (evaluation during training: later
    steps swap `generator.state`); else they are loaded as `config` says."""
    self.config, self.task = config, task
    if model is None:
      # A training run directory (or its checkpoints/<step>) supplies preset, image size and tokenizer; the
      # official prompts are raw text whatever the run trained on, so its chat format is not used.
      source = model_source.resolve(config.checkpoint or None, model=config.model or None,
                                    tokenizer=config.tokenizer or None, image_size=config.get("image_size"))
      if not source.tokenizer:
        raise ValueError("config.tokenizer is required unless config.checkpoint is a training run")
      self.tok = qtext.load_tokenizer(source.tokenizer)
      self.cfg = loading.model_config(source.preset, self.tok, dtype=config.dtype,
                                      random_weights=not source.params, image_size=source.image_size)
      self.mesh, self.rules = loading.inference_mesh(config.rules, **config.mesh.to_dict())
      module = loading.load_model(self.cfg, source.params, self.mesh, self.rules, seed=config.seed,
                                  preset=source.preset, quantize=config.get("quantize"),
                                  group_size=config.get("quantize_group_size"))
    else:
      self.tok, self.cfg, self.mesh, self.rules, module = model
    kv = config.get("kv_cache_dtype", "auto")
    self.generator = decode.Generator(module, kv_cache_dtype=None if kv in ("auto", "") else kv)
    self.scorer = scoring.LikelihoodScorer(self.generator)
    self.local_rows = config.per_device_batch_size * jax.local_device_count()
    self.global_rows = config.per_device_batch_size * jax.device_count()
    batch_size = sharding.batch_shards(self.mesh, self.rules)
    if self.global_rows % batch_size:
      raise ValueError(f"the global batch {self.global_rows} is not divisible by the mesh's batch axes "
                       f"{sharding.batch_axes(self.mesh, self.rules)} of size {batch_size}")
    self.gen = decode.GenerationConfig(max_new_tokens=max(task.max_new_tokens, 1),
                                       min_new_tokens=task.min_new_tokens, eos_id=self.tok.eod_id,
                                       pad_id=self.tok.eod_id, vocab_limit=self.tok.vocab_size)
    self.buckets = tuple(config.buckets)
    self.prompts = PromptEncoder(task, self.tok, image_tokens=self.cfg.image_tokens,
                                 image_size=self.cfg.vision.image_size, image_root=config.image_root, shots=shots)

  def _global_batch(self, prompts, images, rows: int) -> tuple[dict, jax.Array]:
    """This process's prompts as one global batch (batch axis sharded over the mesh), and `row_key`
    int32[global rows]: process_index * rows + local row, which says where each global row came from."""
    width = decode.bucket_length(_global_max(max((len(p) for p in prompts), default=1)), self.buckets)
    if not prompts:  # a padding-only batch of a process whose shard ran out
      prompts, images = [[self.tok.eod_id]], [[]]
    batch = decode.make_prompt_batch(prompts, images, pad_id=self.tok.eod_id, image_pad_id=self.cfg.image_pad_id,
                                     image_tokens=self.cfg.image_tokens, buckets=(width,), num_rows=rows,
                                     max_images=self.prompts.max_images, image_size=self.cfg.vision.image_size)
    arrays = self.generator.device_batch(batch, self.gen)
    arrays["row_key"] = jax.process_index() * rows + np.arange(rows, dtype=np.int32)
    arrays = {k: jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh, self.rules, v.ndim),
                                                        np.asarray(v)) for k, v in arrays.items()}
    return arrays, arrays.pop("row_key")

  def generate(self, examples: Sequence[EvalExample]) -> tuple[np.ndarray, list[list[int]]]:
    """Greedy generation of a batch: (row_key int32[global rows], new ids of each row, eos excluded)."""
    encoded = [self.prompts.encode(e) for e in examples]
    arrays, row_key = self._global_batch([p for p, _ in encoded], [i for _, i in encoded], self.local_rows)
    with sharding.use_rules(self.mesh, self.rules):
      tokens = self.generator.generate_on_device(arrays, self.gen, jax.random.key(self.config.seed))
    rows = decode.trim(_to_host(tokens), self.gen.eos_id)
    return _to_host(row_key), [[t for t in r if t != self.gen.eos_id] for r in rows]

  def choose(self, examples: Sequence[EvalExample]) -> tuple[list[int], list[list[float]]]:
    """Lowest-loss option of each of this process's examples (rows = examples x their options, padded)."""
    suffixes = [self.tok.encode(s) for s in mc_lib.option_suffixes(len(mc_lib.OPTION_LETTERS))]
    prompts, images, spans = [], [], []
    for e in examples:
      start = len(prompts)
      for k in range(len(e.choices)):
        ids, imgs = self.prompts.encode(e, suffixes[k])
        prompts.append(ids)
        images.append(imgs)
      spans.append((start, len(prompts)))
    rows = self.local_rows * len(mc_lib.OPTION_LETTERS)
    arrays, row_key = self._global_batch(prompts, images, rows)
    with sharding.use_rules(self.mesh, self.rules):
      losses = self.scorer.token_losses_on_device(arrays)
    local = _local_rows(_to_host(losses), _to_host(row_key), rows)
    chosen, option_losses = [], []
    for a, b in spans:
      option_loss = scoring.option_losses(local[a:b], [len(suffixes[k]) for k in range(b - a)])
      chosen.append(mc_lib.choose_option(option_loss))
      option_losses.append([float(x) for x in option_loss])
    return chosen, option_losses


def _local_rows(x: np.ndarray, row_key: np.ndarray, rows: int) -> np.ndarray:
  """This process's `rows` rows of a gathered global batch, in its local order."""
  out = np.empty((rows,) + x.shape[1:], x.dtype)
  for key, row in zip(row_key, x):
    if key // rows == jax.process_index():
      out[key % rows] = row
  return out


def run(config) -> dict | None:
  """Runs one evaluation task as configured (`default_config`); returns the results on process 0 (None on the
  others, and when `max_batches` stopped the run before the end)."""
  if "distributed" in config:
    distributed.initialize(config.distributed)
  task = tasks_lib.get_task(config.task)
  output = config.output
  if not output:
    raise ValueError("config.output (the results JSON path) is required")
  results.check_output_free(output)
  data_path = config.data_path or task.data_file
  annotation_path = config.annotation_path or None
  tfds_data_dir = config.get("tfds_data_dir") or None
  if annotation_path and tfds_readers.is_spec(data_path) and not os.path.exists(annotation_path):
    raise FileNotFoundError(f"the annotation file {annotation_path} does not exist; a TFDS dataset's own answers "
                            f"are used with --config.annotation_path=''")
  shots = _shot_sampler(config, task, tfds_data_dir)
  examples = task.read(data_path, annotation_path=annotation_path, tfds_data_dir=tfds_data_dir)
  if config.max_examples:
    examples = examples[:config.max_examples]
  if shots:
    shots.check(examples)
  ledger_dir = results.partial_dir(output)
  settings = {"task": task.name, "checkpoint": config.checkpoint, "model": config.model,
              "tokenizer": config.tokenizer, "dtype": config.dtype, "image_size": config.get("image_size"),
              "data_path": os.fspath(data_path), "few_shot": shots.k if shots else 0,
              "few_shot_path": config.few_shot_path if shots else None,
              "seed": config.seed if shots or not config.checkpoint else None}  # seed: random weights, shot draw
  state = None
  if jax.process_index() == 0:
    try:
      results.check_run_settings(ledger_dir, settings)
      state = {"done": list(results.read_ledgers(ledger_dir))}
    except ValueError as e:  # every process raises it, none waits for the others
      state = {"error": str(e)}
  state = _broadcast_json(state)
  if "error" in state:
    raise ValueError(state["error"])
  done = set(state["done"])
  todo = [e for e in examples if e.example_id not in done]
  logging.info("task %s: %d examples, %d already done, %d to go", task.name, len(examples), len(done), len(todo))

  job = _Job(config, task, shots)
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
      records = _gather_records(records)
    if ledger is not None:
      ledger.append(records)
      bar.update(len(records))
  bar.close()
  _barrier("qwenvl_eval_done")
  if jax.process_index() != 0:
    return None
  finished = results.read_ledgers(ledger_dir)
  if any(e.example_id not in finished for e in examples):
    missing = sum(e.example_id not in finished for e in examples)
    logging.info("stopped after %d batches; %d examples left: run again with the same output to resume",
                 num_batches, missing)
    return None
  record = {"checkpoint": config.checkpoint, "model": config.model, "tokenizer": config.tokenizer,
            "data_path": os.fspath(data_path), "annotation_path": annotation_path, "image_root": config.image_root,
            "tfds_data_dir": tfds_data_dir, "few_shot": shots.k if shots else 0,
            "few_shot_path": config.few_shot_path if shots else None, "seed": config.seed,
            "max_new_tokens": task.max_new_tokens, "min_new_tokens": task.min_new_tokens, "decoding": "greedy",
            "devices": jax.device_count(), "processes": jax.process_count(),
            "seconds_last_run": round(time.time() - started, 3)}
  return results.finalize(task, examples, ledger_dir, output, config=record)


def predict(job: _Job, examples: Sequence[EvalExample]) -> list[str | int] | None:
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
      records = _gather_records([{"id": e.example_id, "prediction": c} for e, c in zip(chunk, chosen)])
    got.update((r["id"], r["prediction"]) for r in records)
  if jax.process_index() != 0:
    return None
  return [got[e.example_id] for e in examples]


def _shot_sampler(config, task: tasks_lib.EvalTask, tfds_data_dir: str | None) -> few_shot_lib.ShotSampler | None:
  """The few-shot sampler of `config.few_shot` > 0 (its pool read from `config.few_shot_path`), else None."""
  k = config.get("few_shot", 0)
  if isinstance(k, bool) or not isinstance(k, int) or k < 0:
    raise ValueError(f"config.few_shot must be an integer >= 0, got {k!r}")
  if not k:
    return None
  few_shot_lib.check_kind(task)
  path = config.get("few_shot_path")
  if not path:
    raise ValueError(f"few_shot={k} needs config.few_shot_path: the training examples to draw the shots from (a file "
                     f"in the format of {task.name!r}'s data, or a TFDS spec whose split defaults to train)")
  pool = few_shot_lib.shot_pool(task, task.read(path, tfds_data_dir=tfds_data_dir, tfds_split="train"))
  logging.info("few-shot: %d shots per query from %d candidates in %s (seed %d)", k, len(pool), path, config.seed)
  return few_shot_lib.ShotSampler(pool, k, config.seed)


def _generated_records(job: _Job, chunk: Sequence[EvalExample]) -> list[dict]:
  """Generates a batch and returns, on process 0, the ledger records of every real row of all processes."""
  row_key, new_ids = job.generate(chunk)
  ids = [e.example_id for e in chunk] + [None] * (job.local_rows - len(chunk))
  all_ids = _gather_ids(ids)  # process p's ids at p * local_rows + i, as row_key counts
  records = []
  for key, row in sorted(zip(row_key.tolist(), new_ids), key=lambda kv: kv[0]):
    if all_ids[key] is None:
      continue
    # As the reference: only the new tokens, special tokens dropped (so `<box>` tags vanish), stripped.
    records.append({"id": all_ids[key], "prediction": job.tok.decode(row, skip_special_tokens=True).strip()})
  return records


def _gather_ids(ids: list) -> list:
  """Every process's list (JSON-serializable items), concatenated in process order."""
  if jax.process_count() == 1:
    return ids
  data = np.frombuffer(json.dumps(ids).encode("utf-8"), np.uint8)
  n = _global_max(data.size)
  buf = np.full(n, ord(" "), np.uint8)
  buf[:data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(buf))
  out = []
  for row in gathered:
    out.extend(json.loads(bytes(row).decode("utf-8")))
  return out


def _gather_records(records: list[dict]) -> list[dict]:
  """All processes' records on every process, in process order (process 0 writes them)."""
  return _gather_ids(records)


def default_config(task_name: str, arg: str | None = None):
  """The `ml_collections.ConfigDict` of an evaluation run of `task_name` (used by `configs/eval/*.py`).

  `arg` is `key=value,key=value` overriding top-level fields (`--config=configs/eval/flickr.py:max_examples=50`);
  any field can also be set with `--config.FIELD=...`.
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  task = tasks_lib.get_task(task_name)
  c = ml_collections.ConfigDict()
  c.task = task.name
  c.output = ""                         # results JSON (required; never overwritten; `OUTPUT.partial/` resumes)
  c.data_path = task.data_file          # the official file (RECIPES §2.10), any file of its format, or a prepared
                                        # TFDS dataset: tfds:NAME[/CONFIG][:VERSION][:SPLIT] or
                                        # array_record:FOLDER[:SPLIT] (split default `test`; the task kind's
                                        # schemas: evaluation/tfds_readers.py)
  c.tfds_data_dir = ""                  # TFDS data_dir of tfds: specs ("" = TFDS's default); never downloads
  c.annotation_path = task.annotation_file or ""   # VQA accuracy: the official annotation JSON ("" with a TFDS
                                        # dataset whose `answers` are the human answers)
  c.image_root = ""                     # relative image paths of the data file are taken under this folder
  c.checkpoint = ""                     # a training run, <run>/checkpoints/<step>, or a params checkpoint
                                        # directory ("" = random weights, for smoke tests)
  c.model = ""                          # architecture preset ("" = the run's, else qwen_vl_7b)
  c.tokenizer = ""                      # tokenizer spec (text.load_tokenizer): qwen:PATH, sentencepiece:PATH, or a
                                        # .tiktoken / .model file ("" = the run's)
  c.dtype = "bfloat16"
  c.quantize = "none"                   # weight-only quantization at load: none | int8 (per channel) | int4 (groups)
  c.quantize_group_size = 128           # int4 group size
  c.kv_cache_dtype = "auto"             # auto (the compute dtype) | int8
  c.image_size = ml_collections.config_dict.placeholder(int)   # override the preset's resolution
  c.per_device_batch_size = 4
  c.rules = "fsdp"                      # sharding rule table (qwenvl_jax/sharding_rules.py)
  c.mesh = ml_collections.ConfigDict({"fsdp": -1})   # ICI degrees of the (data, fsdp, tensor) mesh
  c.buckets = decode.DEFAULT_BUCKETS    # allowed padded prompt lengths (bounds recompiles)
  c.seed = 0                            # random weights, and the few-shot draw
  c.few_shot = 0                        # k training examples before each query (captioning and VQA; RECIPES §2.1)
  c.few_shot_path = ""                  # their file in the task's format (images under image_root), or a TFDS
                                        # spec (split default `train`); a query's shots are a function of
                                        # (seed, its id), never the query itself
  c.max_examples = 0                    # evaluate only the first N examples (0 = all)
  c.max_batches = 0                     # stop after N batches (0 = all); rerun with the same output to resume
  c.progress = True
  c.distributed = distributed.default_config()   # as the trainer's (qwenvl_jax/distributed.py)
  # Every top-level field is a key; a non-scalar one (mesh, buckets, distributed) is refused with a pointer to
  # --config.FIELD, and the placeholder image_size takes an integer.
  c.update(config_args.parse_arg(arg, {key: c[key] for key in c}))
  return c
