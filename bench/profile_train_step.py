"""Where the CPU train step spends its time: JAX (jax.profiler) vs PyTorch (torch.profiler), by op category.

For each batch in --batch it builds the two steps of `bench_train_step.py` (same model, shapes, pinned threads),
traces --iters steps of each and prints, per category, the milliseconds per step and the share of the step:

  python bench/profile_train_step.py --preset=tiny --batch=4,16 --threads=1
  python bench/profile_train_step.py --preset=tiny --batch=16 --top=25      # also the 25 costliest ops of each

Categories. JAX: each executed HLO instruction of the compiled step (the CPU runtime's thunks, read from the
perfetto trace that `jax.profiler` writes) is classed by its opcode, a fusion by the ops inside it: `matmul`
(dot, or a fusion holding one), `conv`, `layout` (copy, transpose, a fusion of only moves), `reduce`, `elementwise`
(other fusions and loose arithmetic), `scatter/gather`, `other`; loops (while, call, conditional) are left out, as
the ops of their bodies are traced on their own. PyTorch:
aten ops by name (mm/addmm/bmm/linear/matmul and the attention kernels -> `matmul`, copy_/clone/contiguous/cat/
transpose -> `layout`, the optimizer's foreach ops -> `optimizer`, ...); only top-level aten ops count (a child
op's time is inside its parent's). The two sets of categories are close but not identical; the point is which
one grows faster with the batch.

The CPU is shared in this project: run it on a quiet machine or read the shares rather than the milliseconds.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_step as bts  # noqa: E402  (sets nothing on import)

if __name__ == "__main__":
  bts.configure_threads(bts._threads_from_argv(sys.argv[1:]),  # pylint: disable=protected-access
                        bts._keep_freed_memory_from_argv(sys.argv[1:]))  # pylint: disable=protected-access

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import torch  # noqa: E402

from qwenvl_jax.model import get_preset  # noqa: E402

_MOVES = {"copy", "transpose", "reshape", "bitcast", "broadcast", "slice", "concatenate", "pad", "parameter",
          "get-tuple-element", "tuple", "constant", "dynamic-slice", "dynamic-update-slice", "reverse", "iota",
          "convert"}


def hlo_categories(hlo_text: str) -> dict:
  """Instruction name -> category for every instruction of an optimized HLO module's text."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head and not line.startswith(" "):
      current = head.group(1)
      computations[current] = []
      continue
    m = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = (\S+(?: \S+)*?) ([a-z][\w\-]*)\(", line)
    if m and current is not None:
      calls = re.search(r"calls=%?([\w.\-]+)", line)
      shape = re.sub(r"\{[^}]*\}", "", m.group(2))
      computations[current].append((m.group(1), m.group(3), calls.group(1) if calls else None, shape))

  def ops_inside(comp, seen=()):
    out = set()
    for _, op, called, _ in computations.get(comp, []):
      out.add(op)
      if called and called not in seen:
        out |= ops_inside(called, seen + (called,))
    return out

  cats = {}
  for comp, insts in computations.items():
    for name, op, called, shape in insts:
      inner = ops_inside(called) if op == "fusion" and called else {op}
      if "dot" in inner:
        cat = "matmul"
      elif "convolution" in inner:
        cat = "conv"
      elif op in ("while", "call", "conditional"):
        cat = "control"
      elif inner & {"scatter", "gather"}:
        cat = "scatter/gather"
      elif inner <= _MOVES:
        cat = "layout"
      elif "reduce" in inner or "reduce-window" in inner:
        cat = "reduce"
      elif op in ("fusion", "add", "multiply", "subtract", "divide", "exponential", "tanh", "maximum", "select",
                  "compare", "rsqrt", "sqrt", "log", "negate", "erf", "power", "minimum", "and", "or", "clamp"):
        cat = "elementwise"
      else:
        cat = "other"
      cats[name] = (cat, shape)
  return cats


def profile_jax(cfg, b, t, m, iters, top):
  step = bts.make_jax_step(cfg, b, t, m)
  compiled_text = step.compiled_text
  cats = hlo_categories(compiled_text)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(iters):
        step()
    path = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path, "rt") as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  by_cat, by_op, by_shape = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") != "X":
      continue
    name = e.get("name", "")
    if name in cats and cats[name][0] != "control":  # a loop's events hold its body's, which count themselves
      us = float(e.get("dur", 0))
      by_cat[cats[name][0]] += us
      by_op[f"{name} {cats[name][1]}"] += us
      by_shape[f"{cats[name][0]:<12} {cats[name][1]}"] += us
  per_step = lambda counter: [(k, v / iters / 1e3) for k, v in counter.most_common(top)]
  return {k: v / iters / 1e3 for k, v in by_cat.items()}, per_step(by_op), per_step(by_shape)


