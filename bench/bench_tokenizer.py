"""Encoding throughput of the text stack on a generated corpus; prints figures (no assertions).

Measures, with the real Qwen vocabulary (`--vocab`, default ../shared/data/qwen.tiktoken):
  * QwenTokenizer.encode, one text at a time, one thread;
  * QwenTokenizer.encode_batch (tiktoken's thread pool) at several thread counts;
  * encode_with_images on ChatML-sized multimodal prompts and sft_example on conversations (the data-pipeline
    paths, pure Python around tiktoken);
  * the SentencePiece backend: training time on ~5k short sentences and its encode throughput.

Usage: python bench/bench_tokenizer.py [--vocab PATH] [--texts 20000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import random
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runnable as python bench/X.py

from qwenvl_jax import text

_WORDS_EN = ("the a red blue green circle square image shows person standing next to large small building car "
             "dog cat table window tree sky water road sign text reads open 2023 and with on in of").split()
_WORDS_ZH = "图片 中 有 一个 红色 的 圆形 和 蓝色 方块 人 站在 旁边 天空 汽车 文字".split()


def make_corpus(n: int, seed: int = 0) -> list[str]:
  """Caption-like texts: ~80% English, ~20% Chinese (the paper's stage-1 mix), 10-40 words, some digits."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    if rng.random() < 0.8:
      words = [rng.choice(_WORDS_EN) for _ in range(rng.randint(10, 40))]
      words.insert(rng.randrange(len(words)), str(rng.randrange(100000)))
      out.append(" ".join(words) + ".")
    else:
      out.append("".join(rng.choice(_WORDS_ZH) for _ in range(rng.randint(10, 40))) + "。")
  return out


def best_of(repeats: int, fn):
  """Minimum wall time of `repeats` calls and the last result."""
  best, result = float("inf"), None
  for _ in range(repeats):
    t0 = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - t0)
  return best, result


def main() -> None:
  default_vocab = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "qwen.tiktoken"
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vocab", default=os.environ.get("QWEN_TIKTOKEN", str(default_vocab)))
  parser.add_argument("--texts", type=int, default=20000)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  corpus = make_corpus(args.texts)
  n_chars = sum(len(t) for t in corpus)
  print(f"corpus: {len(corpus)} texts, {n_chars} characters, {os.cpu_count()} CPUs")

  t0 = time.perf_counter()
  tok = text.QwenTokenizer(args.vocab)
  print(f"QwenTokenizer load: {time.perf_counter() - t0:.2f} s")

  seconds, ids = best_of(args.repeats, lambda: [tok.encode(t) for t in corpus])
  n_tokens = sum(len(x) for x in ids)
  print(f"qwen encode, 1 thread:          {n_tokens / seconds:12,.0f} tokens/s  {len(corpus) / seconds:10,.0f} texts/s"
        f"  ({n_tokens} tokens, {n_tokens / len(corpus):.1f}/text)")
  for threads in (1, 2, 4, 8):
    seconds, _ = best_of(args.repeats, lambda: tok.encode_batch(corpus, num_threads=threads))
    print(f"qwen encode_batch, {threads} threads:  {n_tokens / seconds:12,.0f} tokens/s  "
          f"{len(corpus) / seconds:10,.0f} texts/s")

  prompts = [text.from_list_format([{"image": f"images/{i:06d}.jpg"}, {"text": t}]) for i, t in
             enumerate(corpus[:5000])]
  seconds, encoded = best_of(args.repeats, lambda: [text.encode_with_images(tok, p) for p in prompts])
  n_tokens = sum(len(e.ids) for e in encoded)
  print(f"encode_with_images (258-token span): {len(prompts) / seconds:10,.0f} prompts/s  "
        f"{n_tokens / seconds:12,.0f} tokens/s incl. spans")
  conversations = [[{"from": "user", "value": p}, {"from": "assistant", "value": corpus[-i - 1]}]
                   for i, p in enumerate(prompts)]
  seconds, _ = best_of(args.repeats, lambda: [text.sft_example(tok, c) for c in conversations])
  print(f"sft_example (1 image, 1 turn):      {len(conversations) / seconds:10,.0f} examples/s")

  sp_corpus = make_corpus(5000, seed=1)
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    model = text.train_sentencepiece(sp_corpus, os.path.join(tmp, "bench"), vocab_size=1000)
    train_s = time.perf_counter() - t0
    sp = text.SentencePieceTokenizer(model)
    print(f"train_sentencepiece, 5000 texts, vocab<=1000: {train_s:.2f} s (vocab {sp.vocab_size})")
    seconds, ids = best_of(args.repeats, lambda: [sp.encode(t) for t in corpus])
    n_tokens = sum(len(x) for x in ids)
    print(f"sentencepiece encode, 1 thread:  {n_tokens / seconds:12,.0f} tokens/s  "
          f"{len(corpus) / seconds:10,.0f} texts/s")


if __name__ == "__main__":
  main()
