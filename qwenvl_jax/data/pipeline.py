"""The grain pipeline of every stage: sources -> records -> examples -> packed or padded rows -> batches.

```
per source:  items[process_index::process_count]  (disjoint shard per host)
             .shuffle(seed).repeat(epochs)          (a new order every epoch; synthetic data is already iid)
             .map(parse + encode)                   (bad record -> skipped and counted, or an error when strict)
stage 2:     MapDataset.mix(sources, weights)       (the multi-task mixture)
             .to_iter_dataset()
             first-fit packing on (input_ids, targets, loss_mask: T) and (images: M)   (max 1 example per row
                                                                                         when packing is off)
             .map(finalize) .batch(B_local) .mp_prefetch(workers)
```
Everything before packing is a random-access `MapDataset` and packing is grain's own checkpointable transform, so
`iterator.get_state()` / `set_state()` resume on exactly the next batch (with the same worker count).

Batches are host-local dicts of numpy arrays (DESIGN §4), B_local = global_batch / process_count rows:
  input_ids int32[B, T], targets int32[B, T], loss_mask float32[B, T], segment_ids int32[B, T],
  positions int32[B, T], images uint8[B, M, S, S, 3], image_mask bool[B, M].
"""
import dataclasses
import functools
import os
import threading
import time
from typing import Any, Callable

from absl import flags
import grain
import ml_collections
import numpy as np

from qwenvl_jax.data import records as rec
from qwenvl_jax.data.encode import ExampleEncoder
from qwenvl_jax.data.sources import Source, make_source
from qwenvl_jax.data.synthetic import MAX_SHAPES

_SEQ_FEATURES = ("input_ids", "targets", "loss_mask")
# How often a grain worker checks that its parent (the trainer) is alive.
_PARENT_POLL_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class _RecordToExample:
  """parse + encode one raw item; a bad record is skipped (returns None) or raised when strict."""
  parse: Callable[[Any], rec.Record]
  encode: ExampleEncoder
  strict: bool
  max_consecutive_skips: int
  source: str = "a data source"  # the source's spec, named when too many of its records in a row are bad

  def __call__(self, item) -> dict[str, np.ndarray] | None:
    try:
      example = self.encode(self.parse(item))
    except rec.BadRecordError as e:
      where = self.parse.where(item) if hasattr(self.parse, "where") else None
      if where and where not in e.record_id:
        # A record with its own id is also named by file and line, so it can be found and fixed.
        e = rec.BadRecordError(f"{e.record_id} ({where})", e.reason)
      if self.strict:
        raise e
      rec.SKIPPED.skip(e, self.max_consecutive_skips, self.source)
      return None
    rec.SKIPPED.ok()
    return example


