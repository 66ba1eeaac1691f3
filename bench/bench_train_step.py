"""Train-step time of the JAX trainer vs an equivalent PyTorch model over a range of batch sizes, and achieved
FLOP/s vs a plain matmul.

For each preset (tiny, small, mid) and each batch in --batch, both frameworks run the same architecture and shapes
— ViT trunk, resampler adapter, Qwen decoder — through forward + backward + AdamW (everything trains, float32, no
remat), on the same pinned CPU threads (--threads: the process is bound to that many cores, PyTorch's
`set_num_threads` and XLA's thread pool follow). The JAX step is `qwenvl_jax.training.step.make_train_step`
(what the trainer jits); the PyTorch model is written here from the same config.

  python bench/bench_train_step.py --presets=tiny,small --images=2 --batch=1,2,4,8,16

Each framework runs in a worker process of its own (as in real training: one malloc heap each). By default
(--schedule=blocked) each runs one untimed step and then --iters timed steps back to back, as training does
(after warm-up; JAX: after compilation); --schedule=interleaved alternates one step of each, so load from other
processes hits both alike (see `timed` for why blocked is the default). Medians are printed. Per row: wall
ms/step of each and their ratio, CPU ms/step (`time.process_time`) of each and their ratio, the JAX step's model
FLOP/s (`training/flops.py`, per CPU second) as a share of a plain 2048^2 float32 matmul's, measured in the same
run, and the page faults of each step (memory mapped in anew). Each framework runs with its users' default
allocator: JAX with mimalloc (`--allocator`; what the trainer preloads on a CPU-only machine,
`qwenvl_jax/hardware/allocator.py`), PyTorch with glibc's malloc (`--torch_allocator`); either may be set to
`system` (glibc, whose unmapped blocks fault in anew every step; `--keep_freed_memory=true` is its no-fault
diagnostic) or `mimalloc`. On a shared machine the wall times hold other processes'
time slices; at --threads=1 the CPU-time columns do not, and are the ones to read there (the load average
printed says how loaded it was).

--cpu_options=true (default) builds the JAX model with its CPU formulations (`attention_impl="xla_rows"`,
`cpu_layouts=True`; equal results, tests/model/test_cpu_layouts.py); false with the accelerator defaults, the
program as it was before issue 16's CPU work. `bench/profile_train_step.py` splits both steps by op category.
"""

import os
import sys


def keep_freed_memory() -> bool:
  """glibc's mmap and heap trimming off, so freed blocks stay in the heap for the next step (mallopt); True when
  applied, False off glibc. With --allocator=system only (mimalloc keeps freed memory by itself).

  A diagnostic — what the step costs without page faults — not what the trainer runs. XLA:CPU allocates each
  execution's temporaries as one block (151 MB for `tiny` at batch 16, ~1 GB for `small` at batch 1), which glibc
  serves by mmap and unmaps at free, so each step faults it in again page by page (the `faults` columns: 37,000
  faults and ~50 ms of kernel time in a 177 ms tiny step; 235,000 faults and ~4 s in a 6 s small step on this VM).
  With this setting and JAX's step on the main thread (synchronous dispatch: a secondary arena maps any block over
  64 MB whatever the settings) the faults vanish for blocks the heap holds, but not for multi-GB ones (`small` at
  batch 8 still faulted 876,000 pages per step). Not the trainer's default: one arena for all threads (which
  would cover the rest) slowed tiny's JAX step 1.2-1.5x (`_int_malloc`), and in the CPU-demo trainer it made
  steps 25 % faster but the whole run slower (50 s against 38 s); glibc's `hugetlb` tunable (2 MB pages) cut the
  faults but stalled on compaction (tiny batch 16: 588 ms).
  """
  import ctypes  # pylint: disable=g-import-not-at-top
  import ctypes.util  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top
  if platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  m_mmap_max, m_trim_threshold = -4, -1  # glibc malloc.h
  return libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2 ** 31 - 1) == 1


def configure_threads(threads: int, keep_freed: bool = False) -> None:
  """Pins this process to `threads` cores for both frameworks; call before starting jax or importing torch.

  keep_freed: `keep_freed_memory()` and JAX's steps on the calling thread (for both frameworks alike; see there).

  The affinity mask bounds XLA's CPU thread pool (sized from the cores it may use) and PyTorch's; PyTorch's
  intra-op pool is also set explicitly in `main` (`torch.set_num_threads`), and one thread turns XLA's Eigen
  pool off.
  """
  cores = sorted(os.sched_getaffinity(0))
  if threads < 1 or threads > len(cores):
    raise SystemExit(f"error: --threads={threads}: this process may use {len(cores)} core(s)")
  os.sched_setaffinity(0, cores[:threads])
  flags = os.environ.get("XLA_FLAGS", "")
  if threads == 1 and "xla_cpu_multi_thread_eigen" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(threads)
  if keep_freed and keep_freed_memory():
    import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS; the backend has not started)
    jax.config.update("jax_cpu_enable_async_dispatch", False)


