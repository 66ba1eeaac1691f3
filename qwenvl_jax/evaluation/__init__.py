"""Evaluation of Qwen-VL as the official `eval_mm` scripts do it (RECIPES §2): metrics, tasks, data, results.

Modules:
  tasks            the registry (`get_task`, `TASKS`): official prompt, decoding lengths, reader and metric
  readers          the official JSONL/JSON formats -> `EvalExample`s, with line-and-field errors
  tfds_readers     prepared TFDS datasets (`tfds:NAME[/CONFIG][:VERSION][:SPLIT]`, `array_record:FOLDER`) -> examples
  few_shot         few-shot prompts: the shot pool, shots drawn per query from (seed, id), never the query
  results          sharding, per-process resume ledgers, merge on process 0, the never-overwritten JSON
  output_lock      one job per results file: an OS lock on its ledger folder, refusing a second job
  cider            CIDEr-D as pycocoevalcap (with `ptb_tokenizer`, its caption normalisation in Python)
  vqa              VQA accuracy with the official answer normalization, GQA cleanup, exact match
  anls             DocVQA ANLS (tau 0.5)
  relaxed          ChartQA relaxed accuracy (with the reference's argument swap)
  grounding        first-box parsing, /999 scaling, float32 IoU, Precision@1 at IoU >= 0.5
  multiple_choice  likelihood ranking: option texts, `choose_option`, accuracy (scores: `inference.scoring`)
  config           the run's ConfigDict (`default_config`, what `configs/eval/<task>.py` return)
  prompts          what the model is shown: raw prompt (with shots), ids, preprocessed images
  job              the model side of a run: load, batch, generate or score options
  collectives      the multi-process helpers of the job (no-ops with one process)
  runner           `run(config)`: shard, resume, batch loop, merge and write the results

The metrics, tasks, readers and results are plain Python/numpy and need no model.
"""
from qwenvl_jax.evaluation.readers import EvalDataError, EvalExample, resolve_images
from qwenvl_jax.evaluation.results import (PredictionLedger, check_output_free, finalize, partial_dir,
                                           read_ledgers, shard, write_results)
from qwenvl_jax.evaluation.tasks import TASKS, EvalTask, get_task

__all__ = [
    "EvalDataError", "EvalExample", "EvalTask", "PredictionLedger", "TASKS", "check_output_free", "finalize",
    "get_task", "partial_dir", "read_ledgers", "resolve_images", "shard", "write_results",
]
