"""The memory allocator of CPU runs: mimalloc (the `cmeel-mimalloc` wheel) in place of glibc's malloc.

Why: XLA:CPU allocates each execution's temporaries as one block (151 MB for the `tiny` train step at batch 16,
about 1 GB for `small` at batch 1). glibc serves blocks over 32 MB with mmap and unmaps them at free, so every
step faults its whole block in again, page by page: 37,000 faults per step for `tiny` at batch 16, 235,000 for
`small` at batch 1 on our 2-core VM (whose host also pages out memory idle for seconds, which made those faults
cost more there than elsewhere; DESIGN §4i). mimalloc with freed memory kept mapped (`mimalloc_environ`) faults no
page per step at any size benched (`bench/bench_train_step.py --allocator`). glibc's own settings do not get
there (mmap off still maps multi-GB blocks; one arena slows small allocations; 2 MB pages stall on compaction).

A process cannot swap its allocator once running, so `maybe_reexec()` re-executes the command with mimalloc in
`LD_PRELOAD` (the pid, open files and arguments stay), as PyTorch's CPU launcher does with jemalloc
(`torch.backends.xeon.run_cpu --enable_jemalloc`). It does so only for a run that can only be on the CPU (JAX_PLATFORMS
is `cpu`, or no accelerator plugin is installed), on Linux, when the wheel is installed, and not when
`QWENVL_CPU_ALLOCATOR=system`. `QWENVL_CPU_ALLOCATOR=mimalloc` asks for it and makes its absence an error.
Plain Python, no JAX (it runs before JAX starts).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

ENV = "QWENVL_CPU_ALLOCATOR"
CHOICES = ("auto", "mimalloc", "system")
_LIBRARY = "libmimalloc.so"


class AllocatorError(ValueError):
  """A QWENVL_CPU_ALLOCATOR setting that cannot be honoured (`cli.run` reports it as a user error)."""


def mimalloc_library() -> str | None:
  """The path of the installed `cmeel-mimalloc` wheel's libmimalloc.so, or None when it is not installed."""
  try:
    dist = importlib.metadata.distribution("cmeel-mimalloc")
  except importlib.metadata.PackageNotFoundError:
    return None
  for entry in dist.files or ():
    if entry.name == _LIBRARY:
      path = os.path.abspath(str(dist.locate_file(entry)))
      if os.path.isfile(path):
        return path
  return None


def cpu_only(environ=os.environ) -> bool:
  """Whether JAX can only pick the CPU here: JAX_PLATFORMS names no other platform, or none is set and no
  accelerator plugin (libtpu, a `jax_plugins` entry point such as jax-cuda12-plugin) is installed."""
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return all(p == "cpu" for p in platforms)
  if importlib.util.find_spec("libtpu") is not None:
    return False
  if list(importlib.metadata.entry_points(group="jax_plugins")):
    return False
  try:
    import jax_plugins  # pylint: disable=import-outside-toplevel  (namespace package of older plugins)
  except ImportError:
    return True
  return not list(getattr(jax_plugins, "__path__", ()))


def preloaded(environ=os.environ) -> bool:
  """Whether LD_PRELOAD already names mimalloc (this process was started with it)."""
  return _LIBRARY in environ.get("LD_PRELOAD", "")


def in_use() -> str:
  """'mimalloc' when libmimalloc is mapped into this process, else 'system'."""
  try:
    with open("/proc/self/maps", encoding="utf-8") as f:
      return "mimalloc" if any(_LIBRARY in line for line in f) else "system"
  except OSError:
    return "system"


def choice(environ=os.environ) -> str:
  """QWENVL_CPU_ALLOCATOR, checked: 'auto' (default), 'mimalloc' or 'system'."""
  value = environ.get(ENV, "auto").strip().lower() or "auto"
  if value not in CHOICES:
    raise AllocatorError(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)}")
  return value


def preload_environ(environ=os.environ) -> dict | None:
  """The environment to re-execute this command in with mimalloc, or None when it should run as it is (see the
  module docstring for when)."""
  want = choice(environ)
  if want == "system" or preloaded(environ) or not sys.platform.startswith("linux"):
    return None
  if want == "auto" and not cpu_only(environ):
    return None
  if mimalloc_library() is None:
    if want == "mimalloc":
      raise AllocatorError(f"{ENV}=mimalloc, but the cmeel-mimalloc package is not installed "
                           "(pip install -r requirements.txt)")
    return None
  return mimalloc_environ(environ)


def mimalloc_environ(environ=os.environ) -> dict:
  """`environ` with mimalloc first in LD_PRELOAD (the mimalloc of any other path dropped, other preloads kept).

  It keeps freed memory mapped for reuse (`MIMALLOC_PURGE_DELAY=-1` unless set): by default it returns memory
  unused for 10 ms, and a step that frees and allocates large tensors then faults them in again (PyTorch's
  `small` step at batch 8: 31.6 s, against 9.1-14.4 s with glibc in other runs on this VM). A training process
  keeps its peak, as accelerator allocators do.

  It commits arena memory as it is used (`MIMALLOC_ARENA_EAGER_COMMIT=0` unless set): by default it commits its
  arenas eagerly and madvises them for transparent huge pages, so Python's and the compiler's many small objects,
  spread over many 2 MiB regions, each cost a 2 MiB page the kernel zeroes. The CPU-demo trainer's 30-step run
  took 33.6-34.5 s (22 s of kernel time, 38 % of perf samples zeroing pages), 21.9-26.9 s committing lazily (four runs),
  24.5-27.8 s under glibc. Turning huge pages off instead (`MIMALLOC_ALLOW_THP=0`, 21.1 s) made `small`'s
  batch-8 step fault 880,000 pages per step on this VM (13.3 s against 11.6 s); committing lazily keeps its huge
  pages (1,725 faults, 11.9 s).
  """
  library = mimalloc_library()
  if library is None:
    raise AllocatorError("the cmeel-mimalloc package is not installed (pip install -r requirements.txt)")
  env = dict(environ)
  others = [p for p in env.pop("LD_PRELOAD", "").split(":") if p and _LIBRARY not in p]
  env["LD_PRELOAD"] = ":".join([library, *others])
  env.setdefault("MIMALLOC_PURGE_DELAY", "-1")
  env.setdefault("MIMALLOC_ARENA_EAGER_COMMIT", "0")
  return env


def system_environ(environ=os.environ) -> dict:
  """`environ` with mimalloc removed from LD_PRELOAD (glibc's malloc; other preloads kept)."""
  env = dict(environ)
  others = [p for p in env.pop("LD_PRELOAD", "").split(":") if p and _LIBRARY not in p]
  if others:
    env["LD_PRELOAD"] = ":".join(others)
  return env


def maybe_reexec() -> None:
  """Re-executes this command (`sys.orig_argv`) with mimalloc preloaded when `preload_environ` says so; returns
  only when it does not. Called by `cli.run(main, cpu_allocator=True)` before the command starts JAX."""
  env = preload_environ()
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


if __name__ == "__main__":
  # `LD_PRELOAD=$(python -m qwenvl_jax.hardware.allocator) python ...`: any other command under mimalloc.
  found = mimalloc_library()
  if found is None:
    sys.exit("error: the cmeel-mimalloc package is not installed (pip install -r requirements.txt)")
  print(found)
