"""Step time and memory of full / LoRA / QLoRA stage-3 fine-tuning, side by side, on the local devices.

  python bench/bench_peft_step.py                                   # tiny and small (~112M) on CPU
  python bench/bench_peft_step.py --presets=small --modes=full,lora --rank=64 --seq_len=512
  python bench/bench_peft_step.py --presets=small --platform=gpu    # the same on a GPU (device peak bytes too)

Each mode is the trainer's own stage-3 step (`training.setup.build_step`) of `configs/stage3.py:model=P`:
  * full   every stage-3 parameter trained, float32 weights and AdamW state (the ViT, ln_post and proj frozen);
  * lora   `lora=R`: the bf16 frozen base, float32 adapters on the official targets, AdamW for the adapters only;
  * qlora  `lora=R` with `config.lora.base_quantize=nf4` (the LLM blocks' projections as 4-bit codes); skipped with
           a message when this checkout's config has no `lora.base_quantize` (QLoRA not built in).
Every mode computes in float32 on CPU (XLA:CPU emulates bf16 matmuls) and in bf16 elsewhere, without remat.

Memory per mode: the train state actually held (parameters by dtype + optimizer state, from the arrays) and the
compiler's figure for the jitted step (`memory_analysis()`: arguments + outputs - aliased + temporaries), plus the
device's peak bytes in use where the backend reports it (GPU/TPU). Time: the median of --iters steps after
compilation, the modes interleaved (one step of each in turn) so machine load hits all alike. The last columns are
ratios to the full fine-tuning row of the same preset.
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # so a GPU's peak is what the steps need

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from qwenvl_jax import sharding  # pylint: disable=wrong-import-position
from qwenvl_jax.model import config as model_config  # pylint: disable=wrong-import-position
from qwenvl_jax.training import peft  # pylint: disable=wrong-import-position
from qwenvl_jax.training.optimizer import make_is_frozen, path_str  # pylint: disable=wrong-import-position
from qwenvl_jax.training.setup import build_step  # pylint: disable=wrong-import-position
from qwenvl_jax.training.stage_config import stage_config  # pylint: disable=wrong-import-position
from qwenvl_jax.training.step import TrainState  # pylint: disable=wrong-import-position

MODES = ("full", "lora", "qlora")
MIB = 1024**2


def mode_config(preset: str, mode: str, args):
  """The stage-3 experiment config of `mode`, or a reason string when this checkout cannot run it."""
  config = stage_config(3, f"model={preset},lora={0 if mode == 'full' else args.rank}")
  if mode == "qlora":
    if "base_quantize" not in config.lora:
      return "QLoRA is not in this checkout (no config.lora.base_quantize)"
    config.lora.base_quantize = args.qlora_quantize
  cpu = jax.default_backend() == "cpu"
  config.model_dtype = "float32" if cpu else "bfloat16"
  config.remat = "none"
  config.batch_size, config.accum_steps = args.batch, 1
  config.seq_len, config.max_images, config.res = args.seq_len, args.images, args.res
  config.optimizer.warmup_steps = 0
  return config


def leaf_bytes(x) -> float:
  """Bytes of one array; 4-bit codes count half a byte (numpy's itemsize says 1)."""
  return int(x.size) * (0.5 if x.dtype.name in ("int4", "uint4") else x.dtype.itemsize)


def nbytes(tree) -> float:
  return sum(leaf_bytes(x) for x in jax.tree.leaves(tree))


def by_dtype(tree) -> str:
  out = {}
  for x in jax.tree.leaves(tree):
    out[str(x.dtype)] = out.get(str(x.dtype), 0) + leaf_bytes(x)
  return " ".join(f"{k}:{v / MIB:.1f}" for k, v in sorted(out.items()))


def build(preset: str, mode: str, config, mesh, rules):
  """(jitted step, state, batch, facts) of one mode."""
  cfg = model_config.get_preset(preset, dtype=config.model_dtype, param_dtype=config.param_dtype,
                                remat_policy=config.remat, attention_impl=config.attention_impl)
  cfg = cfg.with_image_size(config.res)
  setup = build_step(config, cfg, mesh, rules)
  params = nnx.to_pure_dict(nnx.state(sharding.init_sharded(peft.model_fn(cfg, config), mesh, rules)))
  opt = jax.jit(setup.tx.init, out_shardings=setup.opt_shardings)(params)
  state = TrainState(jax.device_put(jnp.int32(0), setup.replicated), params, opt)
  b, t, m, s = config.batch_size, config.seq_len, config.max_images, cfg.vision.image_size
  rng = np.random.default_rng(0)
  ids = rng.integers(0, min(cfg.llm.vocab_size, 1000), (b, t + 1)).astype(np.int32)
  batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((b, t), np.float32),
           "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
           "images": rng.integers(0, 256, (b, m, s, s, 3)).astype(np.uint8), "image_mask": np.ones((b, m), bool)}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
  with sharding.use_rules(mesh, rules):
    jitted = jax.jit(setup.step_fn, in_shardings=(setup.shardings, sharding.batch_sharding(mesh, rules)),
                     out_shardings=(setup.shardings, setup.replicated), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  # The steps run through `jitted` (compiled again on first call, in the warm-up round): calling the AOT executable
  # directly fails for QLoRA's int4 codes (jax 0.10.2 wants a packed sub-byte layout the arrays do not carry).
  step_bytes = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                         - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  is_frozen = make_is_frozen(setup.frozen)
  trained = sum(int(x.size) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                if not is_frozen(path_str(p)))
  facts = {"params_bytes": nbytes(params), "params_by_dtype": by_dtype(params), "opt_bytes": nbytes(opt),
           "step_bytes": step_bytes, "temp_bytes": None if mem is None else mem.temp_size_in_bytes,
           "compile_s": compile_s, "trained": trained, "total": sum(int(x.size) for x in jax.tree.leaves(params))}
  return jitted, state, batch, facts


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="tiny,small")
  parser.add_argument("--modes", default="full,lora,qlora", help=f"comma-separated of {', '.join(MODES)}")
  parser.add_argument("--rank", type=int, default=16, help="LoRA / QLoRA rank")
  parser.add_argument("--qlora_quantize", default="nf4", help="QLoRA base codes: nf4, int4 or int8")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--images", type=int, default=1)
  parser.add_argument("--res", type=int, default=224)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--platform", default="", help="'' = JAX's default backend; cpu, gpu or tpu")
  args = parser.parse_args()
  if args.platform:
    jax.config.update("jax_platforms", args.platform)
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  for m in modes:
    if m not in MODES:
      print(f"skipping unknown mode {m!r} (known: {', '.join(MODES)})", flush=True)
  modes = [m for m in modes if m in MODES]
  mesh = sharding.make_mesh({"fsdp": -1})
  rules = sharding.load_rules("fsdp")
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"{jax.device_count()} {jax.default_backend()} device(s); batch {args.batch} x {args.seq_len} tokens, "
        f"{args.images} image(s) at {args.res} px; LoRA rank {args.rank}; load average {load:.1f} "
        "(timings on a shared machine are noisy)", flush=True)
  header = (f"{'preset':<7}{'mode':<7}{'trained':>13}{'params MiB':>12}{'opt MiB':>10}{'step MiB':>10}"
            f"{'peak MiB':>10}{'ms/step':>10}{'mem/full':>10}{'time/full':>10}  params by dtype (MiB)")
  rows = []
  for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
    built = {}
    for mode in modes:
      config = mode_config(preset, mode, args)
      if isinstance(config, str):
        print(f"skipping {preset} {mode}: {config}", flush=True)
        continue
      built[mode] = build(preset, mode, config, mesh, rules)
      print(f"  {preset} {mode}: compiled in {built[mode][3]['compile_s']:.1f} s", flush=True)
    times = {m: [] for m in built}
    states = {m: b[1] for m, b in built.items()}
    for i in range(args.iters + 1):  # the first round warms up (allocations, caches) and is not counted
      for mode, (step, _, batch, _) in built.items():
        start = time.perf_counter()
        with sharding.use_rules(mesh, rules):
          states[mode], metrics = step(states[mode], batch)
        jax.block_until_ready(metrics["loss"])
        if i:
          times[mode].append(time.perf_counter() - start)
    stats = jax.devices()[0].memory_stats() or {}
    for mode, (_, _, _, f) in built.items():
      rows.append((preset, mode, f, statistics.median(times[mode]), stats.get("peak_bytes_in_use")))
  print(header)
  full = {r[0]: r for r in rows if r[1] == "full"}
  for preset, mode, f, seconds, peak in rows:
    ref = full.get(preset)
    mem = f["step_bytes"] if f["step_bytes"] is not None else f["params_bytes"] + f["opt_bytes"]
    ref_mem = None if ref is None else (ref[2]["step_bytes"] if ref[2]["step_bytes"] is not None
                                        else ref[2]["params_bytes"] + ref[2]["opt_bytes"])
    mem_ratio = f"{mem / ref_mem:.2f}" if ref_mem else "n/a"
    time_ratio = f"{seconds / ref[3]:.2f}" if ref else "n/a"
    step_mib = "n/a" if f["step_bytes"] is None else f"{f['step_bytes'] / MIB:.1f}"
    peak_mib = "n/a" if peak is None else f"{peak / MIB:.0f}"
    print(f"{preset:<7}{mode:<7}{f['trained']:>13,}{f['params_bytes'] / MIB:>12.1f}{f['opt_bytes'] / MIB:>10.1f}"
          f"{step_mib:>10}{peak_mib:>10}{seconds * 1e3:>10.1f}{mem_ratio:>10}{time_ratio:>10}  "
          f"{f['params_by_dtype']}")
  print("step MiB = the compiled step's arguments + outputs - aliased + temporaries; peak = the device's peak bytes "
        "in use over the whole run (GPU/TPU only)")


if __name__ == "__main__":
  main()
