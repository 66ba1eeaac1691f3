r"""Throughput of the stage-1 cleaning job on this machine: pairs/s per worker, per stage, and end to end.

Generates `--num_pairs` web-like pairs (noisy JPEGs of `--image_width` x `--image_height`, English captions with a
little HTML, a few rejects of every kind), then reports:
  1. per-stage CPU cost of one pair (text cleaning, language, emoji, image read + decode, storage encoding);
  2. `clean_batch` throughput in one process: the pairs/s one Beam worker sustains, Beam overhead excluded;
  3. the whole job (read shards -> clean -> TFDS ArrayRecord + report) with the local Beam runner, in-process
     and, with --workers > 1, on that many DirectRunner worker processes.

With --scorer (comma-separated: `tiny` and/or `vit_b32`, random CLIP checkpoints written here by transformers with
those shapes, or `clip:DIR` / `chinese_clip:DIR` for a real one) it measures the same with the CLIP similarity
scorer of `--scorer=clip:...`, next to the figures without it: the scorer alone (host preprocessing + tokenizer +
model), `clean_batch` with it (pairs/s one worker sustains) and the whole job. Compilation (one program per batch
and text-length bucket) is timed apart from the steady state. Everything runs on JAX's default backend: CPU here,
the GPU or TPU on an accelerator host (where one scoring worker per host is the setup to measure).

  python bench/bench_clean.py --num_pairs=2000 --workers=2
  python bench/bench_clean.py --num_pairs=500 --workers=1 --scorer=tiny,vit_b32
"""
import argparse
import io
import json
import logging
import os
import pathlib
import resource
import sys
import tempfile
import time

from absl import logging as absl_logging
import jax
import numpy as np
import PIL.Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from qwenvl_jax.cleaning import CleanConfig, CleanJob, clean_batch, run_clean  # noqa: E402
from qwenvl_jax.cleaning import images as images_lib  # noqa: E402
from qwenvl_jax.cleaning import scoring  # noqa: E402
from qwenvl_jax.cleaning import text as text_lib  # noqa: E402
from qwenvl_jax.cleaning.pipeline import beam_options_from_string  # noqa: E402
from qwenvl_jax.cleaning.sources import read_shard  # noqa: E402

_WORDS = ("a red bus parked near the old stone bridge in the morning light with people walking by the river "
          "under tall green trees and white clouds over the city square").split()


def _jpeg(rng, width, height) -> bytes:
  base = rng.integers(0, 255, size=(height // 8, width // 8, 3), dtype=np.uint8)
  image = PIL.Image.fromarray(base, "RGB").resize((width, height), PIL.Image.Resampling.BILINEAR)
  noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-12, 12, size=(height, width, 3)), 0, 255)
  out = io.BytesIO()
  PIL.Image.fromarray(noisy.astype(np.uint8), "RGB").save(out, "JPEG", quality=90)
  return out.getvalue()


def make_input(folder: pathlib.Path, n: int, width: int, height: int, shards: int) -> None:
  """Writes n pairs as JSONL shards with images in folder/img (about 10% rejects of several kinds)."""
  rng = np.random.default_rng(0)
  (folder / "img").mkdir(parents=True)
  pool = [_jpeg(rng, width, height) for _ in range(32)]
  rows = []
  for i in range(n):
    name = f"img/{i}.jpg"
    (folder / name).write_bytes(pool[i % len(pool)])
    words = " ".join(rng.choice(_WORDS, size=int(rng.integers(6, 20))))
    text = f"<p>{words}</p> &amp; more" if i % 5 == 0 else words
    if i % 50 == 1:
      text = "hi"
    elif i % 50 == 2:
      text = "ein roter Bus steht vor der alten Brücke am Morgen"
    elif i % 50 == 3:
      name = "img/missing.jpg"
    rows.append({"text": text, "image": name})
  for s in range(shards):
    lines = [json.dumps(r) for r in rows[s::shards]]
    (folder / f"part-{s:05d}.jsonl").write_text("\n".join(lines) + "\n")


def _per_pair_ms(fn, items) -> float:
  start = time.process_time()
  for item in items:
    fn(item)
  return 1e3 * (time.process_time() - start) / max(1, len(items))


