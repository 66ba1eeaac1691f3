"""The `ml_collections.ConfigDict` of an evaluation run (what `configs/eval/<task>.py` return) and its defaults."""

from __future__ import annotations

import ml_collections

from qwenvl_jax import config_args, distributed
from qwenvl_jax.evaluation import tasks as tasks_lib
from qwenvl_jax.inference import decode


def default_config(task_name: str, arg: str | None = None):
  """The `ml_collections.ConfigDict` of an evaluation run of `task_name` (used by `configs/eval/*.py`).

  `arg` is `key=value,key=value` overriding top-level fields (`--config=configs/eval/flickr.py:max_examples=50`);
  any field can also be set with `--config.FIELD=...`.
  """
  task = tasks_lib.get_task(task_name)
  c = ml_collections.ConfigDict()
  c.task = task.name
  c.output = ""                         # results JSON, a local (or mounted) path (required; never overwritten;
                                        # `OUTPUT.partial/` resumes)
  c.data_path = task.data_file          # the official file (RECIPES §2.10), any file of its format, or a prepared
                                        # TFDS dataset: tfds:NAME[/CONFIG][:VERSION][:SPLIT] or
                                        # array_record:FOLDER[:SPLIT] (split default `test`; the task kind's
                                        # schemas: evaluation/tfds_readers.py)
  c.tfds_data_dir = ""                  # TFDS data_dir of tfds: specs ("" = TFDS's default); never downloads
  c.annotation_path = task.annotation_file or ""   # VQA accuracy: the official annotation JSON ("" with a TFDS
                                        # dataset whose `answers` are the human answers)
  c.image_root = ""                     # relative image paths of the data file are taken under this folder
                                        # ("" = the current folder, not the data file's)
  c.checkpoint = ""                     # a training run, <run>/checkpoints/<step>, or a params checkpoint
                                        # directory ("" = random weights, for smoke tests)
  c.model = ""                          # architecture preset ("" = the run's, else qwen_vl_7b)
  c.tokenizer = ""                      # tokenizer spec (text.load_tokenizer): qwen:PATH, sentencepiece:PATH, or a
                                        # .tiktoken / .model file ("" = the run's)
  c.dtype = "bfloat16"
  c.quantize = "none"                   # weight-only quantization at load: none | int8 (per channel) | int4 (groups)
  c.quantize_group_size = 128           # int4 group size (a power of two >= 1)
  c.kv_cache_dtype = "auto"             # auto (the compute dtype) | int8
  c.attention = "xla"                   # xla (the reference's numerics) | splash (TPU kernel for the image encoder
                                        # and the prefill: less memory, other low bits; inference/loading.py)
  c.image_size = ml_collections.config_dict.placeholder(int)   # override the resolution (unset or 0 = the
                                        # checkpoint's, else the preset's; the results record the one used)
  c.per_device_batch_size = 4
  c.rules = "inference_tp"              # sharding rule table (qwenvl_jax/sharding_rules.py); "fsdp" = as training
  c.tensor_parallel = 0                 # chips per model replica (0 = one host's; inference/layout.py)
  c.mesh = ml_collections.ConfigDict({"data": 0, "fsdp": 0, "tensor": 0})   # explicit ICI degrees of the
                                        # (data, fsdp, tensor) mesh instead (0 = not given; one may be -1)
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
