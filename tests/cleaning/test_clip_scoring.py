"""The cleaning job with the built-in CLIP scorers: `--scorer=clip:DIR --scorer_zh=chinese_clip:DIR`.

The end-to-end test runs the command line on two DirectRunner worker processes with tiny random checkpoints that
transformers wrote, and checks that exactly the pairs whose transformers-computed score (its own processor,
tokenizer and model; not our code path) is below the threshold of their language were dropped. Thresholds sit
between two scores far apart (> 1e-4) compared with the 1e-5 agreement of the two implementations.
"""
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from qwenvl_jax.cleaning import CleanConfig, RawPair, Rejected, clean_batch, scoring
from qwenvl_jax.cleaning.report import closeness, score_bin, similarity_section
from tests.cleaning.cases import encode
from tests.clip import reference
from tests.clip.checkpoints import write_checkpoint

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
EN = ["a red square on a table", "the green grass of a field and the sky", "a blue sky over the sea",
      "blue paint on an old wall", "red bricks of an old house", "a photo of a cat on the grass",
      "a dog running on the beach", "a green bus on the street"]
ZH = ["一只红色的狗在沙滩上", "绿色的草地和蓝色的天空", "公交车停在路边的照片", "一只猫在草地上睡觉", "蓝色的大海和白色的云",
      "红色的房子在山上"]


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
  assert hi - lo > 1e-4, ordered
  return (lo + hi) / 2


