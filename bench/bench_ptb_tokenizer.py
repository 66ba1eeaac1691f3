"""Speed of CIDEr's PTB tokenizer (the Python port) against pycocoevalcap's Java jar, on the recorded captions.

  python bench/bench_ptb_tokenizer.py

Prints captions/s of both for batches of 100 to ~8000 captions (the recorded case list repeated); the jar's time
includes starting the JVM, as pycocoevalcap pays it on every call. Skips the jar without Java.
"""
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from qwenvl_jax.evaluation import ptb_tokenizer  # pylint: disable=wrong-import-position
from tests.evaluation import ptb_cases  # pylint: disable=wrong-import-position


def main():
  cases = ptb_cases.cases()
  ptb_tokenizer.tokenize(cases[:10])  # compile the rules once
  java = shutil.which("java") is not None
  for n in (100, 1000, 4000, 8000):
    texts = (cases * (n // len(cases) + 1))[:n]
    start = time.perf_counter()
    ptb_tokenizer.tokenize(texts)
    python_s = time.perf_counter() - start
    line = f"{n:5d} captions: python {n / python_s:8.0f}/s"
    if java:
      with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        ptb_cases.java_tokenize_lines(texts, workdir)
        java_s = time.perf_counter() - start
      line += f"   java jar {n / java_s:8.0f}/s   python/java time {python_s / java_s:5.2f}"
    print(line, flush=True)


if __name__ == "__main__":
  main()
