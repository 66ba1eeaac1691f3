"""Trains one stage of Qwen-VL: `python -m qwenvl_jax.train --config=configs/stage2.py[:model=...,res=...]`.

Flags:
  --config   an experiment config file (`configs/stage{1,2,3}.py`) with its arg string; override any field with
             `--config.<field>=value`, e.g. `--config.optimizer.lr=1e-4 --config.total_steps=1000`.
  --workdir  where checkpoints, metrics and TensorBoard events go (default `config.workdir`, else ./runs/stageN).

`--config.eval_every=N` scores `config.eval` (a task of configs/eval/, default a synthetic held-out caption set)
every N steps with the eval job's code; the scores go to metrics.jsonl and TensorBoard (eval/<task>/<metric>).

The same command resumes a run from its latest checkpoint; see `qwenvl_jax/training/trainer.py`.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from qwenvl_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/stageN.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (overrides config.workdir).")
flags.mark_flag_as_required("config")

# Exit status of a run stopped by SIGTERM/SIGINT after its checkpoint (128 + SIGTERM), so schedulers retry it.
PREEMPTED_EXIT_CODE = 143


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every save step at INFO; the loop prints what a user needs.
    logging.set_verbosity(logging.WARNING)
  # pylint: disable-next=g-import-not-at-top  (after flags: JAX reads them)
  from qwenvl_jax.training import train, validation
  config = _CONFIG.value
  # A config file of the wrong kind (configs/eval/*.py) or with a misspelt field of its own (`c.totl_steps = 5`):
  # refused naming the file, as a misspelt --config. override is.
  config_file = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")[0]  # without its arg string
  validation.check_is_training_config(config, source=config_file)
  if _WORKDIR.value:
    with config.unlocked():
      config.workdir = _WORKDIR.value
  # Joined first (train's own call is then a no-op): a host whose evaluation data fails its checks below would
  # otherwise leave before joining, and the others would report only that not every process joined.
  from qwenvl_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(config.distributed)
  distributed.check_same_config(config)  # differing eval flags are named before any host checks its eval data
  eval_fn = None
  if config.get("eval_every", 0):
    # The entry point sits above training and evaluation: it hands the trainer the eval job's code as a callback.
    from qwenvl_jax.evaluation import during_training  # pylint: disable=g-import-not-at-top
    eval_fn = during_training.TrainingEvaluator(config)
  elif "eval" in config:  # off: still refuse a misspelt task now rather than when a resumed run turns it on
    from qwenvl_jax.evaluation import during_training  # pylint: disable=g-import-not-at-top
    during_training.check_task(config.eval.task)
  try:
    result = train(config, eval_fn)
  finally:
    if eval_fn is not None:
      eval_fn.close()
  if result.status == "preempted":
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  cli.run(main, cpu_allocator=True)
