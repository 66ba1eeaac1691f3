"""Decode throughput of our jitted KV-cache generation vs transformers' `Qwen2ForCausalLM.generate`, same weights.

  JAX_PLATFORMS=cpu python bench/bench_decode.py --preset=tiny --batch=1 --prompt_len=32 --new_tokens=64
  JAX_PLATFORMS=cpu python bench/bench_decode.py --preset=mid --batch=1 --prompt_len=32 --new_tokens=8

Text path only (no image): the decoder of a preset with random weights, copied into a `Qwen2ForCausalLM` (the Qwen-7B
decoder is Qwen2's architecture with q/k/v biases and untied embeddings: `c_attn` -> q/k/v_proj, `w2` -> gate_proj
(SiLU), `w1` -> up_proj, `c_proj` -> down_proj). Both run greedy in float32 on this machine with the same prompts
and exactly `new_tokens` new tokens (min = max, so neither stops early). Decode speed is measured without the
prompt: tokens/s = batch * (new_tokens - 1) / (time(new_tokens) - time(1)), best of `--repeats` timed runs after a
warm-up (our compile time is excluded and printed separately). It also checks that both produce the same tokens.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runnable as python bench/X.py

from qwenvl_jax.inference import decode  # noqa: E402
from qwenvl_jax.model import QwenVL, get_preset  # noqa: E402


def to_qwen2(model: QwenVL) -> transformers.Qwen2ForCausalLM:
  """A Qwen2ForCausalLM holding the decoder weights of `model` (float32)."""
  c = model.cfg.llm
  hf_cfg = transformers.Qwen2Config(
      vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_dim, num_hidden_layers=c.layers,
      num_attention_heads=c.heads, num_key_value_heads=c.heads, head_dim=c.head_dim, rms_norm_eps=c.rms_eps,
      rope_theta=c.rope_base, max_position_embeddings=32768, tie_word_embeddings=False, use_sliding_window=False,
      attention_dropout=0.0)
  hf_cfg._attn_implementation = "sdpa"
  hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
  p = nnx.to_pure_dict(nnx.state(model.llm, nnx.Param))
  t = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32)))
  d, n, h = c.width, c.heads, c.head_dim
  sd = {"model.embed_tokens.weight": t(p["wte"]["embedding"]), "model.norm.weight": t(p["ln_f"]["scale"]),
        "lm_head.weight": t(np.asarray(p["lm_head"]["kernel"]).T)}
  b = p["blocks"]
  for i in range(c.layers):
    pre = f"model.layers.{i}."
    qkv = np.asarray(b["attn"]["qkv"]["kernel"][i])      # [D, 3, N, H], blocked q|k|v
    qkv_b = np.asarray(b["attn"]["qkv"]["bias"][i])      # [3, N, H]
    for j, name in enumerate(("q", "k", "v")):
      sd[pre + f"self_attn.{name}_proj.weight"] = t(qkv[:, j].reshape(d, n * h).T)
      sd[pre + f"self_attn.{name}_proj.bias"] = t(qkv_b[j].reshape(n * h))
    sd[pre + "self_attn.o_proj.weight"] = t(np.asarray(b["attn"]["out"]["kernel"][i]).reshape(n * h, d).T)
    sd[pre + "input_layernorm.weight"] = t(b["ln_1"]["scale"][i])
    sd[pre + "post_attention_layernorm.weight"] = t(b["ln_2"]["scale"][i])
    sd[pre + "mlp.gate_proj.weight"] = t(np.asarray(b["mlp"]["w2"]["kernel"][i]).T)  # SiLU branch
    sd[pre + "mlp.up_proj.weight"] = t(np.asarray(b["mlp"]["w1"]["kernel"][i]).T)    # linear branch
    sd[pre + "mlp.down_proj.weight"] = t(np.asarray(b["mlp"]["c_proj"]["kernel"][i]).T)
  missing, unexpected = hf.load_state_dict(sd, strict=False)
  if unexpected or [m for m in missing if "rotary" not in m]:
    raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
  return hf


def best_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="tiny", choices=["tiny", "mid", "qwen_vl_7b"])
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--new_tokens", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--torch_threads", type=int, default=0, help="0 = torch's default")
  args = ap.parse_args()
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)

  cfg = get_preset(args.preset, dtype="float32", param_dtype="float32", remat_policy="none")
  model = QwenVL(cfg, rngs=nnx.Rngs(0))
  hf = to_qwen2(model)
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, min(cfg.llm.vocab_size, 150000), (args.batch, args.prompt_len)).astype(np.int32)
  eos = cfg.llm.vocab_size - 1  # never forced: min_new_tokens = max_new_tokens

  gen = decode.Generator(model)
  batch = decode.make_prompt_batch(list(prompts), pad_id=0, image_pad_id=cfg.image_pad_id,
                                   image_tokens=cfg.image_tokens, buckets=(args.prompt_len,))

  def ours(n):
    g = decode.GenerationConfig(max_new_tokens=n, min_new_tokens=n, eos_id=eos, pad_id=0, logn=False,
                                dynamic_ntk=False)
    return lambda: gen.generate(batch, g)

  def theirs(n):
    ids = torch.from_numpy(prompts.astype(np.int64))
    def run():
      with torch.inference_mode():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=0)[:, args.prompt_len:]
    return run

  start = time.perf_counter()
  ours_tokens = ours(args.new_tokens)()
  ours(1)()
  compile_s = time.perf_counter() - start
  hf_tokens = theirs(args.new_tokens)().numpy()
  agree = float(np.mean(ours_tokens == hf_tokens))

  results = {}
  for name, make in (("ours (jax jit, while_loop)", ours), ("transformers Qwen2 generate", theirs)):
    t_n = best_time(make(args.new_tokens), args.repeats)
    t_1 = best_time(make(1), args.repeats)
    # NaN (printed as nan) when noise makes t_n <= t_1, as it can with very few new tokens
    results[name] = args.batch * (args.new_tokens - 1) / (t_n - t_1) if t_n > t_1 else float("nan")
    print(f"{name:30s} total {t_n:8.3f} s for {args.new_tokens} tokens, prefill+1 {t_1:7.3f} s, "
          f"decode {results[name]:9.1f} tokens/s")
  ratio = results["ours (jax jit, while_loop)"] / results["transformers Qwen2 generate"]
  print(f"preset={args.preset} batch={args.batch} prompt_len={args.prompt_len} new_tokens={args.new_tokens} "
        f"devices={jax.devices()[0].platform} torch_threads={torch.get_num_threads()}")
  print(f"our compile + first runs: {compile_s:.1f} s; greedy tokens identical to transformers: {agree:.1%}")
  print(f"decode speed ratio ours / transformers = {ratio:.2f}")


if __name__ == "__main__":
  main()