def _flag_from_argv(argv, name: str, default: str) -> str:
  """A flag's value read before argparse runs (the process setup must precede importing jax and torch)."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def _threads_from_argv(argv) -> int:
  return int(_flag_from_argv(argv, "threads", str(len(os.sched_getaffinity(0)))))


def _keep_freed_memory_from_argv(argv) -> bool:
  return _flag_from_argv(argv, "keep_freed_memory", "false") == "true"


if __name__ == "__main__":
  configure_threads(_threads_from_argv(sys.argv[1:]), _keep_freed_memory_from_argv(sys.argv[1:]))

import argparse
import dataclasses
import pathlib
import resource
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runnable as python bench/X.py

from qwenvl_jax.hardware import allocator
from qwenvl_jax.model import QwenVL, get_preset
from qwenvl_jax.training import flops, optimizer, step as step_lib


# ---------------------------------------------------------------- PyTorch equivalent (same shapes, same math)

class TorchViTBlock(nn.Module):

  def __init__(self, w, heads, mlp):
    super().__init__()
    self.ln_1, self.ln_2 = nn.LayerNorm(w, eps=1e-6), nn.LayerNorm(w, eps=1e-6)
    self.qkv, self.out = nn.Linear(w, 3 * w), nn.Linear(w, w)
    self.fc, self.proj = nn.Linear(w, mlp), nn.Linear(mlp, w)
    self.heads = heads

  def forward(self, x):
    b, l, w = x.shape
    q, k, v = self.qkv(self.ln_1(x)).view(b, l, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
    x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, l, w))
    return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class TorchDecoderBlock(nn.Module):

  def __init__(self, d, heads, head_dim, mlp):
    super().__init__()
    self.ln_1, self.ln_2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
    self.qkv, self.out = nn.Linear(d, 3 * heads * head_dim), nn.Linear(heads * head_dim, d, bias=False)
    self.w1, self.w2 = nn.Linear(d, mlp, bias=False), nn.Linear(d, mlp, bias=False)
    self.c_proj = nn.Linear(mlp, d, bias=False)
    self.heads, self.head_dim = heads, head_dim

  def forward(self, x, cos, sin):
    b, t, _ = x.shape
    q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def rope(z):
      z1, z2 = z.chunk(2, dim=-1)
      return z * cos + torch.cat([-z2, z1], dim=-1) * sin

    a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
    x = x + self.out(a.transpose(1, 2).reshape(b, t, -1))
    h = self.ln_2(x)
    return x + self.c_proj(self.w1(h) * F.silu(self.w2(h)))


class TorchQwenVL(nn.Module):
  """ViT + resampler adapter + decoder with the shapes of a `QwenVLConfig`."""

  def __init__(self, cfg):
    super().__init__()
    v, r, l = cfg.vision, cfg.resampler, cfg.llm
    self.cfg = cfg
    self.conv1 = nn.Conv2d(3, v.width, v.patch_size, v.patch_size, bias=False)
    self.pos = nn.Parameter(torch.randn(v.num_patches, v.width) * 0.01)
    self.ln_pre = nn.LayerNorm(v.width, eps=1e-6)
    self.vit = nn.ModuleList(TorchViTBlock(v.width, v.heads, v.mlp_dim) for _ in range(v.layers))
    d = l.width
    self.query = nn.Parameter(torch.randn(r.num_queries, d) * 0.02)
    self.pos_q = nn.Parameter(torch.zeros(r.num_queries, d))
    self.pos_k = nn.Parameter(torch.zeros(v.num_patches, d))
    self.kv_proj = nn.Linear(v.width, d, bias=False)
    self.ln_q, self.ln_kv = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
    self.attn = nn.MultiheadAttention(d, r.heads, batch_first=True)
    self.ln_post = nn.LayerNorm(d, eps=1e-6)
    self.proj = nn.Parameter(torch.randn(d, d) * d ** -0.5)
    self.wte = nn.Embedding(l.vocab_size, d)
    self.blocks = nn.ModuleList(TorchDecoderBlock(d, l.heads, l.head_dim, l.mlp_dim) for _ in range(l.layers))
    self.ln_f = nn.RMSNorm(d, eps=1e-6)
    self.lm_head = nn.Linear(d, l.vocab_size, bias=False)

  def forward(self, ids, images):
    b, m = images.shape[:2]
    x = self.conv1(images.flatten(0, 1)).flatten(2).transpose(1, 2)
    x = self.ln_pre(x + self.pos)
    for blk in self.vit:
      x = blk(x)
    kv = self.ln_kv(self.kv_proj(x))
    q = (self.ln_q(self.query) + self.pos_q).expand(b * m, -1, -1)
    feats, _ = self.attn(q, kv + self.pos_k, kv, need_weights=False)
    feats = self.ln_post(feats) @ self.proj
    h = self.wte(ids)
    n = m * self.cfg.image_tokens
    h = torch.cat([feats.reshape(b, n, -1), h[:, n:]], dim=1)
    t = ids.shape[1]
    hd = self.cfg.llm.head_dim
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos()[None, None], ang.sin()[None, None]
    for blk in self.blocks:
      h = blk(h, cos, sin)
    return self.lm_head(self.ln_f(h))


def make_torch_step(cfg, b, t, m):
  """A callable running one PyTorch train step (warmed up once)."""
  model = TorchQwenVL(cfg)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
  s = cfg.vision.image_size
  ids = torch.randint(0, cfg.llm.vocab_size, (b, t))
  targets = torch.randint(0, cfg.llm.vocab_size, (b, t))
  images = torch.rand(b, m, 3, s, s)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(ids, images).flatten(0, 1), targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  step()
  return step


# ---------------------------------------------------------------- JAX (the trainer's step)

def make_jax_step(cfg, b, t, m):
  """A callable running one JAX train step (compiled and warmed up once)."""
  model = QwenVL(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  opt = ml_collections.ConfigDict(dict(lr=1e-4, min_lr=1e-5, warmup_steps=1, schedule="cosine", b1=0.9, b2=0.98,
                                       eps=1e-6, weight_decay=0.05, wd_exclude=r".*/(bias|scale)", grad_clip=1.0,
                                       vit_layer_decay=1.0, mu_dtype=""))
  tx, sched, labels = optimizer.make_optimizer(opt, params, frozen=(), total_steps=1000,
                                               vit_layers=cfg.vision.layers)
  fn = jax.jit(step_lib.make_train_step(graphdef, tx, labels, sched), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  s, q = cfg.vision.image_size, cfg.image_tokens
  ids = rng.integers(0, cfg.llm.vocab_size, (b, t)).astype(np.int32)
  ids[:, :m * q] = cfg.image_pad_id
  batch = dict(input_ids=ids, targets=rng.integers(0, cfg.llm.vocab_size, (b, t)).astype(np.int32),
               loss_mask=np.ones((b, t), np.float32), segment_ids=np.ones((b, t), np.int32),
               positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
               images=rng.integers(0, 256, (b, m, s, s, 3)).astype(np.uint8), image_mask=np.ones((b, m), bool))
  batch = jax.device_put(batch)
  state = {"st": step_lib.TrainState(jnp.int32(0), params, tx.init(params))}
  compiled = fn.lower(state["st"], batch).compile()

  def step():
    state["st"], metrics = compiled(state["st"], batch)
    jax.block_until_ready(metrics)

  step()
  step.compiled_text = compiled.as_text()  # the optimized HLO (profile_train_step.py classes its ops)
  return step


def bench_config(name: str, *, res: int = 224, scan_unroll: str = "auto", cpu_options: bool = True, **overrides):
  """The preset `name` as both frameworks run it: float32, no remat, at `res` px; scan_unroll "auto" unrolls
  stacks of <= 8 layers, else "true" or an unroll factor. cpu_options: the model's CPU formulations (row-wise
  attention `attention_impl="xla_rows"`, `cpu_layouts`); False runs the accelerator defaults."""
  cfg = get_preset(name, dtype="float32", remat_policy="none", **overrides).with_image_size(res)
  if cpu_options:
    cfg = cfg.with_cpu_formulations()  # as the trainer runs on CPU (config.cpu_options)
  if scan_unroll == "auto":
    unroll = cfg.shallow
  else:
    unroll = True if scan_unroll.lower() == "true" else int(scan_unroll)
  return dataclasses.replace(cfg, scan_unroll=unroll)


def make_matmul(n: int = 2048):
  """A callable running one plain n x n float32 matmul with JAX; 2 n^3 FLOPs."""
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  return lambda: mm(a).block_until_ready()


def pin_torch_threads(threads: int) -> None:
  """PyTorch's intra-op pool to `threads` (the affinity mask of `configure_threads` does not size it)."""
  torch.set_num_threads(threads)


