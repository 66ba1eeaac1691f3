"""Tests of the few-shot draw: the shot pool per task kind, shots as a pure function of (seed, query id) whatever
the sharding or batch order, never the query itself, and the prompt text in front of the query."""
import json

import pytest

from qwenvl_jax.evaluation import EvalDataError, EvalExample, get_task, results
from qwenvl_jax.evaluation import few_shot
from qwenvl_jax.evaluation.readers import read_caption_json


def _vqa(n, *, images=None):
  """n VQA examples with ids 100 + i on images i % images (default: one image each)."""
  return [EvalExample(example_id=100 + i, image=f"img/{i % (images or n)}.png",
                      fields={"question": f"question {i}?"}, references=(f"answer {i}", "other"))
          for i in range(n)]


def test_caption_pool_has_one_shot_per_caption(tmp_path):
  path = tmp_path / "train.json"
  path.write_text(json.dumps({
      "images": [{"id": 1, "image": "a.jpg"}, {"id": 2, "image": "b.jpg"}, {"id": 3, "image": "c.jpg"}],
      "annotations": [{"image_id": 1, "caption": "a cat", "image": "a.jpg"},
                      {"image_id": 1, "caption": "a small cat", "image": "a.jpg"},
                      {"image_id": 2, "caption": "a dog", "image": "b.jpg"}]}))
  pool = few_shot.shot_pool(get_task("flickr"), read_caption_json(path))
  # As the reference's annotations[] (image, caption): image 3 has no caption, so it is no shot.
  assert [(s.example_id, s.image, s.references) for s in pool] == [
      (1, "a.jpg", ("a cat",)), (1, "a.jpg", ("a small cat",)), (2, "b.jpg", ("a dog",))]


def test_vqa_pool_answers_with_the_first_answer_and_skips_unanswered():
  examples = _vqa(3) + [EvalExample(example_id=7, image="x.png", fields={"question": "q?"})]
  pool = few_shot.shot_pool(get_task("vqav2_val"), examples)
  assert [(s.example_id, s.references) for s in pool] == [(100, ("answer 0",)), (101, ("answer 1",)),
                                                          (102, ("answer 2",))]
  with pytest.raises(EvalDataError, match="none of the 1 few-shot examples has an answer"):
    few_shot.shot_pool(get_task("vqav2_val"), examples[3:])


@pytest.mark.parametrize("task", ["refcoco_val", "scienceqa_test_img"])
def test_only_captioning_and_vqa_take_shots(task):
  with pytest.raises(ValueError, match="few-shot prompts exist only for captioning and VQA"):
    few_shot.shot_pool(get_task(task), _vqa(2))


def test_draws_are_a_function_of_seed_and_query_id_only():
  examples = _vqa(40)
  pool = few_shot.shot_pool(get_task("okvqa_val"), examples)
  sampler = few_shot.ShotSampler(pool, k=3, seed=0)
  drawn = {e.example_id: [s.example_id for s in sampler.draw(e)] for e in examples}
  assert all(len(set(ids)) == 3 for ids in drawn.values())  # without replacement
  # A fresh sampler, queries visited per shard (as 3 processes would) in reverse batch order: the same shots.
  fresh = few_shot.ShotSampler(list(pool), k=3, seed=0)
  for index in range(3):
    for e in reversed(results.shard(examples, 3, index)):
      assert [s.example_id for s in fresh.draw(e)] == drawn[e.example_id]
  assert len({tuple(ids) for ids in drawn.values()}) > 30  # queries get different shots
  other_seed = few_shot.ShotSampler(pool, k=3, seed=1)
  assert sum(drawn[e.example_id] != [s.example_id for s in other_seed.draw(e)] for e in examples) > 30
  # The id decides, not the position: the same query read from another file draws the same shots.
  moved = EvalExample(example_id=105, image="img/5.png", fields={"question": "question 5?"})
  assert [s.example_id for s in sampler.draw(moved)] == drawn[105]


def test_the_query_is_never_its_own_shot():
  # The training file is the evaluated file; examples 100 + i and 100 + i + 3 share image i % 3.
  examples = _vqa(6, images=3)
  sampler = few_shot.ShotSampler(few_shot.shot_pool(get_task("okvqa_val"), examples), k=4, seed=0)
  for e in examples:
    shots = sampler.draw(e)
    assert all(s.example_id != e.example_id and s.image != e.image for s in shots)
    assert sorted(s.example_id for s in shots) == sorted(x.example_id for x in examples if x.image != e.image)
  with pytest.raises(EvalDataError, match="only 4 few-shot examples remain for example 100"):
    few_shot.ShotSampler(few_shot.shot_pool(get_task("okvqa_val"), examples), k=5, seed=0).draw(examples[0])
  # Caption pools hold one shot per caption, all under the image id: none of them is drawn for that image.
  captions = [EvalExample(example_id=i, image=f"{i}.jpg", references=("x", "y")) for i in range(3)]
  sampler = few_shot.ShotSampler(few_shot.shot_pool(get_task("flickr"), captions), k=4, seed=0)
  assert {s.example_id for s in sampler.draw(captions[1])} == {0, 2}


def test_two_shot_vqa_prompt():
  task = get_task("vqav2_val")
  shots = [EvalExample(example_id=1, image="train/cat.jpg", fields={"question": "What animal is this?"},
                       references=("cat",)),
           EvalExample(example_id=2, image="train/bus.jpg", fields={"question": "What colour is the bus?"},
                       references=("red",))]
  query = EvalExample(example_id=9, image="val/dog.jpg", fields={"question": "How many dogs?"})
  assert few_shot.few_shot_prompt(task, query, shots) == (
      "<img>train/cat.jpg</img>What animal is this? Answer: cat"
      "<img>train/bus.jpg</img>What colour is the bus? Answer: red"
      "<img>val/dog.jpg</img>How many dogs? Answer:")
  assert few_shot.few_shot_prompt(task, query, []) == task.prompt(query)
