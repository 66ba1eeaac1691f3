"""A tiny model trained briefly by the real trainer on the synthetic data, scored by the real evaluation job on
held-out synthetic sets in the official formats (`evaluation.synthetic_sets`).

Captioning: clearly above chance, chance being the same job on random weights.
Grounding: after this brief training every answer is a well-formed box (random weights write none), but the
location is not learned yet — the tiny model needs thousands of steps for that. `bench/bench_synthetic_eval.py`
measures it against the chance level (the best image-blind box); see the inference notes for its figures.
The run is small enough for a CPU test: stage 2 at 56 px, 8 rows of 64 tokens, 120 steps of captions and
grounding.
"""
import importlib.util
import pathlib

import pytest

from qwenvl_jax.evaluation import grounding, runner, synthetic_sets
from qwenvl_jax.evaluation.tasks import get_task

REPO = pathlib.Path(__file__).resolve().parents[2]
SIZE = 56
STEPS = 120


def _stage2_config(workdir):
  spec = importlib.util.spec_from_file_location("stage2_config", REPO / "configs" / "stage2.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.workdir = str(workdir)
  c.update(dict(res=SIZE, batch_size=8, seq_len=64, max_images=2, total_steps=STEPS, log_every=40,
                progress_bar=False, tensorboard=False, synthetic_vocab_size=400))
  c.checkpoint.every = STEPS
  c.optimizer.warmup_steps = 5
  c.optimizer.lr = 3e-3
  c.data.num_workers = 0
  for task in c.data.mixture:
    c.data.mixture[task] = 1.0 if task in ("caption", "grounding") else 0.0
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  from qwenvl_jax.training import train  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("trained")
  result = train(_stage2_config(root / "run"))
  assert result.status == "completed" and result.step == STEPS
  return root


def _evaluate(root, task, data, checkpoint, name):
  c = runner.default_config(task)
  c.update(dict(output=str(root / f"{task}_{name}.json"), data_path=data, image_root=str(pathlib.Path(data).parent),
                model="tiny", tokenizer=str(root / "run" / "tokenizer.model"), checkpoint=checkpoint,
                image_size=SIZE, dtype="float32", per_device_batch_size=2, progress=False))
  return runner.run(c)


@pytest.mark.slow
def test_briefly_trained_model_captions_clearly_above_chance(trained):
  data = synthetic_sets.write_caption_set(trained / "captions", n=16, image_size=SIZE)
  params = str(trained / "run" / "checkpoints" / str(STEPS) / "params")
  result = _evaluate(trained, "flickr", data, params, "trained")
  chance = _evaluate(trained, "flickr", data, "", "random")
  assert len(result["predictions"]) == 16
  # Measured on this setup: about 0.6 trained vs about 0.002 for random weights.
  assert result["score"] > 0.2 and result["score"] > 20 * chance["score"], (result["score"], chance["score"])


@pytest.mark.slow
def test_briefly_trained_model_answers_grounding_prompts_with_boxes(trained):
  data = synthetic_sets.write_grounding_set(trained / "grounding", n=16, image_size=SIZE)
  params = str(trained / "run" / "checkpoints" / str(STEPS) / "params")
  result = _evaluate(trained, "refcoco_val", data, params, "trained")
  chance = _evaluate(trained, "refcoco_val", data, "", "random")
  unparsed = lambda r: sum(p["score"]["pred_box"] is None for p in r["predictions"])
  assert unparsed(result) == 0 and unparsed(chance) == 16, (unparsed(result), unparsed(chance))
  # Boxes inside the image, on the [0, 1000) grid the model was taught.
  for p in result["predictions"]:
    box = grounding.parse_box(p["prediction"])
    assert all(0 <= v < 1000 for v in box) and box[0] < box[2] and box[1] < box[3], p["prediction"]
  examples = get_task("refcoco_val").read(data)
  constant, _ = grounding.best_constant_box_accuracy([e.bbox for e in examples], [e.size for e in examples])
  assert 0 < constant < 0.5  # the chance level bench/bench_synthetic_eval.py compares against