def bench_stages(pairs, cfg: CleanConfig) -> None:
  rows = [p.row for p in pairs if isinstance(p.row, dict) and p.row["image"] != "img/missing.jpg"]
  texts = [r["text"] for r in rows]
  cleaned = [text_lib.clean_text(t) for t in texts]
  root = pairs[0].root
  raw = [images_lib.read_image_bytes(r["image"], root=root, max_bytes=cfg.max_image_bytes, timeout_s=1.0)
         for r in rows]
  decoded = [images_lib.decode_image(d, max_pixels=cfg.max_image_pixels) for d in raw]
  text_lib.detect_language(cleaned[0])  # loads the language model (~0.75 s) outside the timed loop
  stages = {
      "clean_text": _per_pair_ms(text_lib.clean_text, texts),
      "detect_language": _per_pair_ms(text_lib.detect_language, cleaned),
      "has_emoji": _per_pair_ms(text_lib.has_emoji, cleaned),
      "read_image_bytes": _per_pair_ms(
          lambda r: images_lib.read_image_bytes(r["image"], root=root, max_bytes=cfg.max_image_bytes,
                                                timeout_s=1.0), rows),
      "decode_image": _per_pair_ms(lambda d: images_lib.decode_image(d, max_pixels=cfg.max_image_pixels), raw),
      "encode_for_storage (as is)": _per_pair_ms(
          lambda d: images_lib.encode_for_storage(d, max_side=None, jpeg_quality=95), decoded),
      "encode_for_storage (max_side=256)": _per_pair_ms(
          lambda d: images_lib.encode_for_storage(d, max_side=256, jpeg_quality=95), decoded),
  }
  print("per-stage CPU ms per pair:")
  for name, ms in stages.items():
    print(f"  {name:36s} {ms:8.3f}")


def bench_clean_batch(pairs, cfg: CleanConfig, scorer=None, label: str = "no scorer") -> float:
  """Runs clean_batch over all pairs in batches of cfg.batch_size; prints and returns pairs/s (wall)."""
  wall, cpu = time.perf_counter(), time.process_time()
  outcomes = []
  for i in range(0, len(pairs), cfg.batch_size):
    outcomes += clean_batch(pairs[i:i + cfg.batch_size], cfg, scorer)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  kept = sum(1 for o in outcomes if not hasattr(o, "rule"))
  print(f"clean_batch, one process, {label}: {len(pairs)} pairs ({kept} kept) in {wall:.2f} s wall, {cpu:.2f} s "
        f"CPU -> {len(pairs) / wall:.1f} pairs/s wall, {len(pairs) / cpu:.1f} pairs/s per CPU-second")
  return len(pairs) / wall


def make_scorer_factory(name: str, folder: pathlib.Path):
  """The job's scorer factory for a --scorer entry (random presets are written to `folder` first)."""
  if ":" in name:
    return scoring.make_factory(name)
  # Test-only dependencies (torch, transformers) write the random checkpoint, as the tests do.
  from tests.clip.checkpoints import write_checkpoint  # pylint: disable=import-outside-toplevel
  write_checkpoint(folder / name, "clip", size=name)
  return scoring.make_factory(f"clip:{folder / name}")


def bench_scorer(pairs, cfg: CleanConfig, factory) -> float:
  """The scorer alone on the pairs that reach it, then clean_batch with it; returns clean_batch pairs/s."""
  candidates = [o for i in range(0, len(pairs), cfg.batch_size) for o in clean_batch(pairs[i:i + cfg.batch_size], cfg)
                if not hasattr(o, "rule")]
  start = time.perf_counter()
  scorer = factory()
  load = time.perf_counter() - start
  images = [PIL.Image.open(io.BytesIO(k.image)).convert("RGB") for k in candidates]
  texts = [k.text for k in candidates]
  start = time.perf_counter()
  for n in scorer.batch_buckets:  # every (batch bucket, text-length bucket): all the compilations there will be
    for length in scorer.text_buckets:
      scorer(images[:n], ["a " * (length - 2)] * n)
  warm = time.perf_counter() - start
  n = len(candidates) - len(candidates) % cfg.batch_size
  start, cpu = time.perf_counter(), time.process_time()
  for i in range(0, n, cfg.batch_size):
    scorer(images[i:i + cfg.batch_size], texts[i:i + cfg.batch_size])
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu
  print(f"  {factory!r} on {jax.default_backend()}: load {load:.1f} s, compiling every bucket {warm:.1f} s; "
        f"scorer alone {n / wall:.1f} pairs/s wall, {n / cpu:.1f} pairs/s per CPU-second ({n} pairs in batches of "
        f"{cfg.batch_size}, image decode excluded)")
  return bench_clean_batch(pairs, cfg, scorer, label=f"scorer {factory!r}")


