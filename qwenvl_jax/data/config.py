"""The data config schema of a training stage, embedded by `configs/stage{1,2,3}.py` as `config.data`.

Fields (all overridable from the command line, e.g. `--config.data.source=jsonl:/data/pairs.jsonl`):
  source           synthetic | jsonl:PATH | qwen_finetune_json:PATH | tfds:NAME | array_record:PATH
  task             synthetic task for stages 1 and 3 ('' = caption for stage 1, chat for stage 3)
  image_root       folder that relative image paths are resolved against ('' = the source file's folder)
  data_dir         TFDS data_dir for tfds:NAME ('' = TFDS default)
  split            TFDS split
  mixture          stage 2: task -> weight (the paper's seven tasks; 0 drops a task; empty = read `source` alone)
  mixture_sources  stage 2: task -> source spec; '' reads `source`, which must then be synthetic
  packing          several examples per row (True) or one example right-padded per row (False)
  packing_bins     rows filled at the same time by first-fit packing (more bins, fuller rows)
  truncate         cut over-long examples at seq_len like finetune.py (never inside an image span) instead of
                   skipping them as bad records
  strict           a bad record ends the run (True) or is skipped and counted with a warning (False)
  max_consecutive_skips  this many bad records in a row end the run even when not strict (0 = never)
  num_workers      grain worker processes per host (0 = read in the training process)
  read_threads     threads per worker (or in the training process) reading and decoding records
  shuffle          shuffle the records of each source (per epoch)
  num_epochs       passes over each source (0 = forever); a finite stage-2 mixture ends when its first source
                   runs out (grain's MapDataset.mix)
  seed             shuffle seed and synthetic-dataset seed
  synthetic_max_shapes  shapes per synthetic scene are drawn from 1..this (3; 1 = one shape, an easy curriculum)
  system           the ChatML system prompt of stage 3
"""
import ml_collections

from qwenvl_jax.data.encode import DEFAULT_SYSTEM

# Stage-2 sample counts in millions (RECIPES §3.3), used as default mixture weights:
# captioning, VQA, grounding, referring grounding, grounded captioning, OCR, pure text.
STAGE2_MIXTURE = {
    "caption": 19.7, "vqa": 3.6, "grounding": 3.5, "ref": 8.7, "grounded_caption": 8.7, "ocr": 24.8, "text": 7.8,
}


def default_data_config(stage: int) -> ml_collections.ConfigDict:
  """The data config of `stage` (1, 2 or 3) with the paper's defaults and the synthetic source."""
  if stage not in (1, 2, 3):
    raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
  c = ml_collections.ConfigDict()
  c.source = "synthetic"
  c.task = ""
  c.image_root = ""
  c.data_dir = ""
  c.split = "train"
  c.mixture = ml_collections.ConfigDict(dict(STAGE2_MIXTURE) if stage == 2 else {})
  # Every task has a (possibly empty) entry so that `--config.data.mixture_sources.vqa=...` works on a locked config.
  c.mixture_sources = ml_collections.ConfigDict({t: "" for t in STAGE2_MIXTURE} if stage == 2 else {})
  # The paper packs stages 1-2; the official fine-tuning script pads every sample to the full length (stage 3).
  c.packing = stage != 3
  c.packing_bins = 8
  c.truncate = False
  c.strict = False
  c.max_consecutive_skips = 1000
  c.num_workers = 2
  c.read_threads = 2
  c.shuffle = True
  c.num_epochs = 0
  c.seed = 0
  c.synthetic_max_shapes = 3
  c.system = DEFAULT_SYSTEM
  return c
