"""JAX's persistent compilation cache, on by default for every command (`cli.run`), as MaxText keeps `~/jax_cache`.

Why: each run compiles its programs anew, and on a CPU that is much of a short command's time. On a 2-core VM, with
the cache off / filled by a first run: `python -m qwenvl_jax.serve` of the quick start's tiny run warmed up (54
programs) in 54.4 / 12.0 s, its 120-step training took 38.5 / 28.9 s, `generate` 4.9 / 3.4 s. A cache entry is
keyed by the program, the compile options, jax/jaxlib and the device, so a hit gives the very executable a compile
would (results are unaffected; the suite runs with one such cache, `tests/conftest.py`).

Where: `$QWENVL_COMPILATION_CACHE` (an absolute folder; `off`, `0`, `false` turn the cache off), else
`~/.cache/qwenvl_jax/xla/<jaxlib version>-<machine>-<hash of the host CPU's model and features>`. The version and
the host in the folder's name keep a home folder shared by several machines, or a jaxlib reinstalled in place, from
ever offering one machine's CPU executables to another (XLA:CPU builds them for the host's instruction set; jax
#38445 and the XLA:CPU AOT loader's "machine type ... doesn't match" check are about exactly that). JAX's own
settings win: with `JAX_COMPILATION_CACHE_DIR` (or `jax_compilation_cache_dir`) set, nothing here changes.
Programs are cached whatever their compile time (JAX's default skips those under 1 s: most of a small model's),
unless `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` says otherwise. Nothing is ever evicted: remove the folder to
reclaim its space (the tiny model's server: about 4 MB).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import sys

ENV = "QWENVL_COMPILATION_CACHE"
OFF = "off"
_OFF_WORDS = (OFF, "0", "false", "no", "none")


def host_fingerprint() -> str:
  """`<machine>-<12 hex digits>`: the host CPU's architecture, and a hash of its model name and feature flags."""
  details = [platform.machine(), platform.processor()]
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        key = line.split(":", 1)[0].strip()
        if key in ("model name", "flags", "Features", "CPU implementer", "CPU part"):
          details.append(line.strip())
          if key in ("flags", "Features"):
            break  # the first processor's lines are enough: the cores of one host are alike
  except OSError:
    pass
  digest = hashlib.sha256("\n".join(details).encode()).hexdigest()[:12]
  return f"{platform.machine() or 'unknown'}-{digest}"


def default_dir() -> pathlib.Path:
  from jaxlib import version  # pylint: disable=import-outside-toplevel
  return pathlib.Path("~/.cache/qwenvl_jax/xla").expanduser() / f"{version.__version__}-{host_fingerprint()}"


def enable() -> str | None:
  """Turns the cache on (module docstring); returns its folder, or None when it is off or JAX's own setting rules.

  Call before the first compilation. An unusable folder (a file in the way, no permission) only warns: the command
  runs, compiling as without a cache.
  """
  import jax  # pylint: disable=import-outside-toplevel
  setting = os.environ.get(ENV, "").strip()
  if setting.lower() in _OFF_WORDS or jax.config.jax_compilation_cache_dir:  # JAX reads JAX_COMPILATION_CACHE_DIR
    return None
  if setting and not os.path.isabs(os.path.expanduser(setting)):  # `of` (a typo of off) made a folder ./of
    from qwenvl_jax import errors  # pylint: disable=import-outside-toplevel
    raise errors.ConfigError(f"{ENV}={setting!r} is neither {OFF!r} nor an absolute folder path")
  folder = pathlib.Path(setting).expanduser() if setting else default_dir()
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # one line on stderr (a Python warning also printed its source line)
    print(f"warning: compilation cache off: cannot use {folder} ({e}); set {ENV} to another folder or to {OFF}",
          file=sys.stderr, flush=True)
    return None
  jax.config.update("jax_compilation_cache_dir", str(folder))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  return str(folder)