def _measure(fn) -> tuple[float, float, int]:
  """Runs `fn` once: wall seconds, CPU seconds (`time.process_time`: this process's threads, all cores) and minor
  page faults (memory the kernel maps in at first touch; `keep_freed_memory`)."""
  start, start_cpu = time.perf_counter(), time.process_time()
  start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  fn()
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults
  return time.perf_counter() - start, time.process_time() - start_cpu, faults


def run_worker(args) -> None:
  """`--worker=jax|torch`: builds that framework's step (the JAX worker also the matmul) for --presets (one name)
  at --batch (one size), prints `ready`, then for each line `step` / `matmul` on stdin runs it once and prints
  `wall cpu faults`. Each framework runs in a process of its own, as in real training, so neither's allocations
  shape the other's: with `--keep_freed_memory=true` in one process their large blocks shared one heap and
  fragmented it, and steps that found no free block faulted fresh memory in (tiny batch 16: 180-205 ms in one
  process, 128 ms apart)."""
  cfg = bench_config(args.presets, res=args.res, scan_unroll=args.scan_unroll,
                     cpu_options=args.cpu_options == "true")
  b = int(args.batch)
  t = args.seq_len or args.images * cfg.image_tokens + 64
  make = make_jax_step if args.worker == "jax" else make_torch_step
  fns = {"step": make(cfg, b, t, args.images)}
  if args.worker == "jax":
    fns["matmul"] = make_matmul()
  wanted = args.allocator if args.worker == "jax" else args.torch_allocator
  if allocator.in_use() != wanted:
    raise SystemExit(f"error: the {args.worker} worker runs with the {allocator.in_use()} allocator, not {wanted}")
  print("ready", flush=True)
  for line in sys.stdin:
    wall, cpu, faults = _measure(fns[line.strip()])
    print(f"{wall} {cpu} {faults}", flush=True)


