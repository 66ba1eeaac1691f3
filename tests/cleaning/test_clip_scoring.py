"""The cleaning job with the built-in CLIP scorers: `--scorer=clip:DIR --scorer_zh=chinese_clip:DIR`.

The end-to-end test runs the command line on two DirectRunner worker processes with tiny random checkpoints that
transformers wrote, and checks that exactly the pairs whose transformers-computed score (its own processor,
tokenizer and model; not our code path) is below the threshold of their language were dropped. Thresholds sit
between two scores far apart (> 1e-4) compared with the 1e-5 agreement of the two implementations. The inputs, the
reference scores and the job run as a background job from the session's start (tests/cleaning/clip_job.py).
"""
import json
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from qwenvl_jax.cleaning import CleanConfig, RawPair, Rejected, clean_batch, scoring
from qwenvl_jax.cleaning.report import closeness, score_bin, similarity_section
from tests import background
from tests.cleaning import clip_job
from tests.cleaning.cases import encode
from tests.clip.checkpoints import write_checkpoint
from tests.training.helpers import subprocess_env

EN, ZH = clip_job.EN, clip_job.ZH


def _clip_job(folder):
  """The commands of a job registered in tests/background.py: the command line on a checkpoint that does not exist
  (it must fail before reading any data); tests/cleaning/clip_job.py writes the inputs and transformers' scores; the
  cleaning command line runs on them."""
  env = subprocess_env(devices=1)
  bad = folder / "bad"
  bad.mkdir()
  (bad / "in.jsonl").write_text('{"text": "a red bus on the street", "image": "x.png"}\n')
  return [background.Command([sys.executable, "-m", "qwenvl_jax.clean", f"--input={bad / 'in.jsonl'}",
                              f"--output_dir={bad / 'out'}", f"--scorer=clip:{bad / 'no_such_checkpoint'}"],
                             env, cwd=bad, check=False),
          background.Command([sys.executable, "-m", "tests.cleaning.clip_job", str(folder)], env),
          background.Command([sys.executable] + clip_job.clean_argv(folder), env, cwd=folder)]


clip_run = background.finished_work(__name__, "clip_run", _clip_job)


@pytest.fixture(scope="module")
def scored_job(clip_run):
  """(report, kept ids, expected kept ids, hf scores, thresholds, checkpoint folders) of the job's run."""
  folder, (_, *results) = clip_run
  for result in results:
    assert result.returncode == 0, (result.args, result.stderr[-3000:])
  assert len(results) == 2, results
  reference = json.loads((folder / "reference.json").read_text(encoding="utf-8"))
  out = folder / "out"
  report = json.loads((out / "clean_report.json").read_text())
  builder = tfds.builder_from_directory(out / "cleaned_pairs" / "1.0.0")
  data = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  kept = {ex["id"].decode() for ex in data}
  return (report, kept, set(reference["expected"]), reference["hf_scores"], reference["thresholds"],
          (folder / "clip", folder / "chinese_clip"))


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


def test_bad_checkpoint_is_one_error_line_before_any_data_is_read(clip_run):
  folder, (result, *_) = clip_run
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "no_such_checkpoint does not exist" in last
  assert not (folder / "bad" / "out").exists()


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