@pytest.fixture(scope="module")
def scored_job(tmp_path_factory):
  """Runs the CLI once on 2 worker processes; returns (report, kept ids, expected kept ids, hf scores, thresholds)."""
  tmp = tmp_path_factory.mktemp("clip_job")
  clip_dir, cn_dir = tmp / "clip", tmp / "chinese_clip"
  clip_hf, cn_hf = write_checkpoint(clip_dir, "clip", seed=5), write_checkpoint(cn_dir, "chinese_clip", seed=6)
  (tmp / "img").mkdir()
  rows, images = [], {}
  for i, text in enumerate(EN + ZH):
    (tmp / "img" / f"{i}.png").write_bytes(_image(i))
    images[f"p{i}"] = PIL.Image.open(tmp / "img" / f"{i}.png").convert("RGB")
    rows.append({"id": f"p{i}", "text": text, "image": f"img/{i}.png"})
  # Dropped before scoring: too short, and a language with no place in the dataset.
  rows.append({"id": "short", "text": "hi", "image": "img/0.png"})
  rows.append({"id": "german", "text": "ein roter Hund läuft über die Straße", "image": "img/1.png"})
  half = len(rows) // 2
  for name, part in (("a.jsonl", rows[:half]), ("b.jsonl", rows[half:])):
    (tmp / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))

  ids = {"en": [f"p{i}" for i in range(len(EN))], "zh": [f"p{len(EN) + i}" for i in range(len(ZH))]}
  hf_scores = {}
  for language, model, folder, family, length in (("en", clip_hf, clip_dir, "clip", 77),
                                                  ("zh", cn_hf, cn_dir, "chinese_clip", 52)):
    texts = EN if language == "en" else ZH
    scores = reference.pair_scores(model, folder, family, [images[i] for i in ids[language]], texts, length)
    hf_scores.update(dict(zip(ids[language], scores.tolist())))
  thresholds = {lang: _midpoint_threshold([hf_scores[i] for i in ids[lang]]) for lang in ids}
  expected = {i for lang in ids for i in ids[lang] if hf_scores[i] >= thresholds[lang]}

  out = tmp / "out"
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run(
      [sys.executable, "-m", "qwenvl_jax.clean", f"--input={tmp / '*.jsonl'}", f"--output_dir={out}",
       "--id_key=id", "--sample_size=2", f"--scorer=clip:{clip_dir}", f"--scorer_zh=chinese_clip:{cn_dir}",
       f"--min_similarity={thresholds['en']}", f"--min_similarity_zh={thresholds['zh']}",
       "--beam_pipeline_options=direct_num_workers=2,direct_running_mode=multi_processing"],
      cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((out / "clean_report.json").read_text())
  builder = tfds.builder_from_directory(out / "cleaned_pairs" / "1.0.0")
  data = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  kept = {ex["id"].decode() for ex in data}
  return report, kept, expected, hf_scores, thresholds, (clip_dir, cn_dir)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_job_drops_exactly_the_pairs_transformers_scores_below_the_threshold(scored_job):
  report, kept, expected, hf_scores, _, (clip_dir, cn_dir) = scored_job
  assert kept == expected
  assert report["rejected"]["low_similarity"] == len(hf_scores) - len(expected) > 0
  assert report["rejected"]["text_too_short"] == 1 and report["rejected"]["language"] == 1
  assert report["scorers"] == {"*": f"clip:{clip_dir}", "zh": f"chinese_clip:{cn_dir}"}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_report_has_a_histogram_per_language_and_samples_around_the_threshold(scored_job):
  report, _, _, hf_scores, thresholds, _ = scored_job
  by_language = report["similarity"]["by_language"]
  assert set(by_language) == {"en", "zh"}
  for language, section in by_language.items():
    mine = {i: s for i, s in hf_scores.items() if (int(i[1:]) >= len(EN)) == (language == "zh")}
    t = thresholds[language]
    below = sorted((s for s in mine.values() if s < t), reverse=True)
    above = sorted(s for s in mine.values() if s >= t)
    assert section["threshold"] == pytest.approx(t)
    assert (section["scored"], section["below"], section["at_or_above"]) == (len(mine), len(below), len(above))
    assert sum(section["histogram"].values()) == len(mine)
    # The histogram bins of transformers' scores (a score within 1e-5 of a bin edge may fall on either side).
    want_bins = {score_bin(s) for s in mine.values() if abs(s / 0.01 - round(s / 0.01)) > 1e-3}
    assert want_bins <= set(section["histogram"])
    # Samples: the pairs nearest the threshold on each side, nearest first.
    np.testing.assert_allclose([s["score"] for s in section["samples_below"]], below[:2], atol=1e-5)
    np.testing.assert_allclose([s["score"] for s in section["samples_above"]], above[:2], atol=1e-5)


def test_bad_checkpoint_is_one_error_line_before_any_data_is_read(tmp_path):
  (tmp_path / "in.jsonl").write_text('{"text": "a red bus on the street", "image": "x.png"}\n')
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run(
      [sys.executable, "-m", "qwenvl_jax.clean", f"--input={tmp_path / 'in.jsonl'}",
       f"--output_dir={tmp_path / 'out'}", f"--scorer=clip:{tmp_path / 'no_such_checkpoint'}"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "no_such_checkpoint does not exist" in last
  assert not (tmp_path / "out").exists()


def test_wrongly_shaped_checkpoint_fails_when_the_scorer_is_named(tmp_path):
  folder = tmp_path / "ckpt"
  write_checkpoint(folder, "clip")
  config = json.loads((folder / "config.json").read_text())
  config["vision_config"]["intermediate_size"] = 40
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="mlp.fc1.weight has shape"):
    scoring.make_factory(f"clip:{folder}")
  with pytest.raises(ValueError, match="names no checkpoint"):
    scoring.make_factory("chinese_clip:")
  assert isinstance(scoring.make_factory("qwenvl_jax.cleaning.scoring:DominantColorScorer"), scoring.SpecFactory)


def _pair(i: int, text: str) -> RawPair:
  return RawPair(key=f"k{i}", source=f"s:{i}", row={"text": text, "image": encode()}, root="/")


def test_captions_go_to_the_scorer_of_their_language_with_its_threshold():
  calls = {}

  def scorer(name, value):
    def score(images, texts):
      calls[name] = list(texts)
      return [value] * len(texts)
    return score

  cfg = CleanConfig(min_similarity=0.5, min_similarity_by_language={"zh": 0.2})
  pairs = [_pair(0, EN[0]), _pair(1, ZH[0]), _pair(2, EN[1]), _pair(3, ZH[1])]
  outs = clean_batch(pairs, cfg, scorer("default", 0.3), {"zh": scorer("zh", 0.3)})
  assert calls == {"default": [EN[0], EN[1]], "zh": [ZH[0], ZH[1]]}
  # 0.3 is below the default threshold 0.5 but above the Chinese one 0.2.
  assert [isinstance(o, Rejected) for o in outs] == [True, False, True, False]
  assert [o.language for o in outs] == ["en", "zh", "en", "zh"] and all(o.score == 0.3 for o in outs)
  # Without a scorer for its language and no default, a pair is not scored.
  calls.clear()
  outs = clean_batch(pairs, cfg, None, {"zh": scorer("zh", 0.9)})
  assert calls == {"zh": [ZH[0], ZH[1]]} and [o.score for o in outs] == [None, 0.9, None, 0.9]


def test_similarity_section_and_bins():
  assert [score_bin(s) for s in (0.28, 0.29, 0.2899, -0.001, 1.0)] == ["0.28", "0.29", "0.28", "-0.01", "1.00"]
  records = [{"score": s, "threshold": 0.3, "rank": f"{i:040x}", "sample": {"score": s}}
             for i, s in enumerate((0.1, 0.29, 0.25))]
  assert sorted(records, key=closeness, reverse=True)[0]["score"] == 0.29
  section = similarity_section(histogram=[(("en", "below", "0.29"), 2), (("en", "above", "0.31"), 1)],
                               near_threshold=[(("en", "below"), records)], sample_size=2)
  en = section["by_language"]["en"]
  assert (en["scored"], en["below"], en["at_or_above"], en["threshold"]) == (3, 2, 1, 0.3)
  assert [s["score"] for s in en["samples_below"]] == [0.29, 0.25]
