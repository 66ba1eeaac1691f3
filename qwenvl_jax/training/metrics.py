"""Training metrics: throughput and MFU arithmetic, and the writers (JSONL file, TensorBoard, progress bar).

MFU = model FLOPs per step (`flops.train_step_flops`, MaxText accounting) x steps / seconds / (devices x peak).
The peak per device comes from `planning.chips` by the JAX `device_kind`; a CPU (or an unknown chip) has no
meaningful peak, so MFU is reported as n/a there unless `config.peak_flops_per_device` gives one.

Only process 0 writes. `metrics.jsonl` gets one JSON object per logged step (appended, so a resumed run continues
the same file); TensorBoard events go to `<workdir>/tensorboard`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax


def peak_flops_per_device(override: float = 0.0) -> float | None:
  """Dense bf16 FLOP/s of one local device: `override` if > 0, else the chip table, else None (CPU, unknown)."""
  if override and override > 0:
    return float(override)
  kind = jax.devices()[0].device_kind
  if jax.devices()[0].platform == "cpu":
    return None
  try:
    from qwenvl_jax.planning import chips  # pylint: disable=g-import-not-at-top
    return chips.chip_spec(kind).peak_bf16_flops
  except (ImportError, ValueError):
    return None


def throughput(*, steps: int, seconds: float, tokens_per_step: int, images: float, step_flops: float,
               num_devices: int, peak: float | None) -> dict[str, float | None]:
  """steps/s, tokens/s, images/s, achieved model TFLOP/s per device, and MFU (None without a peak)."""
  if seconds <= 0 or steps <= 0:
    return {"steps_per_s": None, "tokens_per_s": None, "images_per_s": None, "tflops_per_device": None,
            "mfu": None}
  flops_per_s = step_flops * steps / seconds
  return {
      "steps_per_s": steps / seconds,
      "tokens_per_s": tokens_per_step * steps / seconds,
      "images_per_s": images / seconds,
      "tflops_per_device": flops_per_s / num_devices / 1e12,
      "mfu": flops_per_s / (num_devices * peak) if peak else None,
  }


class MetricsWriter:
  """JSONL + TensorBoard + tqdm, all no-ops on processes other than 0."""

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int, tensorboard: bool = True,
               progress_bar: bool = True):
    self.active = jax.process_index() == 0
    self._tb = None
    self._bar = None
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not self.active:
      return
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        self._tb = None
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
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)) and v is not None:
          self._tb.add_scalar(f"train/{k}", v, step)
      self._tb.flush()
    if self._bar is not None:
      shown = {k: clean[k] for k in ("loss", "lr", "tokens_per_s", "mfu") if clean.get(k) is not None}
      self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

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
    self.active = False
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    self._file.close()
