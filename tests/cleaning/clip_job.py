"""`python -m tests.cleaning.clip_job FOLDER`: the inputs of the cleaning job with the built-in CLIP scorers and what
transformers says of them, as the first command of a background job (tests/background.py; the second is the job's
command line, `clean_argv`), so that writing the checkpoints, transformers' scoring and the two-worker job run on
the core the other tests leave idle.

It writes into FOLDER tiny random CLIP and Chinese-CLIP checkpoints (transformers' own `save_pretrained`), a noise
picture per pair, two JSONL shards, and `reference.json`: transformers' score of each pair (its own processor,
tokenizer and model; not our code path), each language's threshold (between its two middle scores) and the ids a
correct job keeps. The thresholds reach the job's command line through `thresholds.flags` (absl's --flagfile).
"""
import io
import json
import pathlib
import sys

import numpy as np
import PIL.Image

EN = ["a red square on a table", "the green grass of a field and the sky", "a blue sky over the sea",
      "blue paint on an old wall", "red bricks of an old house", "a photo of a cat on the grass",
      "a dog running on the beach", "a green bus on the street"]
ZH = ["一只红色的狗在沙滩上", "绿色的草地和蓝色的天空", "公交车停在路边的照片", "一只猫在草地上睡觉", "蓝色的大海和白色的云",
      "红色的房子在山上"]


def clean_argv(folder: pathlib.Path) -> list[str]:
  """The job's command line (after `python`), on 2 DirectRunner worker processes, its output in FOLDER/out."""
  return ["-m", "qwenvl_jax.clean", f"--input={folder / '*.jsonl'}", f"--output_dir={folder / 'out'}", "--id_key=id",
          "--sample_size=2", f"--scorer=clip:{folder / 'clip'}", f"--scorer_zh=chinese_clip:{folder / 'chinese_clip'}",
          f"--flagfile={folder / 'thresholds.flags'}",
          "--beam_pipeline_options=direct_num_workers=2,direct_running_mode=multi_processing"]


def _image(i: int) -> bytes:
  """A noise PNG of its own size (so scores spread): 120 wide, 100 + 7i high."""
  rng = np.random.default_rng(100 + i)
  out = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 256, (100 + 7 * i, 120, 3), dtype=np.uint8)).save(out, "PNG")
  return out.getvalue()


def _midpoint_threshold(scores: list[float]) -> float:
  """A threshold between the two middle scores, refusing scores too close together to decide robustly."""
  ordered = sorted(scores)
  lo, hi = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
  if hi - lo <= 1e-4:
    raise ValueError(f"the two middle scores are too close to put a threshold between them: {ordered}")
  return (lo + hi) / 2


def main(folder: pathlib.Path) -> None:
  from tests.clip import reference  # pylint: disable=import-outside-toplevel  (torch: only in this command)
  from tests.clip.checkpoints import write_checkpoint  # pylint: disable=import-outside-toplevel
  clip_dir, cn_dir = folder / "clip", folder / "chinese_clip"
  clip_hf, cn_hf = write_checkpoint(clip_dir, "clip", seed=5), write_checkpoint(cn_dir, "chinese_clip", seed=6)
  (folder / "img").mkdir()
  rows, images = [], {}
  for i, text in enumerate(EN + ZH):
    (folder / "img" / f"{i}.png").write_bytes(_image(i))
    images[f"p{i}"] = PIL.Image.open(folder / "img" / f"{i}.png").convert("RGB")
    rows.append({"id": f"p{i}", "text": text, "image": f"img/{i}.png"})
  # Dropped before scoring: too short, and a language with no place in the dataset.
  rows.append({"id": "short", "text": "hi", "image": "img/0.png"})
  rows.append({"id": "german", "text": "ein roter Hund läuft über die Straße", "image": "img/1.png"})
  half = len(rows) // 2
  for name, part in (("a.jsonl", rows[:half]), ("b.jsonl", rows[half:])):
    (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")

  ids = {"en": [f"p{i}" for i in range(len(EN))], "zh": [f"p{len(EN) + i}" for i in range(len(ZH))]}
  hf_scores = {}
  for language, model, family_dir, family, length in (("en", clip_hf, clip_dir, "clip", 77),
                                                      ("zh", cn_hf, cn_dir, "chinese_clip", 52)):
    texts = EN if language == "en" else ZH
    scores = reference.pair_scores(model, family_dir, family, [images[i] for i in ids[language]], texts, length)
    hf_scores.update(dict(zip(ids[language], scores.tolist())))
  thresholds = {lang: _midpoint_threshold([hf_scores[i] for i in ids[lang]]) for lang in ids}
  expected = sorted(i for lang in ids for i in ids[lang] if hf_scores[i] >= thresholds[lang])
  (folder / "thresholds.flags").write_text(
      f"--min_similarity={thresholds['en']!r}\n--min_similarity_zh={thresholds['zh']!r}\n", encoding="utf-8")
  (folder / "reference.json").write_text(json.dumps(
      {"hf_scores": hf_scores, "thresholds": thresholds, "expected": expected}), encoding="utf-8")


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]))
