"""Host memory for CPU-only training: keep freed memory in the process instead of handing it back to the kernel.

XLA:CPU allocates the temporaries of each execution of a compiled program as one block (151 MB for the `tiny`
train step at batch 16) and frees it when the execution ends. glibc serves a block over its mmap threshold (at
most 32 MB) with mmap and unmaps it at free, so every step faults the whole block back in, page by page: 37,000
page faults and 45-55 ms of kernel time in a 170 ms step, the part of the CPU step that grew fastest with the
batch (`python bench/bench_train_step.py --keep_freed_memory=false`). PyTorch pays it too, less (5,000-8,000
faults per step at batch 16).

`keep_freed_memory` turns glibc's mmap and heap trimming off, so freed blocks stay in the heap and the next step
reuses them. That holds for the main arena only: a thread on a secondary arena still gets a block this large by
mmap (its heaps are 64 MB at most), and JAX's CPU client runs programs on a thread of its own unless dispatch is
synchronous. So a CPU training run also turns `jax_cpu_enable_async_dispatch` off (`qwenvl_jax/train.py`): the
step then runs, and allocates, on the calling thread. Measured (`tiny`, batch 16, one core): 0 faults per step,
wall 170 -> 126 ms; PyTorch 118 -> 111 ms with the same setting.

Where nothing but the CPU backend can run only (`cpu_only`): on accelerator hosts the large host buffers are
checkpoint and transfer staging, which should go back to the kernel. Plain Python (ctypes); no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_ENV_SWITCH = "QWENVL_KEEP_FREED_MEMORY"  # "0" turns the setting off for the CLI entry points


def cpu_only() -> bool:
  """Whether JAX can only run on the CPU in this process: `JAX_PLATFORMS=cpu`, or no accelerator plugin
  installed (libtpu, a `jax_plugins` entry point such as jax_cuda12_plugin, or the `jax_plugins` namespace)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms == "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return False
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  try:
    namespace = importlib.util.find_spec("jax_plugins")
  except (ImportError, ValueError):
    namespace = None
  if namespace is not None and namespace.submodule_search_locations:
    if any(os.listdir(d) for d in namespace.submodule_search_locations if os.path.isdir(d)):
      return False
  return True


def keep_freed_memory() -> bool:
  """Turns glibc's mmap and heap trimming off (see the module docstring); True when applied, False off glibc."""
  if platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
  ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
  return bool(ok)


def keep_freed_memory_on_cpu_host() -> bool:
  """`keep_freed_memory()` where only the CPU backend can run (`cpu_only`) and QWENVL_KEEP_FREED_MEMORY is not
  "0"; True when applied. `python -m qwenvl_jax.train` calls it first and, when True, turns JAX's asynchronous
  CPU dispatch off (see the module docstring)."""
  if os.environ.get(_ENV_SWITCH, "1") == "0" or not cpu_only():
    return False
  return keep_freed_memory()
