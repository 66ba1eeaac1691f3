"""Throughput of the evaluation metrics on synthetic data (CPU), and CIDEr vs pycocoevalcap when installed.

Prints seconds per call for a Flickr30K-sized caption set (1000 images x 5 references), the PTB
normalisation (Python vs pycocoevalcap's Java jar when Java is present), a VQAv2-sized accuracy (10 answers x
N questions) and grounding accuracy.
Usage (repository root): python -m bench.bench_eval_metrics [--images 1000] [--questions 20000]
"""
import argparse
import pathlib
import random
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runnable as python bench/X.py

from qwenvl_jax.evaluation import cider, grounding, ptb_tokenizer, vqa

WORDS = ("a the man woman dog cat riding sitting on in with red blue green street table park bike beach "
         "ball of and two three people standing near large small white black water grass tree").split()


def _caption(rng):
  text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
  return text[0].upper() + text[1:] + rng.choice([".", "", " .", "!"])


def _time(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--questions", type=int, default=20000)
  args = parser.parse_args()
  rng = random.Random(0)
  refs = {i: [_caption(rng) for _ in range(5)] for i in range(args.images)}
  cands = {i: _caption(rng) for i in range(args.images)}
  flat = [c for i in refs for c in refs[i]] + list(cands.values())

  seconds, _ = _time(lambda: ptb_tokenizer.tokenize(flat))
  print(f"ptb_tokenizer.tokenize (python): {len(flat)} captions in {seconds:.3f} s")
  try:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocoevalcap.cider.cider import Cider
  except ImportError:
    PTBTokenizer = Cider = None
  if PTBTokenizer is not None and shutil.which("java"):
    seconds, _ = _time(lambda: PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(flat)}))
    print(f"pycocoevalcap PTBTokenizer (java): {len(flat)} captions in {seconds:.3f} s")

  seconds, (score, _) = _time(lambda: cider.cider_from_raw(cands, refs))
  print(f"cider_from_raw: {args.images} images x 5 refs in {seconds:.3f} s (CIDEr {score:.4f})")
  tok_refs = {i: ptb_tokenizer.tokenize(v) for i, v in refs.items()}
  tok_cands = {i: ptb_tokenizer.tokenize([c])[0] for i, c in cands.items()}
  seconds, (score, _) = _time(lambda: cider.cider_d(tok_cands, tok_refs))
  print(f"cider_d (tokenized): {seconds:.3f} s (CIDEr {score:.6f})")
  if Cider is not None:
    seconds, (ref_score, _) = _time(lambda: Cider().compute_score(tok_refs, {i: [c] for i, c in tok_cands.items()}))
    print(f"pycocoevalcap Cider (tokenized): {seconds:.3f} s (CIDEr {ref_score:.6f}, |diff| "
          f"{abs(ref_score - score):.2e})")

  answers = ["yes", "no", "2", "red", "dog", "two", "Yes.", "1,000"]
  gts = [[rng.choice(answers) for _ in range(10)] for _ in range(args.questions)]
  preds = [rng.choice(answers) for _ in range(args.questions)]
  seconds, result = _time(lambda: vqa.vqa_accuracy(preds, gts))
  print(f"vqa_accuracy: {args.questions} questions in {seconds:.3f} s (acc {result['overall']})")

  texts = [f"({rng.randint(0, 500)},{rng.randint(0, 500)}),({rng.randint(500, 999)},{rng.randint(500, 999)})"
           for _ in range(args.questions)]
  boxes = [[10.0, 20.0, 300.0, 400.0]] * args.questions
  seconds, result = _time(lambda: grounding.grounding_accuracy(texts, boxes, [(640, 480)] * args.questions))
  print(f"grounding_accuracy: {args.questions} boxes in {seconds:.3f} s (acc {result['accuracy']:.4f})")


if __name__ == "__main__":
  main()
