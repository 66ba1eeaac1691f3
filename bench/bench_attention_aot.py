"""Splash vs xla attention, compared by what the TPU compiler says (AOT for a topology; no TPU needed, libtpu is).

  python bench/bench_attention_aot.py                                   # stage-2 decoder, v5p:2x2x1, 2 rows/chip
  python bench/bench_attention_aot.py --part=attn_vit --impls=xla,splash,splash_nopad
  python bench/bench_attention_aot.py --part=decoder --layers=32 --topology=v5p:2x2x1 --tensor=2

Parts (forward + backward, summed to a scalar loss, per chip figures from `memory_analysis()`/`cost_analysis()`):

* `decoder`: the Qwen-7B decoder stack (`QwenLM`, width 4096, 32 heads x 128) on `--seq` tokens per row in
  packed rows (segment ids: two documents and right padding), `--layers` scanned layers with full remat as the
  stage configs use, vocabulary cut to `--vocab` (identical for both impls; the full one only adds logits);
* `attn_decoder`, `attn_vit`, `attn_resampler`: `dot_product_attention` alone at the stage-2 shapes: causal with
  segments over 2048 tokens (32 x 128), ViT-bigG over 1024 patches (16 heads x 104) and the resampler's
  256 queries x 1024 keys (32 x 128). `splash_nopad` hands head dim 104 to the kernel unpadded.

Parameters and batch are sharded as the trainer shards them (`fsdp` rules, `--tensor` > 1 adds `fsdp_tp`).
XLA counts no FLOPs for a Pallas custom call, so the splash rows' FLOPs leave attention out: the line
"attention matmul FLOPs" gives the analytic count (without causal skipping) to compare with. For `decoder`, XLA
counts the body of the scanned layer stack once, so its FLOPs and bytes are about one layer plus the head; the
temporaries are for the whole step (with full remat: the saved layer inputs plus one layer's backward).
"""
import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=wrong-import-position
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from qwenvl_jax import sharding  # noqa: E402
from qwenvl_jax.hardware import chips  # noqa: E402
from qwenvl_jax.model import attention, config as model_config, kernels  # noqa: E402
from qwenvl_jax.model.qwen import QwenLM  # noqa: E402
from qwenvl_jax.planning import aot, mesh as mesh_lib  # noqa: E402

# Stage-2 shapes: (queries, keys, heads, head dim, causal) of each attention call.
ATTN_SHAPES = {"attn_decoder": (2048, 2048, 32, 128, True), "attn_vit": (1024, 1024, 16, 104, False),
               "attn_resampler": (256, 1024, 32, 128, False)}


