"""The model side of an evaluation run: the model, tokenizer and mesh of one run, and the per-batch work (greedy
generation, or multiple choice by the options' mean token loss) on one global batch sharded over the mesh's batch
axes (the rules' `act_batch`).

Letters: R rows of this process's batch, P padded prompt length.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from qwenvl_jax import errors, sharding
from qwenvl_jax.evaluation import collectives
from qwenvl_jax.evaluation import few_shot as few_shot_lib
from qwenvl_jax.evaluation import multiple_choice as mc_lib
from qwenvl_jax.evaluation import tasks as tasks_lib
from qwenvl_jax.evaluation.prompts import PromptEncoder, data_folder
from qwenvl_jax.evaluation.readers import EvalExample
from qwenvl_jax.inference import decode, loading, model_source, scoring


def check_tokenizer(source: model_source.ModelSource) -> None:
  """Raises errors.ConfigError when `source` names no tokenizer (a params checkpoint that records none)."""
  if not source.tokenizer:
    raise errors.ConfigError("config.tokenizer is required: config.checkpoint is neither a training run nor a "
                             "checkpoint that records its tokenizer",
                             hint="e.g. --config.tokenizer=qwen:qwen.tiktoken or --config.tokenizer=sp.model")


class EvalJob:
  """The model, tokenizer and mesh of one run, and the per-batch work."""

  def __init__(self, config, task: tasks_lib.EvalTask, shots: few_shot_lib.ShotSampler | None = None, *,
               model: tuple | None = None, source: model_source.ModelSource | None = None):
    """`model`: (tokenizer, model config, mesh, rules, nnx model) already built (evaluation during training: later
    steps swap `generator.state`); else they are loaded from `source` (the runner's, whose params its settings
    record), or as `config` says."""
    self.config, self.task = config, task
    if model is None:
      # A training run directory (or its checkpoints/<step>) supplies preset, image size and tokenizer; the
      # official prompts are raw text whatever the run trained on, so its chat format is not used.
      source = source or model_source.resolve(config.checkpoint or None, model=config.model or None,
                                              tokenizer=config.tokenizer or None,
                                              image_size=config.get("image_size") or None)  # 0 = not set
      check_tokenizer(source)
      model = loading.load_source(source, dtype=config.dtype, rules=config.rules, mesh_axes=config.mesh.to_dict(),
                                  tensor_parallel=config.get("tensor_parallel", 0), seed=config.seed,
                                  quantize=config.get("quantize"),
                                  group_size=config.get("quantize_group_size"),
                                  attention=config.get("attention", "xla"))
    self.tok, self.cfg, self.mesh, self.rules, module = model
    kv = config.get("kv_cache_dtype", "auto")
    self.generator = decode.Generator(module, kv_cache_dtype=None if kv in ("auto", "") else kv)
    self.scorer = scoring.LikelihoodScorer(self.generator)
    self.local_rows = config.per_device_batch_size * jax.local_device_count()
    self.global_rows = config.per_device_batch_size * jax.device_count()
    batch_size = sharding.batch_shards(self.mesh, self.rules)
    if self.global_rows % batch_size:
      raise errors.ConfigError(f"the global batch {self.global_rows} is not divisible by the mesh's batch axes "
                       f"{sharding.batch_axes(self.mesh, self.rules)} of size {batch_size}")
    self.gen = decode.GenerationConfig(max_new_tokens=max(task.max_new_tokens, 1),
                                       min_new_tokens=task.min_new_tokens, eos_id=self.tok.eod_id,
                                       pad_id=self.tok.eod_id, vocab_limit=self.tok.vocab_size)
    self.buckets = tuple(config.buckets)
    self.prompts = PromptEncoder(task, self.tok, image_tokens=self.cfg.image_tokens,
                                 image_size=self.cfg.vision.image_size, image_root=config.image_root, shots=shots,
                                 data_dir=data_folder(config.get("data_path")),
                                 image_root_flag=config.get("image_root_flag", "--config.image_root"))

  def _global_batch(self, prompts, images, rows: int) -> tuple[dict, jax.Array]:
    """This process's prompts as one global batch (batch axis sharded over the mesh), and `row_key`
    int32[global rows]: process_index * rows + local row, which says where each global row came from."""
    longest = collectives.global_max(max((len(p) for p in prompts), default=1))
    width = decode.bucket_length(longest, self.buckets)
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
    rows = decode.trim(collectives.to_host(tokens), self.gen.eos_id)
    return collectives.to_host(row_key), [[t for t in r if t != self.gen.eos_id] for r in rows]

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
    local = collectives.local_rows(collectives.to_host(losses), collectives.to_host(row_key), rows)
    chosen, option_losses = [], []
    for a, b in spans:
      option_loss = scoring.option_losses(local[a:b], [len(suffixes[k]) for k in range(b - a)])
      chosen.append(mc_lib.choose_option(option_loss))
      option_losses.append([float(x) for x in option_loss])
    return chosen, option_losses