_TORCH_CATS = [
    ("matmul", r"aten::(mm|addmm|bmm|baddbmm|linear|matmul|_scaled_dot_product.*|scaled_dot_product.*|"
               r"_native_multi_head_attention|multi_head_attention.*)$"),
    ("conv", r"aten::(conv.*|_convolution.*|mkldnn_convolution.*|convolution.*)$"),
    ("optimizer", r"aten::_foreach_.*|aten::_fused_adam.*|Optimizer\..*"),
    ("layout", r"aten::(copy_|clone|contiguous|cat|transpose|permute|t|view|reshape|_unsafe_view|expand|"
               r"flatten|unflatten|chunk|split|select|slice|narrow|as_strided|stack|cat_backward|unsqueeze)$"),
    ("reduce", r"aten::(sum|mean|norm|linalg_vector_norm|_log_softmax.*|log_softmax.*|nll_loss.*|"
               r"native_layer_norm.*|_fused_rms_norm.*|rms_norm.*|cross_entropy.*|amax|max)$"),
    ("scatter/gather", r"aten::(embedding.*|index.*|gather|scatter.*)$"),
]


def torch_category(name: str) -> str:
  for cat, pattern in _TORCH_CATS:
    if re.match(pattern, name):
      return cat
  return "elementwise" if name.startswith("aten::") else "other"


def profile_torch(cfg, b, t, m, iters, top):
  step = bts.make_torch_step(cfg, b, t, m)
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=import-outside-toplevel
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(iters):
      step()
  events = [e for e in prof.events() if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
  by_cat, by_op = collections.Counter(), collections.Counter()
  for e in events:
    if not e.name.startswith(("aten::", "Optimizer.")):
      continue
    # Autograd nodes call aten ops; only aten ops whose parent is not an aten op count, so nothing counts twice.
    by_cat[torch_category(e.name)] += e.cpu_time_total
    by_op[e.name] += e.cpu_time_total
  return {k: v / iters / 1e3 for k, v in by_cat.items()}, [(k, v / iters / 1e3) for k, v in by_op.most_common(top)]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--batch", default="4,16")
  parser.add_argument("--images", type=int, default=2)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--top", type=int, default=0, help="also list the N costliest ops of each framework")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--keep_freed_memory", default="false", choices=("true", "false"),
                      help="diagnostic: glibc keeps freed memory (bench_train_step.keep_freed_memory)")
  parser.add_argument("--cpu_options", default="true", choices=("true", "false"),
                      help="the model's CPU formulations (bench_train_step.bench_config) or the accelerator defaults")
  args = parser.parse_args()
  bts.pin_torch_threads(args.threads)
  torch.manual_seed(0)
  cfg = bts.bench_config(args.preset, res=224, cpu_options=args.cpu_options == "true")
  t = args.images * cfg.image_tokens + 64
  print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; threads {args.threads}")
  for b in (int(x) for x in args.batch.split(",")):
    jax_cats, jax_top, jax_shapes = profile_jax(cfg, b, t, args.images, args.iters, args.top)
    torch_cats, torch_top = profile_torch(cfg, b, t, args.images, args.iters, args.top)
    jt, tt = sum(jax_cats.values()), sum(torch_cats.values())
    print(f"\n{args.preset} B={b} T={t}: traced op time per step JAX {jt:.1f} ms, PyTorch {tt:.1f} ms")
    print(f"{'category':<15} {'JAX ms':>8} {'JAX %':>6} {'torch ms':>9} {'torch %':>7}")
    for cat in sorted(set(jax_cats) | set(torch_cats), key=lambda c: -jax_cats.get(c, 0)):
      j, p = jax_cats.get(cat, 0.0), torch_cats.get(cat, 0.0)
      print(f"{cat:<15} {j:8.2f} {100 * j / jt:5.0f}% {p:9.2f} {100 * p / tt:6.0f}%")
    for label, rows in (("JAX", jax_top), ("JAX by category and output shape", jax_shapes),
                        ("PyTorch", torch_top)):
      if rows:
        print(f"-- {label}: costliest ops (ms/step)")
        for name, ms in rows:
          print(f"  {ms:8.2f}  {name}")


if __name__ == "__main__":
  main()
