"""Train the tiny model briefly on the synthetic data, then score it with the real evaluation job vs chance.

  JAX_PLATFORMS=cpu python bench/bench_synthetic_eval.py --tasks=caption,grounding --steps=2000
  JAX_PLATFORMS=cpu python bench/bench_synthetic_eval.py --tasks=grounding --max_shapes=1 --steps=2000 \\
      --lr=1e-3 --seed=1

Runs `qwenvl_jax.training.train` on the stage-2 demo config (synthetic mixture restricted to `--tasks`), writes
held-out sets (`evaluation.synthetic_sets`, seed 12345; training uses seed 0) and evaluates every `--eval_every`
steps' checkpoint with `evaluation.runner.run`: captioning as `flickr` (CIDEr), grounding as `refcoco_val`
(accuracy at IoU >= 0.5). Chance is printed next to each: the same job on random weights, and the best
image-independent answer (`synthetic_sets.caption_chance_level`: the caption chosen on a separate set;
`synthetic_sets.grounding_chance_level`: the best box in hindsight). Prints one line per
(step, task) and the training wall time.

`--max_shapes=1` draws scenes with a single shape (the model must only find where it is), an easier curriculum
than the dataset's 1-3 shapes.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import tempfile
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from qwenvl_jax.evaluation import config as eval_config  # noqa: E402
from qwenvl_jax.evaluation import runner, synthetic_sets  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
EVAL_TASK = {"caption": "flickr", "grounding": "refcoco_val"}


def stage2_config(args, workdir: pathlib.Path):
  spec = importlib.util.spec_from_file_location("stage2_config", REPO / "configs" / "stage2.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.workdir = str(workdir)
  c.update(dict(res=args.res, batch_size=args.batch, seq_len=args.seq_len, max_images=2, total_steps=args.steps,
                log_every=max(1, args.steps // 10), progress_bar=False, tensorboard=False,
                synthetic_vocab_size=400))
  c.checkpoint.every = args.eval_every
  c.checkpoint.keep = args.steps // args.eval_every + 1
  c.optimizer.warmup_steps = min(20, args.steps // 10)
  c.optimizer.lr = args.lr
  c.data.num_workers = 0
  c.data.synthetic_max_shapes = args.max_shapes
  c.seed = args.seed
  tasks = args.tasks.split(",")
  for task in c.data.mixture:
    c.data.mixture[task] = 1.0 if task in tasks else 0.0
  return c


def evaluate(task: str, data: str, root: pathlib.Path, run: pathlib.Path, checkpoint: str, name: str, res: int):
  c = eval_config.default_config(EVAL_TASK[task])
  c.update(dict(output=str(root / f"{task}_{name}.json"), data_path=data, image_root=str(root), model="tiny",
                tokenizer=str(run / "tokenizer.model"), checkpoint=checkpoint, image_size=res, dtype="float32",
                per_device_batch_size=2, progress=False))
  return runner.run(c)["score"]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tasks", default="caption,grounding")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--eval_every", type=int, default=0, help="0: only the last step")
  parser.add_argument("--res", type=int, default=56)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=64)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--max_shapes", type=int, default=3)
  parser.add_argument("--num_eval", type=int, default=48)
  parser.add_argument("--seed", type=int, default=0, help="model initialization seed (config.seed)")
  parser.add_argument("--workdir", default="", help="default: a fresh temporary folder")
  args = parser.parse_args()
  args.eval_every = args.eval_every or args.steps
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="synthetic_eval_"))
  run = root / "run"
  from qwenvl_jax.training import train  # pylint: disable=import-outside-toplevel
  started = time.time()
  result = train(stage2_config(args, run))
  print(f"trained {result.step} steps in {time.time() - started:.0f} s ({result.status}); workdir {root}")
  sets = {}
  for task in args.tasks.split(","):
    write = synthetic_sets.write_caption_set if task == "caption" else synthetic_sets.write_grounding_set
    sets[task] = write(root / f"eval_{task}", n=args.num_eval, image_size=args.res,
                       max_shapes=args.max_shapes)
  for task, data in sets.items():
    chance = evaluate(task, data, root / f"eval_{task}", run, "", "random", args.res)
    line = f"{task:10s} random weights {chance:.3f}"
    if task == "caption":
      constant, caption = synthetic_sets.caption_chance_level(data, root / "selection", image_size=args.res,
                                                              max_shapes=args.max_shapes)
      line += f", best constant caption {constant:.3f} {caption!r}"
    if task == "grounding":
      constant, box = synthetic_sets.grounding_chance_level(data)
      line += f", best constant box {constant:.3f} {tuple(round(v, 2) for v in box)}"
    print(line)
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
      score = evaluate(task, data, root / f"eval_{task}", run, str(run / "checkpoints" / str(step) / "params"),
                       f"step{step}", args.res)
      print(f"{task:10s} step {step:6d}: {score:.3f}")


if __name__ == "__main__":
  main()