def worker_environ(name: str) -> dict:
  """A worker's environment for allocator `name`: `mimalloc` preloaded as the trainer preloads it on CPU
  (`qwenvl_jax.hardware.allocator`), or `system` (glibc's malloc)."""
  if name == "system":
    return allocator.system_environ()
  try:
    return allocator.mimalloc_environ()
  except allocator.AllocatorError as e:
    raise SystemExit(f"error: allocator mimalloc: {e}") from e


class Worker:
  """A `--worker` subprocess of this script (same flags, so pinned and set up alike before JAX or PyTorch start)."""

  def __init__(self, framework: str, argv: list, preset: str, batch: int):
    own = ("--presets", "--batch", "--worker")  # set per worker below; dropped in both --flag=v and --flag v forms
    flags = [a for i, a in enumerate(argv) if a.split("=")[0] not in own and (i == 0 or argv[i - 1] not in own)]
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *flags, f"--worker={framework}",
                                  f"--presets={preset}", f"--batch={batch}"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=worker_environ(_flag_from_argv(
                                     argv, "allocator" if framework == "jax" else "torch_allocator",
                                     "mimalloc" if framework == "jax" else "system")))
    for line in self.proc.stdout:  # past JAX's / PyTorch's own start-up prints
      if line.strip() == "ready":
        break
    else:
      raise SystemExit(f"error: the {framework} worker exited with status {self.proc.wait()}")

  def run(self, name: str = "step") -> tuple[float, float, int]:
    self.proc.stdin.write(name + "\n")
    self.proc.stdin.flush()
    wall, cpu, faults = self.proc.stdout.readline().split()
    return float(wall), float(cpu), int(faults)

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def timed(steps: dict, iters: int, schedule: str = "blocked") -> tuple[dict, dict, dict]:
  """Median wall seconds, CPU seconds and page faults of each measurement callable (returning `_measure`'s
  triple) over `iters` runs.

  blocked: each callable runs one untimed step, then its `iters` timed ones back to back, as training runs its
    steps. On this project's VM a process idle for a few seconds has its memory paged out by the host's reclaim
    (a DAMON `pageout` scheme on physical memory): a `small` JAX step at batch 8 took 10.6 s back to back and
    67 s after 8 s idle (53 s of it kernel time faulting the memory back), so waiting while the other framework
    steps penalizes whichever holds more memory.
  interleaved: round-robin, one step of each in turn (machine load hits all alike; on a loaded machine the wall
    time also holds other processes' time slices, so at --threads=1 read the CPU-time ratio there).
  """
  results = {k: [] for k in steps}
  if schedule == "interleaved":
    for _ in range(iters):
      for name, fn in steps.items():
        results[name].append(fn())
  else:
    for name, fn in steps.items():
      fn()
      results[name] = [fn() for _ in range(iters)]
  median = lambda i: {k: statistics.median(r[i] for r in v) for k, v in results.items()}
  return median(0), median(1), median(2)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--presets", default="tiny,small")
  parser.add_argument("--batch", default="1,2,4,8,16", help="comma-separated batch sizes")
  parser.add_argument("--seq_len", type=int, default=0, help="0: the images' tokens + 64 text tokens")
  parser.add_argument("--images", type=int, default=2)
  parser.add_argument("--res", type=int, default=224)
  parser.add_argument("--iters", type=int, default=5, help="timed steps per framework")
  parser.add_argument("--schedule", default="blocked", choices=("blocked", "interleaved"),
                      help="each framework's steps back to back (default), or one of each in turn (see `timed`)")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="cores both frameworks run on (set before they start)")
  parser.add_argument("--scan_unroll", default="auto", help="auto (unroll stacks of <= 8 layers), 1, or true")
  parser.add_argument("--cpu_options", default="true", choices=("true", "false"),
                      help="the model's CPU formulations (xla_rows attention, cpu_layouts) or the accelerator defaults")
  parser.add_argument("--keep_freed_memory", default="false", choices=("true", "false"),
                      help="diagnostic: glibc keeps freed memory for reuse, in both frameworks (keep_freed_memory)")
  parser.add_argument("--allocator", default="mimalloc", choices=("mimalloc", "system"),
                      help="the JAX worker's malloc: mimalloc (what the trainer preloads on CPU) or glibc's")
  parser.add_argument("--torch_allocator", default="system", choices=("mimalloc", "system"),
                      help="the PyTorch worker's malloc: glibc's (PyTorch's default) or mimalloc")
  parser.add_argument("--worker", default="", choices=("", "jax", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.keep_freed_memory == "true" and "mimalloc" in (args.allocator, args.torch_allocator):
    parser.error("--keep_freed_memory=true is a glibc setting: use it with --allocator=system "
                 "--torch_allocator=system")
  torch.manual_seed(0)
  pin_torch_threads(args.threads)
  if args.worker:
    run_worker(args)
    return
  print(f"devices: {jax.devices()}, cores bound: {sorted(os.sched_getaffinity(0))}, torch threads: "
        f"{torch.get_num_threads()}, allocator: JAX {args.allocator}, PyTorch {args.torch_allocator}, "
        f"schedule: {args.schedule}, "
        f"keep freed memory: {args.keep_freed_memory}, "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
  print(f"{'preset':<6} {'B':>3} {'T':>4} {'JAX ms':>8} {'torch ms':>8} {'ratio':>6} {'JAX cpu':>8} {'torch cpu':>9} "
        f"{'cpu ratio':>9} {'GFLOP/s':>8} {'% matmul':>8} {'JAX faults':>10} {'torch faults':>12}", flush=True)
  for name in args.presets.split(","):
    cfg = bench_config(name, res=args.res, scan_unroll=args.scan_unroll, cpu_options=args.cpu_options == "true")
    t = args.seq_len or args.images * cfg.image_tokens + 64
    if t < args.images * cfg.image_tokens + 1:
      print(f"{name}: seq_len {t} cannot hold {args.images} x {cfg.image_tokens} image tokens; skipped")
      continue
    for b in (int(x) for x in args.batch.split(",")):
      model_flops = flops.train_step_flops(cfg, batch=b, seq_len=t, max_images=args.images,
                                           is_trainable=lambda p: True).total
      workers = {k: Worker(k, sys.argv[1:], name, b) for k in ("jax", "torch")}
      wall, cpu, faults = timed({"jax": workers["jax"].run, "torch": workers["torch"].run,
                                 "matmul": lambda: workers["jax"].run("matmul")}, args.iters, args.schedule)
      for w in workers.values():
        w.close()
      # FLOP/s and the matmul share from CPU time (both measured alike), so load does not move them.
      peak = 2 * 2048 ** 3 / cpu["matmul"]
      print(f"{name:<6} {b:>3} {t:>4} {wall['jax'] * 1e3:8.1f} {wall['torch'] * 1e3:8.1f} "
            f"{wall['jax'] / wall['torch']:6.2f} {cpu['jax'] * 1e3:8.1f} {cpu['torch'] * 1e3:9.1f} "
            f"{cpu['jax'] / cpu['torch']:9.2f} {model_flops / cpu['jax'] / 1e9:8.1f} "
            f"{100 * model_flops / cpu['jax'] / peak:7.0f}% {faults['jax']:10.0f} {faults['torch']:12.0f}", flush=True)
  print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