def bench_job(folder: pathlib.Path, out: pathlib.Path, n: int, options: str, label: str, scorer_factory=None,
              cfg: CleanConfig | None = None) -> None:
  # Without a scorer the job must be told that no similarity filter is wanted (the input has no score column).
  job = CleanJob(inputs=[str(folder / "*.jsonl")], output_dir=str(out), scorer_factory=scorer_factory,
                 config=cfg or CleanConfig(), skip_similarity=scorer_factory is None)
  wall, cpu = time.perf_counter(), _cpu_seconds()
  report = run_clean(job, beam_options_from_string(options))
  wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
  print(f"whole job, {label}: {n} pairs ({report['kept']} kept) in {wall:.1f} s wall, {cpu:.1f} s CPU -> "
        f"{n / wall:.1f} pairs/s wall, {n / cpu:.1f} pairs/s per CPU-second (Beam start-up and the TFDS "
        "shuffle/write included)")


def _cpu_seconds() -> float:
  """CPU time of this process and of its finished children (the DirectRunner's worker processes)."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_pairs", type=int, default=2000)
  parser.add_argument("--image_width", type=int, default=512)
  parser.add_argument("--image_height", type=int, default=384)
  parser.add_argument("--shards", type=int, default=4)
  parser.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes of the last run")
  parser.add_argument("--skip_job", action="store_true", help="only the in-process measurements")
  parser.add_argument("--scorer", default="", help="comma-separated: tiny, vit_b32, clip:DIR, chinese_clip:DIR")
  args = parser.parse_args()
  # Beam and TFDS log every stage at INFO; the figures are what this script is for.
  logging.getLogger().setLevel(logging.WARNING)
  absl_logging.set_verbosity(absl_logging.WARNING)
  print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at start")
  with tempfile.TemporaryDirectory(prefix="bench_clean_") as tmp:
    # One compilation cache for this process and the DirectRunner workers it starts (they inherit the
    # environment): each scorer program compiles once, as a deployment sharing JAX_COMPILATION_CACHE_DIR would.
    cache = {"JAX_COMPILATION_CACHE_DIR": os.path.join(tmp, "jax_cache"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    os.environ.update(cache)
    jax.config.update("jax_compilation_cache_dir", cache["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    folder = pathlib.Path(tmp) / "in"
    make_input(folder, args.num_pairs, args.image_width, args.image_height, args.shards)
    pairs = [p for shard in sorted(folder.glob("*.jsonl")) for p in read_shard(str(shard))]
    cfg = CleanConfig()
    print(f"{len(pairs)} pairs, {args.image_width}x{args.image_height} JPEG, {args.shards} shards")
    bench_stages(pairs[:500], cfg)
    base = bench_clean_batch(pairs, cfg)
    if not args.skip_job:
      bench_job(folder, pathlib.Path(tmp) / "out1", len(pairs), "", "local runner, in-process")
      if args.workers > 1:
        bench_job(folder, pathlib.Path(tmp) / f"out{args.workers}", len(pairs),
                  f"direct_num_workers={args.workers},direct_running_mode=multi_processing",
                  f"{args.workers} DirectRunner worker processes")
    # A random model's scores mean nothing: every scored pair is kept, so the work is the same for each scorer.
    scored_cfg = CleanConfig(min_similarity=-1.0)
    for name in [s for s in args.scorer.split(",") if s]:
      print(f"scorer {name}:")
      factory = make_scorer_factory(name, pathlib.Path(tmp) / "ckpt")
      with_scorer = bench_scorer(pairs, scored_cfg, factory)
      print(f"  clean_batch with / without the scorer: {with_scorer:.1f} / {base:.1f} pairs/s per worker "
            f"= {with_scorer / base:.2f}x")
      if not args.skip_job:
        safe = name.replace(":", "_").replace("/", "_")
        bench_job(folder, pathlib.Path(tmp) / f"out_{safe}_1", len(pairs), "", "local runner, in-process, "
                  f"scorer {name}", factory, scored_cfg)
        if args.workers > 1:
          bench_job(folder, pathlib.Path(tmp) / f"out_{safe}_{args.workers}", len(pairs),
                    f"direct_num_workers={args.workers},direct_running_mode=multi_processing",
                    f"{args.workers} DirectRunner worker processes, scorer {name}", factory, scored_cfg)


if __name__ == "__main__":
  main()