@dataclasses.dataclass(frozen=True)
class _Finalize:
  """Packed grain row -> the DESIGN §4 row; checks the image-slot invariant of DESIGN §2.1."""
  eod_id: int
  img_pad_id: int
  image_tokens: int

  def __call__(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = row["input_ids_segment_ids"].astype(np.int32)
    pad = segment_ids == 0
    image_mask = row["images_segment_ids"] > 0
    # The model fills the image slots of a row in order of <imgpad> appearance: the images must be sorted by
    # segment exactly like the tokens, and their count must match the placeholders.
    image_segments = row["images_segment_ids"][image_mask]
    if np.any(np.diff(image_segments) < 0) or np.any(~image_mask[:image_mask.sum()]):
      raise AssertionError("packed images are out of segment order")
    n = int(segment_ids.max()) + 1
    pads_per_segment = np.bincount(segment_ids[(row["input_ids"] == self.img_pad_id) & ~pad], minlength=n)
    images_per_segment = np.bincount(image_segments, minlength=n)
    if not np.array_equal(pads_per_segment, self.image_tokens * images_per_segment):
      raise AssertionError(f"<imgpad> tokens per segment {pads_per_segment.tolist()} do not match "
                           f"{self.image_tokens} x images per segment {images_per_segment.tolist()}")
    return {
        # The reference pads with <|endoftext|>; padding is segment 0, so the value only matters for readability.
        "input_ids": np.where(pad, self.eod_id, row["input_ids"]).astype(np.int32),
        "targets": np.where(pad, self.eod_id, row["targets"]).astype(np.int32),
        "loss_mask": np.where(pad, 0.0, row["loss_mask"]).astype(np.float32),
        "segment_ids": segment_ids,
        "positions": np.where(pad, 0, row["input_ids_positions"]).astype(np.int32),
        "images": row["images"],
        "image_mask": image_mask,
    }


def make_source_datasets(config: ml_collections.ConfigDict, *, stage: int, image_size: int
                         ) -> list[tuple[Source, float]]:
  """(source, weight) pairs of a stage: one source, or the stage-2 task mixture."""
  common = dict(stage=stage, image_size=image_size, seed=config.seed, image_root=config.image_root or None,
                split=config.split, data_dir=config.data_dir or None,
                synthetic_max_shapes=config.get("synthetic_max_shapes", MAX_SHAPES))
  per_task = any(config.mixture_sources.get(t, "") for t in config.mixture) if config.mixture else False
  if stage != 2 or not config.mixture or (config.source != "synthetic" and not per_task):
    # Stage 2 with one non-synthetic source and no per-task sources reads that source as already mixed.
    return [(make_source(config.source, task=config.task or None, **common), 1.0)]
  pairs = []
  for task, weight in config.mixture.items():
    if weight < 0:
      raise ValueError(f"mixture weight of {task!r} is negative: {weight}")
    if weight == 0:
      continue
    spec = config.mixture_sources.get(task, "") or config.source
    if spec != "synthetic" and not config.mixture_sources.get(task, ""):
      raise ValueError(
          f"stage-2 task {task!r} has weight {weight} but data.mixture_sources.{task} is empty, and only the "
          f"synthetic source provides every task: set --config.data.mixture_sources.{task}=SPEC, or drop the task "
          f"with --config.data.mixture.{task}=0")
    pairs.append((make_source(spec, task=task, **common), float(weight)))
  if not pairs:
    raise ValueError("every stage-2 mixture weight is 0")
  return pairs


def make_dataset(config: ml_collections.ConfigDict, tokenizer, *, process_index: int, process_count: int,
                 global_batch: int, seq_len: int, max_images: int, image_size: int, stage: int,
                 image_tokens: int = 256) -> grain.IterDataset:
  """The host-local grain dataset of batches (see the module docstring); `iter()` it to train."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  if global_batch % process_count:
    raise ValueError(f"global_batch={global_batch} is not divisible by process_count={process_count}")
  if max_images < 1 or seq_len < 2 or image_tokens < 1:
    raise ValueError(f"need max_images >= 1, seq_len >= 2, image_tokens >= 1; got {max_images}, {seq_len}, "
                     f"{image_tokens}")
  local_batch = global_batch // process_count
  # A run of bad records an earlier pipeline of this process left open (a notebook, a test) is not this one's; the
  # workers fork from here, so they start with the run closed too.
  rec.SKIPPED.ok()
  encoder = ExampleEncoder(tokenizer, stage, image_tokens, image_size, seq_len, max_images, config.system,
                           config.truncate)
  datasets, weights = [], []
  for i, (source, weight) in enumerate(make_source_datasets(config, stage=stage, image_size=image_size)):
    ds = source.items[process_index::process_count]
    if len(ds) == 0:
      raise ValueError(f"source {source.name} has no records for process {process_index} of {process_count}")
    if config.shuffle:
      ds = ds.shuffle(seed=config.seed + i)
    ds = ds.repeat(config.num_epochs or None)
    datasets.append(ds.map(_RecordToExample(source.parse, encoder, config.strict, config.max_consecutive_skips,
                                            f"data source {source.name}")))
    weights.append(weight)
  ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=64))
  it = grain.experimental.FirstFitPackIterDataset(
      it,
      length_struct={"input_ids": seq_len, "targets": seq_len, "loss_mask": seq_len, "images": max_images},
      num_packing_bins=config.packing_bins if config.packing else 1,
      shuffle_bins=False,
      max_sequences_per_bin=None if config.packing else 1,
  )
  it = it.map(_Finalize(tokenizer.eod_id, tokenizer.img_pad_id, image_tokens))
  it = it.batch(local_batch, drop_remainder=True)
  if config.num_workers > 0:
    # grain's worker processes read absl flags; outside an absl app (tests, notebooks) they are not parsed yet.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers),
                        worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
    it = it.map(_own_memory)
  return it


def _own_memory(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The batch copied out of the workers' shared memory, which is then released at once.

  A batch that stays referenced until the interpreter exits (the last one, aliased by a CPU jax.Array) cannot
  release its shared memory then (grain's __del__ fails during shutdown), and Python's resource tracker warns
  about 'leaked shared_memory objects' at the end of every run. One memcpy of a batch per step is negligible.
  """
  return {k: np.array(v, copy=True) for k, v in batch.items()}


def _exit_with_parent(parent_pid: int, worker_index: int, worker_count: int) -> None:
  """grain worker init: a daemon thread ends this worker as soon as the process that started it is gone.

  grain's workers are daemonic, so they stop with a parent that exits normally; a SIGKILLed trainer (preemption,
  OOM killer) runs no cleanup, and each orphaned worker (~240 MB) lived on. The worker is re-parented when its
  parent dies, so polling `os.getppid()` notices. (prctl's PR_SET_PDEATHSIG would fire when the *thread* that
  started the worker ends, which need not be the trainer's main thread.)
  """
  del worker_index, worker_count

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(_PARENT_POLL_SECONDS)
    os._exit(1)  # pylint: disable=protected-access  (no cleanup: the parent that owned it all is gone)

  if os.getppid() != parent_pid:
    os._exit(1)  # pylint: disable=protected-access
  threading.Thread(target=watch, name="qwenvl-exit-with-parent", daemon=True).start()


def make_train_iterator(config: ml_collections.ConfigDict, tokenizer, *, process_index: int, process_count: int,
                        global_batch: int, seq_len: int, max_images: int, image_size: int, stage: int,
                        image_tokens: int = 256) -> grain.DatasetIterator:
  """A checkpointable iterator of host-local batches (DESIGN §4) for one training stage.

  Args:
    config: `default_data_config(stage)` (possibly overridden).
    tokenizer: a `qwenvl_jax.text` Tokenizer (picklable, for worker processes).
    process_index: this host's index, `jax.process_index()`.
    process_count: `jax.process_count()`.
    global_batch: rows per step over all hosts; each host yields global_batch / process_count.
    seq_len: T.
    max_images: M image slots per row.
    image_size: S.
    stage: 1, 2 or 3.
    image_tokens: Q `<imgpad>` ids per image (the model's number of resampler queries).

  Returns:
    A grain DatasetIterator: `next(it)` is a dict of numpy arrays; `it.get_state()` / `it.set_state(state)`
    save and restore the position (restore into an iterator built with the same arguments and worker count).
    With `config.num_workers > 0`, call `it.close()` when done: it stops the worker processes and frees their
    shared memory.
  """
  return iter(make_dataset(config, tokenizer, process_index=process_index, process_count=process_count,
                           global_batch=global_batch, seq_len=seq_len, max_images=max_images,
                           image_size=image_size, stage=stage, image_tokens=image_tokens))
