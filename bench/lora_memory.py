"""Peak device memory and step time of a LoRA / full stage-3 train step on the local accelerator (prepared for a GPU).

  python bench/lora_memory.py --model=qwen_vl_7b --lora=64 --seq_len=2048 --batch=1        # LoRA, official targets
  python bench/lora_memory.py --model=qwen_vl_7b --lora=64 --base_quantize=nf4 --seq_len=2048 --batch=1  # QLoRA
  python bench/lora_memory.py --model=qwen_vl_7b --lora=0 --seq_len=2048 --batch=1         # full stage 3
  python bench/lora_memory.py --model=tiny --lora=8 --steps=3                              # CPU smoke run

Builds the trainer's own step (`training.setup.build_step`: bf16 frozen base + float32 adapters for a LoRA run,
chunked loss, remat as configured) on all local devices, initializes random weights directly in their shardings,
runs `--steps` steps on a synthetic batch and prints the device's peak bytes in use
(`device.memory_stats()['peak_bytes_in_use']`, GPU/TPU only; n/a on CPU) and the step time. Compare with the
planner's AOT figure (`python -m qwenvl_jax.plan --config=configs/stage3.py:model=qwen_vl_7b,lora=64
--topology=...`) and the official LoRA (Chat) 27.3 GB / Q-LoRA 19.3 GB at seq 2048 (RECIPES §1.4). The AOT
figures to compare with (README, "Memory of LoRA and full stage 3 at full size") are for 4 image slots at 448 px, as
here by default. On a GPU `--attention=cudnn` uses the fused kernel (the AOT plans use `xla` attention, which holds
the [heads, T, T] scores of one layer). Not run here: no GPU was lent.
"""
import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # so the GPU peak is what the step needs

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from qwenvl_jax import sharding  # pylint: disable=wrong-import-position
from qwenvl_jax.model import config as model_config  # pylint: disable=wrong-import-position
from qwenvl_jax.training import peft  # pylint: disable=wrong-import-position
from qwenvl_jax.training.setup import build_step  # pylint: disable=wrong-import-position
from qwenvl_jax.training.stage_config import stage_config  # pylint: disable=wrong-import-position
from qwenvl_jax.training.step import TrainState  # pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="tiny")
  parser.add_argument("--lora", type=int, default=64, help="LoRA rank; 0 = full stage-3 fine-tuning")
  parser.add_argument("--seq_len", type=int, default=0, help="0 = the stage's")
  parser.add_argument("--batch", type=int, default=0, help="global rows; 0 = one per device")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--base_quantize", default="", help="QLoRA: nf4, int4 or int8 codes for the base (needs LoRA)")
  parser.add_argument("--max_images", type=int, default=0, help="image slots per row; 0 = the stage's (4)")
  parser.add_argument("--attention", default="xla", help="xla, cudnn (GPU) or splash (TPU)")
  args = parser.parse_args()
  config = stage_config(3, f"model={args.model},lora={args.lora}")
  config.attention_impl = args.attention
  if args.max_images:
    config.max_images = args.max_images
  if args.base_quantize:
    if "base_quantize" not in config.lora:
      sys.exit("error: --base_quantize: this checkout has no QLoRA (config.lora.base_quantize)")
    config.lora.base_quantize = args.base_quantize
  n = jax.device_count()
  config.batch_size = args.batch or n
  config.accum_steps = 1
  if args.seq_len:
    config.seq_len = args.seq_len
  cfg = model_config.get_preset(config.model, dtype=config.model_dtype, param_dtype=config.param_dtype,
                                remat_policy=config.remat, attention_impl=config.attention_impl)
  cfg = cfg.with_image_size(config.res)
  mesh = sharding.make_mesh({"fsdp": -1})
  rules = sharding.load_rules(config.mesh.rules)
  setup = build_step(config, cfg, mesh, rules)
  params = nnx.to_pure_dict(nnx.state(sharding.init_sharded(peft.model_fn(cfg, config), mesh, rules)))
  opt = jax.jit(setup.tx.init, out_shardings=setup.opt_shardings)(params)
  state = TrainState(jax.device_put(jnp.int32(0), setup.replicated), params, opt)
  b, t, m, s = config.batch_size, config.seq_len, config.max_images, cfg.vision.image_size
  rng = np.random.default_rng(0)
  ids = rng.integers(0, min(cfg.llm.vocab_size, 1000), (b, t)).astype(np.int32)
  batch = {"input_ids": ids, "targets": ids, "loss_mask": np.ones((b, t), np.float32),
           "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
           "images": np.zeros((b, m, s, s, 3), np.uint8), "image_mask": np.zeros((b, m), bool)}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
  with sharding.use_rules(mesh, rules):
    # Shardings in and out as the trainer gives them: without them the state a step returns (its own layouts) is
    # not the one `init_sharded` made, and the second step compiles again (a second full-size compile on a GPU).
    step = jax.jit(setup.step_fn, in_shardings=(setup.shardings, sharding.batch_sharding(mesh, rules)),
                   out_shardings=(setup.shardings, setup.replicated), donate_argnums=(0,))
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - start)
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  mode = "full" if not args.lora else (f"QLoRA ({args.base_quantize}) r={args.lora}" if args.base_quantize
                                       else f"LoRA r={args.lora}")
  print(f"{args.model} stage 3 {mode}, {config.max_images} image slot(s) at {config.res} px: batch {b} x {t} on {n} "
        f"{jax.devices()[0].platform} device(s); loss {float(metrics['loss']):.3f}; step {min(times[1:] or times):.3f}"
        f" s (first, with compile: {times[0]:.1f} s); peak device memory "
        f"{'n/a' if peak is None else f'{peak / 1024**3:.2f} GiB'}")


if __name__ == "__main__":
  main()
