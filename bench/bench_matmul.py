"""Achieved FLOP/s of a plain large matmul with JAX on this machine: the denominator of "train step vs matmul".

  python bench/bench_matmul.py                       # bf16 and f32, n = 1024 and 2048 on the default device
  python bench/bench_matmul.py --sizes=8192 --dtypes=bfloat16 --repeats=20

For each dtype and size it times `a @ b` (both n x n, jitted, result blocked on) `--repeats` times after a warm-up
compile and prints the median and best FLOP/s (2 n^3 FLOPs per product). On an accelerator whose peak is in
`qwenvl_jax/hardware/chips.py` it also prints the share of the dense bf16 peak. Several products are chained in
one jitted call (`--chain`) so that dispatch overhead does not count on fast devices.
"""
import argparse
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from qwenvl_jax.hardware import chips  # noqa: E402  pylint: disable=wrong-import-position


def time_matmul(n: int, dtype: str, repeats: int, chain: int) -> list[float]:
  """Seconds per product for `repeats` timed calls of `chain` chained n x n products."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
  # Scaled so that chaining keeps values finite: each product multiplies magnitudes by about sqrt(n) / n.
  b = (jax.random.normal(key_b, (n, n), jnp.float32) / jnp.sqrt(n)).astype(dtype)

  @jax.jit
  def chained(x, w):
    for _ in range(chain):
      x = x @ w
    return x

  chained(a, b).block_until_ready()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    chained(a, b).block_until_ready()
    seconds.append((time.perf_counter() - start) / chain)
  return seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="1024,2048", help="comma-separated n")
  parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated JAX dtypes")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--chain", type=int, default=2, help="products per jitted call")
  args = parser.parse_args()

  device = jax.devices()[0]
  try:
    spec = chips.chip_spec(device.device_kind)
  except ValueError:
    spec = None
  print(f"device: {device.device_kind} ({device.platform}), {jax.device_count()} device(s), "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__}")
  # Other processes on a shared host take cores from the timed loop: the load average says how far to trust it.
  print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print(f"{'dtype':>9} {'n':>6} {'median GFLOP/s':>15} {'best GFLOP/s':>13} {'ms/product':>11}"
        + ("  of bf16 peak" if spec else ""))
  for dtype in args.dtypes.split(","):
    for n in (int(s) for s in args.sizes.split(",")):
      seconds = time_matmul(n, dtype, args.repeats, args.chain)
      flops = 2.0 * n**3
      median, best = flops / statistics.median(seconds), flops / min(seconds)
      share = f"  {median / spec.peak_bf16_flops:12.1%}" if spec else ""
      print(f"{dtype:>9} {n:6d} {median / 1e9:15.1f} {best / 1e9:13.1f} {statistics.median(seconds) * 1e3:11.2f}"
            + share)
  print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
