"""Run one official evaluation task: `python -m qwenvl_jax.evaluate --config=configs/eval/TASK.py`.

  python -m qwenvl_jax.evaluate --config=configs/eval/flickr.py --config.output=results/flickr.json \\
      --config.checkpoint=ckpt/params --config.image_root=data     # converted: the tokenizer it keeps

Shards the examples over all hosts and devices, generates greedily with the task's official prompt and lengths
(multiple choice: lowest option loss), and writes the score with every prediction to `config.output` (never
replacing it). A run that stopped resumes when started again with the same output; a second job started with an
output another one is writing is refused (`qwenvl_jax/evaluation/output_lock.py`). See
`qwenvl_jax/evaluation/runner.py`.
"""

from absl import app, logging
from ml_collections import config_flags

from qwenvl_jax import cli, errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/eval/TASK.py[:key=value,...]",
                                          lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise errors.ConfigError("--config is required: an evaluation config", hint="e.g. --config=configs/eval/flickr.py")
  if "task" not in _CONFIG.value:  # a training config: ml_collections' AttributeError "'task'" and a traceback
    kind = "a training config" if "stage" in _CONFIG.value else "no evaluation config"
    raise errors.ConfigError(f"--config is {kind} (it has no 'task'); evaluate takes an evaluation config",
                             hint="e.g. --config=configs/eval/flickr.py (the tasks: configs/eval/)")
  cli.quiet_libraries()  # orbax's restore lines and JAX's backend probe would bury the one result line
  from qwenvl_jax.evaluation import results, runner  # pylint: disable=import-outside-toplevel
  payload = runner.run(_CONFIG.value)
  if payload is not None:
    logging.info("%s: %s = %s (%d examples) -> %s", payload["task"], payload["metric"], payload["score"],
                 payload["num_examples"], _CONFIG.value.output)
    print(results.summary_line(payload, _CONFIG.value.output))


if __name__ == "__main__":
  cli.run(main)
