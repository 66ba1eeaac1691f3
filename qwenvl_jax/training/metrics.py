"""Training metrics: throughput and MFU arithmetic, and the writers (JSONL file, TensorBoard, progress bar).

MFU = model FLOPs per step (`flops.train_step_flops`, MaxText accounting) x steps / seconds / (devices x peak).
The peak per device comes from `hardware.chips` by the JAX `device_kind`; a CPU (or an unknown chip) has no
meaningful peak, so MFU is reported as n/a there unless `config.peak_flops_per_device` gives one.

Only process 0 writes. `metrics.jsonl` gets one JSON object per logged step, and a resumed run continues the same
file; TensorBoard events go to `<workdir>/tensorboard`.

Remote workdirs (`gs://...`, through `etils.epath`; needs `gcsfs`): object stores cannot append, and one object may
be rewritten only about once per second. So for a URL workdir the writer reads the existing `metrics.jsonl` once,
keeps all lines in memory, and rewrites the whole object at most every `REMOTE_FLUSH_SECONDS` and at `close()`
(a killed process loses at most that much of the log; checkpoints are unaffected). Local files are appended to
and flushed on every record, as before. tensorboardX writes `gs://` event files itself when `google-cloud-storage`
is installed (it rewrites the whole object on each flush, so remote flushes follow the same throttle, besides
tensorboardX's own every 120 s); without it TensorBoard is disabled for a remote workdir with a logged warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

from etils import epath
import jax

from qwenvl_jax.training import workdir as workdir_lib

# Seconds between rewrites of a remote metrics.jsonl / TensorBoard flushes (GCS: ~1 write/s per object).
REMOTE_FLUSH_SECONDS = 30.0


def peak_flops_per_device(override: float = 0.0) -> float | None:
  """Dense bf16 FLOP/s of one local device: `override` if > 0, else the chip table, else None (CPU, unknown)."""
  if override and override > 0:
    return float(override)
  kind = jax.devices()[0].device_kind
  if jax.devices()[0].platform == "cpu":
    return None
  try:
    from qwenvl_jax.hardware import chips  # pylint: disable=g-import-not-at-top
    return chips.chip_spec(kind).peak_bf16_flops
  except (ImportError, ValueError):
    return None


def throughput(*, steps: int, seconds: float, tokens_per_step: int, images: float, step_flops: float,
               num_devices: int, peak: float | None) -> dict[str, float | None]:
  """steps/s, seconds per step, tokens/s, images/s, achieved model TFLOP/s per device, and MFU (None without a
  peak)."""
  if seconds <= 0 or steps <= 0:
    return {"steps_per_s": None, "step_time_s": None, "tokens_per_s": None, "images_per_s": None,
            "tflops_per_device": None, "mfu": None}
  flops_per_s = step_flops * steps / seconds
  return {
      "steps_per_s": steps / seconds,
      "step_time_s": seconds / steps,
      "tokens_per_s": tokens_per_step * steps / seconds,
      "images_per_s": images / seconds,
      "tflops_per_device": flops_per_s / num_devices / 1e12,
      "mfu": flops_per_s / (num_devices * peak) if peak else None,
  }


def _duration(seconds: float) -> str:
  """7h05m, 3m20s, 12s."""
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


def console_line(step: int, total_steps: int, values: dict[str, Any]) -> str:
  """The console line of a logged step: loss, lr, grad norm, then (when measured: not in the interval holding the
  compilation) images/s, tokens/s, step time, ETA to `total_steps` and MFU ("n/a" when the chip's peak is unknown,
  as on CPU: set config.peak_flops_per_device)."""
  parts = [f"{k}={values[k]:.4g}" for k in ("loss", "lr", "grad_norm") if values.get(k) is not None]
  step_time = values.get("step_time_s")
  if step_time is not None:
    parts.append(f"{values['images_per_s']:.3g} images/s")
    parts.append(f"{values['tokens_per_s']:.4g} tokens/s")
    parts.append(f"step {step_time:.3g}s")
    parts.append(f"ETA {_duration(max(total_steps - step, 0) * step_time)}")
    mfu = values.get("mfu")
    parts.append(f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a")
  return f"step {step}/{total_steps}: " + ", ".join(parts)


class MetricsWriter:
  """JSONL + TensorBoard + tqdm, all no-ops on processes other than 0."""

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int, tensorboard: bool = True,
               progress_bar: bool = True):
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self._tb = None
    self._bar = None
    self._file = None
    self.remote = workdir_lib.is_remote(workdir)
    self.path = str(epath.Path(workdir) / "metrics.jsonl")
    if not self.active:
      return
    if self.remote:
      path = epath.Path(self.path)
      self._lines = path.read_text().splitlines(keepends=True) if path.exists() else []
      self._lines = _rows_up_to(self._lines, initial_step)
      self._dirty = False
      self._last_flush = time.monotonic()
    else:
      _drop_rows_after(self.path, initial_step)
      self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      self._tb = _tensorboard_writer(str(epath.Path(workdir) / "tensorboard"), remote=self.remote)
    if progress_bar:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                       disable=None)

  def write(self, step: int, values: dict[str, Any]) -> None:
    """Logs `values` (floats or None) at `step`."""
    if not self.active:
      return
    clean = {k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
             for k, v in values.items()}
    record = {"step": step, **{k: v for k, v in values.items() if v is not None}}
    # JSON has no NaN; keep non-finite losses visible as strings rather than dropping them.
    record = {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    line = json.dumps(record) + "\n"
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)) and v is not None:
          self._tb.add_scalar(f"train/{k}", v, step)
    if self.remote:
      self._lines.append(line)
      self._dirty = True
      if time.monotonic() - self._last_flush >= REMOTE_FLUSH_SECONDS:
        self.flush()
    else:
      self._file.write(line)
      self._file.flush()
      if self._tb is not None:
        self._tb.flush()
    if self._bar is not None and not self._bar.disable:
      # tqdm itself shows the step rate, elapsed time and ETA.
      names = {"loss": "loss", "lr": "lr", "grad_norm": "grad_norm", "images_per_s": "img/s",
               "tokens_per_s": "tok/s", "mfu": "MFU"}
      self._bar.set_postfix({n: f"{clean[k]:.3g}" for k, n in names.items() if clean.get(k) is not None},
                            refresh=False)
    else:
      # No terminal (a log file, nohup, a scheduler): one line per logged step, so progress is visible there too.
      print(console_line(step, self.total_steps, clean), flush=True)

  def write_scores(self, step: int, scores: dict[str, float]) -> None:
    """Evaluation scores at `step`: one metrics.jsonl row, TensorBoard scalars under their own names (`eval/...`),
    and a console line."""
    if not self.active or not scores:
      return
    line = json.dumps({"step": step, **scores}) + "\n"
    if self.remote:
      self._lines.append(line)
      self._dirty = True
    else:
      self._file.write(line)
      self._file.flush()
    if self._tb is not None:
      for k, v in scores.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()
    self.message(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in scores.items()))

  def flush(self) -> None:
    """Makes every record written so far durable (for a remote workdir: rewrites the whole metrics.jsonl)."""
    if not self.active:
      return
    if self.remote:
      if self._dirty:
        epath.Path(self.path).write_text("".join(self._lines))
        self._dirty = False
      self._last_flush = time.monotonic()
    elif self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def message(self, text: str) -> None:
    """A line for the user (through tqdm so the bar is not garbled)."""
    if not self.active:
      return
    if self._bar is not None:
      self._bar.write(text, file=sys.stderr)
    else:
      print(text, file=sys.stderr, flush=True)

  def close(self) -> None:
    if not self.active:
      return
    self.flush()
    self.active = False
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._file is not None:
      self._file.close()


def _rows_up_to(lines: list[str], step: int) -> list[str]:
  """The lines of a metrics.jsonl that log steps <= `step` (an unparsable line is kept: it is the user's)."""
  kept = []
  for line in lines:
    try:
      logged = json.loads(line).get("step")
    except (ValueError, AttributeError):
      logged = None
    if not isinstance(logged, int) or logged <= step:
      kept.append(line)
  return kept


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites a local metrics.jsonl without the rows past `step`: a run killed after its last checkpoint logged
  steps that the resumed run computes again, and each step must be logged once.
  The rewrite goes through a temporary file and a rename, so a kill during it loses nothing."""
  p = epath.Path(path)
  if not p.exists():
    return
  lines = p.read_text().splitlines(keepends=True)
  if lines and not lines[-1].endswith("\n"):
    lines = lines[:-1]  # a record cut short by the kill (every record is written with its newline)
  kept = _rows_up_to(lines, step)
  if "".join(kept) == p.read_text():
    return
  tmp = epath.Path(path + ".tmp")
  tmp.write_text("".join(kept))
  os.replace(tmp, p)


def _tensorboard_writer(logdir: str, *, remote: bool):
  """A tensorboardX SummaryWriter for `logdir`, or None (tensorboardX missing, or no gs:// support for it)."""
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if remote:
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
    # tensorboardX writes gs:// through google-cloud-storage and s3:// through boto3, when they are installed.
    scheme = logdir.split("://", 1)[0]
    enabled = {"gs": getattr(record_writer, "GCS_ENABLED", False),
               "s3": getattr(record_writer, "S3_ENABLED", False)}.get(scheme, False)
    if not enabled:
      logging.warning("TensorBoard disabled: tensorboardX cannot write to %s (for gs:// it needs "
                      "`pip install google-cloud-storage`); metrics.jsonl is still written", logdir)
      return None
  return SummaryWriter(logdir)
