"""Benchmark of the data pipeline: examples per second per worker at 224 and 448 px.

Two measurements per (source, image size), each as wall-clock and CPU-time rates (on a shared machine the CPU
rate is the one that says what a worker process with a core to itself delivers):
  encode    one worker's work on one core: parse + tokenize + PIL decode/resize of every image, a single thread
            (what each grain worker process does; multiply by the worker count for a host's upper bound)
  pipeline  the whole host-local pipeline in the calling process (num_workers=0, one read thread): the above plus
            packing and batching, counted in examples (packed segments) per second

Sources: `synthetic` (the stage-1 captions, rendered at the training size) and `jsonl` (a JSONL of captions
with 640x480 JPEG photos-like images written to a temporary folder, so the reference's decode + bicubic
downscale is measured).

Run: python bench/bench_data.py [--examples 400] [--sizes 224,448] [--tokenizer PATH_TO_qwen.tiktoken]
Without --tokenizer it uses ../shared/data/qwen.tiktoken when present, else a SentencePiece model trained on
the synthetic corpus.
"""
import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from qwenvl_jax.data.config import default_data_config  # noqa: E402
from qwenvl_jax.data.encode import ExampleEncoder  # noqa: E402
from qwenvl_jax.data.pipeline import make_train_iterator  # noqa: E402
from qwenvl_jax.data.sources import make_source  # noqa: E402
from qwenvl_jax.data.synthetic import train_synthetic_tokenizer  # noqa: E402

DEFAULT_TIKTOKEN = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "qwen.tiktoken"


def _tokenizer(path: str, workdir: str):
  if path or DEFAULT_TIKTOKEN.is_file():
    from qwenvl_jax.text import QwenTokenizer  # pylint: disable=g-import-not-at-top
    return QwenTokenizer(path or DEFAULT_TIKTOKEN), "qwen tiktoken"
  return train_synthetic_tokenizer(os.path.join(workdir, "syn"), vocab_size=512), "synthetic sentencepiece"


def _write_jsonl(folder: str, n: int) -> str:
  """n 640x480 JPEGs (smooth gradients plus noise, so they compress like photos) and a JSONL of captions."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:480, 0:640]
  path = os.path.join(folder, "pairs.jsonl")
  with open(path, "w") as f:
    for i in range(n):
      base = (np.stack([xx * (i % 7 + 1), yy * (i % 5 + 1), xx + yy], -1) / 4) % 256
      pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"), quality=90)
      f.write(json.dumps({"id": str(i), "image": f"{i}.jpg", "text": f"a photo of gradient number {i}"}) + "\n")
  return path


def _encode_rate(spec: str, tokenizer, size: int, n: int) -> tuple[float, float]:
  """(examples per wall second, examples per CPU second) of one worker's work in one thread."""
  source = make_source(spec, stage=1, image_size=size)
  encoder = ExampleEncoder(tokenizer, 1, 256, size, 512, 1)
  items = [source.items[i % len(source.items)] for i in range(n)]
  start, cpu = time.perf_counter(), time.process_time()
  for item in items:
    encoder(source.parse(item))
  return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def _pipeline_rate(spec: str, tokenizer, size: int, n: int) -> tuple[float, float]:
  """(examples per wall second, examples per CPU second of all the process's threads) of the whole pipeline."""
  config = default_data_config(1)
  config.update(source=spec, num_workers=0, read_threads=1)
  it = make_train_iterator(config, tokenizer, process_index=0, process_count=1, global_batch=4, seq_len=1024,
                           max_images=3, image_size=size, stage=1, image_tokens=256)
  next(it)  # warm-up: threads, first reads
  seen = 0
  start, cpu = time.perf_counter(), time.process_time()
  while seen < n:
    seen += int(next(it)["segment_ids"].max(axis=1).sum())
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu
  it.close()  # stops its read-ahead, which would otherwise go on reading files the caller is about to delete
  return seen / wall, seen / cpu


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--examples", type=int, default=400)
  parser.add_argument("--sizes", default="224,448")
  parser.add_argument("--tokenizer", default="", help="a qwen.tiktoken file")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as workdir:
    tokenizer, name = _tokenizer(args.tokenizer, workdir)
    jsonl = _write_jsonl(workdir, min(args.examples, 200))
    print(f"tokenizer: {name}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"{args.examples} examples per measurement")
    print("ex/s = examples per wall-clock second; ex/cpu-s = per second of CPU time (what one uncontended core "
          "gives)")
    print(f"{'source':<10} {'size':>5} {'encode ex/s':>12} {'encode ex/cpu-s':>16} {'pipeline ex/s':>14} "
          f"{'pipeline ex/cpu-s':>18}")
    for spec in ("synthetic", f"jsonl:{jsonl}"):
      for size in (int(s) for s in args.sizes.split(",")):
        enc, enc_cpu = _encode_rate(spec, tokenizer, size, args.examples)
        pipe, pipe_cpu = _pipeline_rate(spec, tokenizer, size, args.examples)
        print(f"{spec.split(':')[0]:<10} {size:>5} {enc:>12.0f} {enc_cpu:>16.0f} {pipe:>14.0f} {pipe_cpu:>18.0f}")


if __name__ == "__main__":
  main()
