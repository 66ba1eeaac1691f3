"""Decode speed and memory of int8 / int4 weights and the int8 KV cache against bf16, on CPU or a GPU.

  python bench/bench_quantized_decode.py --preset=tiny
  python bench/bench_quantized_decode.py --preset=100m --batch=4 --new_tokens=32
  python bench/bench_quantized_decode.py --preset=qwen_vl_7b --batch=4 --prompt_len=1024 --platform=gpu   # a GPU host

Each configuration runs in its own process, so the GPU's `peak_bytes_in_use` is that configuration's alone:
  1. (CPU) random weights of the preset saved as a bf16 params checkpoint, and int8 / int4 checkpoints made from it
     by the same code as `convert --mode=quantize`;
  2. per configuration, on `--platform`: load the checkpoint as `generate` does (quantized ones load as stored:
     no float copy ever reaches the device), greedy-generate `--new_tokens` after a `--prompt_len` prompt.
Reported per configuration: weight bytes, the compiled decode step's argument and temporary bytes
(`memory_analysis`), the device's peak bytes in use (GPU; CPU has none), decode tokens/s =
batch x (new - 1) / (time(new) - time(1)) (best of `--repeats`, compile excluded), and the share of greedy tokens
equal to bf16's (random weights: near-flat logits, so this is a smoke check, not the accuracy test — that is
tests/inference/test_quantized.py on a trained model). Ratios are against bf16 weights with a bf16 cache.

Presets: tiny, 100m (a ~105M-parameter decoder: width 768, 8 layers, 32k vocabulary, tiny ViT), mid, qwen_vl_7b.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = (("bf16", "bf16"), ("int8", "bf16"), ("int4", "bf16"), ("int8", "int8"))


def model_config(preset: str):
  from qwenvl_jax.model import config as mc  # pylint: disable=import-outside-toplevel
  if preset == "100m":
    tiny = mc.tiny()
    return dataclasses.replace(tiny, llm=mc.LLMConfig(vocab_size=32000, width=768, layers=8, heads=12, head_dim=64,
                                                      mlp_dim=2048, seq_length=2048),
                               dtype="bfloat16", param_dtype="bfloat16", remat_policy="none")
  return mc.get_preset(preset, dtype="bfloat16", param_dtype="bfloat16", remat_policy="none")


def prepare(args, root: pathlib.Path) -> None:
  """Writes root/bf16 (random weights) and root/int8, root/int4 (quantized from it)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.checkpoint import save_params  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.inference import loading, quantized  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.model import QwenVL  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.model import quantize as qlib  # pylint: disable=import-outside-toplevel
  cfg = model_config(args.preset)
  save_params(root / "bf16", nnx.to_pure_dict(nnx.state(QwenVL(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
  mesh, rules = loading.inference_mesh()
  for mode in ("int8", "int4"):
    qcfg = qlib.QuantConfig(mode=mode, group_size=args.group_size)
    model = quantized.quantize_checkpoint_on_load(str(root / "bf16"), cfg, qcfg, mesh, rules)
    quantized.save_quantized(model, root / mode, qcfg)


def run_one(args, root: pathlib.Path, weights: str, kv: str) -> dict:
  """Loads one checkpoint on this process's platform and measures decoding."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.inference import decode, loading  # pylint: disable=import-outside-toplevel
  cfg = model_config(args.preset)
  mesh, rules = loading.inference_mesh()
  model = loading.load_model(cfg, str(root / weights), mesh, rules)
  gen = decode.Generator(model, kv_cache_dtype="int8" if kv == "int8" else None)
  rng = np.random.default_rng(0)
  prompts = rng.integers(8, cfg.llm.vocab_size - 1, (args.batch, args.prompt_len)).astype(np.int32)
  batch = decode.make_prompt_batch(list(prompts), pad_id=0, image_pad_id=cfg.image_pad_id,
                                   image_tokens=cfg.image_tokens, buckets=(args.prompt_len,))
  eos = cfg.llm.vocab_size - 1

  def make(n):
    g = decode.GenerationConfig(max_new_tokens=n, min_new_tokens=n, eos_id=eos, pad_id=0, logn=False,
                                dynamic_ntk=False)
    return lambda: gen.generate(batch, g)

  tokens = make(args.new_tokens)()
  make(1)()

  def best(fn):
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return min(times)

  t_n, t_1 = best(make(args.new_tokens)), best(make(1))
  graphdef, state = nnx.split(model)
  cache = model.llm.init_cache(args.batch, args.prompt_len + args.new_tokens,
                               dtype=jnp.int8 if kv == "int8" else None)
  step = jax.jit(decode.decode_step, static_argnums=0, donate_argnums=4)
  mem = step.lower(graphdef, state, jnp.zeros(args.batch, jnp.int32), jnp.zeros(args.batch, jnp.int32), cache, 1,
                   rope_base=jnp.full(args.batch, 1e4, jnp.float32)).compile().memory_analysis()
  stats = jax.devices()[0].memory_stats() or {}
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return {"weights": weights, "kv": kv, "platform": jax.devices()[0].platform,
          "weight_bytes": int(sum(x.size * (0.5 if x.dtype == jnp.int4 else x.dtype.itemsize) for x in leaves)),
          "step_args": int(mem.argument_size_in_bytes), "step_temps": int(mem.temp_size_in_bytes),
          "peak_bytes": stats.get("peak_bytes_in_use"),
          "tokens_per_s": _decode_rate(args.batch * (args.new_tokens - 1), t_n, t_1), "tokens": tokens.tolist()}


def _decode_rate(tokens: int, t_n: float, t_1: float) -> float:
  """Tokens per second of the decode steps alone (whole run minus prefill + one token); NaN (printed as nan) when
  noise makes the difference non-positive, as it can with very few new tokens, instead of a 1e9-sized figure."""
  return tokens / (t_n - t_1) if t_n > t_1 else float("nan")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="tiny", choices=["tiny", "100m", "mid", "qwen_vl_7b"])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--new_tokens", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--group_size", type=int, default=128)
  ap.add_argument("--platform", default="cpu", help="JAX platform of the measured runs (cpu, gpu, tpu)")
  ap.add_argument("--_child", nargs=3, metavar=("ROOT", "WEIGHTS", "KV"), help=argparse.SUPPRESS)
  ap.add_argument("--_prepare", metavar="ROOT", help=argparse.SUPPRESS)
  args = ap.parse_args()
  sys.path.insert(0, str(REPO))
  if args._prepare:
    prepare(args, pathlib.Path(args._prepare))
    return
  if args._child:
    root, weights, kv = args._child
    print(json.dumps(run_one(args, pathlib.Path(root), weights, kv)))
    return

  common = [f"--preset={args.preset}", f"--batch={args.batch}", f"--prompt_len={args.prompt_len}",
            f"--new_tokens={args.new_tokens}", f"--repeats={args.repeats}", f"--group_size={args.group_size}"]
  with tempfile.TemporaryDirectory() as tmp:
    # The caller's PYTHONPATH stays behind ours: on a lent GPU machine the packages we carry are found only there.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    subprocess.run([sys.executable, __file__, *common, f"--_prepare={tmp}"], check=True,
                   env=dict(env, JAX_PLATFORMS="cpu"))
    results = []
    for weights, kv in CONFIGS:
      out = subprocess.run([sys.executable, __file__, *common, "--_child", tmp, weights, kv], check=False,
                           env=dict(env, JAX_PLATFORMS=args.platform), capture_output=True, text=True)
      if out.returncode:
        raise SystemExit(f"error: the {weights} weights / {kv} cache run failed (exit {out.returncode}):\n"
                         f"{out.stderr[-3000:]}")
      results.append(json.loads(out.stdout.strip().splitlines()[-1]))
  base = results[0]
  print(f"preset={args.preset} batch={args.batch} prompt={args.prompt_len} new={args.new_tokens} "
        f"platform={base['platform']} (timings on a shared machine are noisy)")
  print(f"{'weights':8s}{'kv':6s}{'weights MiB':>12s}{'step args MiB':>15s}{'step temps MiB':>16s}"
        f"{'peak MiB':>10s}{'tokens/s':>10s}{'vs bf16':>9s}{'same tokens':>13s}")
  for r in results:
    same = sum(a == b for ra, rb in zip(r["tokens"], base["tokens"]) for a, b in zip(ra, rb)) / (
        len(base["tokens"]) * len(base["tokens"][0]))
    peak = f"{r['peak_bytes'] / 2**20:10.1f}" if r["peak_bytes"] else f"{'n/a':>10s}"
    print(f"{r['weights']:8s}{r['kv']:6s}{r['weight_bytes'] / 2**20:12.2f}{r['step_args'] / 2**20:15.2f}"
          f"{r['step_temps'] / 2**20:16.2f}{peak}{r['tokens_per_s']:10.1f}"
          f"{r['tokens_per_s'] / base['tokens_per_s']:9.2f}{same:13.1%}")


if __name__ == "__main__":
  main()