def packed_segments(rows: int, seq: int) -> np.ndarray:
  """int32[rows, seq]: documents of 3/8 and 1/2 of the row, then padding (segment 0)."""
  seg = np.zeros((rows, seq), np.int32)
  seg[:, :seq * 3 // 8] = 1
  seg[:, seq * 3 // 8:seq * 7 // 8] = 2
  return seg


def decoder_step(args, mesh, rules, impl):
  """(fn, abstract args) of loss(params) -> grads for the decoder stack."""
  base = model_config.qwen_vl_7b().llm
  llm = model_config.LLMConfig(vocab_size=args.vocab, width=base.width, layers=args.layers, heads=base.heads,
                               head_dim=base.head_dim, mlp_dim=base.mlp_dim)

  def make():
    return QwenLM(llm, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat_policy="full", impl=impl,
                  rngs=nnx.Rngs(0))

  graphdef, abstract_state = sharding.abstract_model(make)
  params = aot.abstract_like(nnx.to_pure_dict(abstract_state),
                             nnx.to_pure_dict(sharding.state_shardings(abstract_state, rules, mesh)))
  rows = args.rows_per_chip * sharding.batch_shards(mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules, 2)
  x = jax.ShapeDtypeStruct((rows, args.seq, llm.width), jnp.bfloat16, sharding=sharding.batch_sharding(mesh, rules, 3))
  seg = packed_segments(rows, args.seq)

  def step(state, x):
    segment_ids = jax.device_put(seg, batch_sharding)
    starts = np.argmax(seg[:, :, None] == seg[:, None, :], axis=-1)
    positions = jax.device_put((np.arange(args.seq)[None] - starts).astype(np.int32), batch_sharding)

    def loss(state):
      model = nnx.merge(graphdef, state)
      logits = model(x, positions=positions, segment_ids=segment_ids).logits
      return jnp.mean(jnp.square(logits.astype(jnp.float32)))

    return jax.grad(loss)(state)

  return step, (params, x)


def attn_step(args, mesh, impl):
  """(fn, abstract args) of the gradient of sum(attention(q, k, v)) at one stage-2 call shape."""
  t, s, n, h, causal = ATTN_SHAPES[args.part]
  rows = args.rows_per_chip * mesh.shape["data"] * mesh.shape["fsdp"]
  spec = PartitionSpec(("data", "fsdp"), None, "tensor" if mesh.shape["tensor"] > 1 else None, None)
  q = jax.ShapeDtypeStruct((rows, t, n, h), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
  kv = jax.ShapeDtypeStruct((rows, s, n, h), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
  seg = packed_segments(rows, t)

  def step(q, k, v):
    mask = None
    if causal:
      segments = jax.device_put(seg, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
      slots = jnp.arange(t, dtype=jnp.int32)
      mask = attention.segment_causal_mask(segments, segments, slots, slots)

    def loss(q, k, v):
      if impl == "splash_nopad":
        out = kernels.splash_attention(q, k, v, scale=h ** -0.5, causal=False, pad_head_dim=False)
      else:
        out = attention.dot_product_attention(q, k, v, mask=mask, scale=h ** -0.5, impl=impl)
      return jnp.sum(out.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  # Forward q.k and p.v, backward dp, dq, dk, dv: 6 matmuls of 2 t s h FLOPs per row and head, unmasked.
  flops = 12 * rows * n * t * s * h
  return step, (q, kv, kv), flops / mesh.devices.size


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--part", default="decoder", choices=["decoder", *ATTN_SHAPES])
  parser.add_argument("--topology", default="v5p:2x2x1")
  parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree (rest is fsdp)")
  parser.add_argument("--rows_per_chip", type=int, default=2)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=4096)
  parser.add_argument("--impls", default="xla,splash", help="comma-separated: xla, splash, splash_nopad")
  args = parser.parse_args()

  topology = chips.parse_topology(args.topology)
  devices = mesh_lib.topology_devices(topology)
  mesh = mesh_lib.build_mesh(devices, ici=(1, -1, args.tensor))
  rules = sharding.load_rules("fsdp_tp" if args.tensor > 1 else "fsdp")
  print(f"{topology.describe()}; mesh {dict(mesh.shape)}; part {args.part}, {args.rows_per_chip} rows/chip")
  for impl in args.impls.split(","):
    if args.part == "decoder":
      if impl == "splash_nopad":
        raise SystemExit("splash_nopad is for the attn_* parts (the decoder's head dim is 128 already)")
      fn, fn_args = decoder_step(args, mesh, rules, impl)
      attn_flops = None
    else:
      fn, fn_args, attn_flops = attn_step(args, mesh, impl)
    start = time.perf_counter()
    with sharding.use_rules(mesh, rules):
      compiled, plan = aot.compile_step(fn, fn_args, chip=topology.chip, mesh=mesh, count_program_flops=False)
    if compiled is None:
      print(f"{impl:13s} does not fit: {plan.compile_error[:200]}")
      continue
    kernels_in_hlo = compiled.as_text().count("tpu_custom_call")
    print(f"{impl:13s} temporaries {plan.temp_bytes / 2**30:7.3f} GiB  arguments {plan.argument_bytes / 2**30:6.3f} "
          f"GiB  flops {plan.flops / 1e9:9.2f} GFLOP  bytes {plan.bytes_accessed / 1e9:8.2f} GB  "
          f"optimal {plan.optimal_seconds * 1e3 if plan.optimal_seconds else float('nan'):8.3f} ms  "
          f"tpu_custom_calls {kernels_in_hlo}  compile {time.perf_counter() - start:5.1f} s")
    if attn_flops:
      print(f"{'':13s} attention matmul FLOPs, unmasked fwd+bwd (analytic, per chip): {attn_flops / 1e9:.2f} GFLOP")


if __name__ == "__main__":
  main()
