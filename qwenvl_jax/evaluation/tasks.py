"""The evaluation task registry: per task its official prompt, decoding lengths, data format and metric.

Everything here follows Qwen-VL's `eval_mm` scripts (RECIPES §2). The prompts are raw base-model prompts (no
ChatML), also for the Chat model; the image path is embedded as `<img>{image}</img>` and turned into an image
span by the tokenizer/data code. Decoding is greedy; `min_new_tokens` forbids end-of-text before that many
new tokens. `length_penalty` of the official calls has no effect with greedy search and is not recorded.

Scores are on the scale the official scripts print: CIDEr as pycocoevalcap (papers print 100x), VQA accuracy
in percent (2 decimals), everything else as a fraction in [0, 1]. Tasks with metric `None` are submission
splits: they produce predictions only.

Usage:
  task = get_task("textvqa_val")
  examples = task.read("data/textvqa/textvqa_val.jsonl",
                       annotation_path="data/textvqa/textvqa_val_annotations.json")
  prompts = [task.prompt(e) for e in examples]
  ... generate ...
  result = task.score(examples, predictions)      # {"metric", "score", "details", "per_example"}
"""
import dataclasses
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from qwenvl_jax import errors
from qwenvl_jax.evaluation import anls as anls_lib
from qwenvl_jax.evaluation import cider as cider_lib
from qwenvl_jax.evaluation import grounding as grounding_lib
from qwenvl_jax.evaluation import multiple_choice as mc_lib
from qwenvl_jax.evaluation import readers
from qwenvl_jax.evaluation import relaxed as relaxed_lib
from qwenvl_jax.evaluation import tfds_readers
from qwenvl_jax.evaluation import vqa as vqa_lib
from qwenvl_jax.evaluation.readers import EvalDataError, EvalExample

CAPTION_PROMPT = "<img>{image}</img>Describe the image in English:"
VQA_PROMPT = "<img>{image}</img>{question} Answer:"
GROUNDING_PROMPT = "<img>{image}</img><ref>{expr}</ref><box>"
MULTIPLE_CHOICE_PROMPT = "<img>{image}</img>Context: {hint}\nQuestion: {question}\nOptions: {options}\nAnswer:"

KINDS = ("caption", "vqa", "grounding", "multiple_choice")
METRICS = ("cider", "vqa_accuracy", "anls", "relaxed_accuracy", "exact_match", "gqa_exact_match",
           "grounding_accuracy", "choice_accuracy")
_READERS: Dict[str, Callable[..., List[EvalExample]]] = {
    "caption": readers.read_caption_json,
    "vqa": readers.read_vqa_jsonl,
    "grounding": readers.read_grounding_jsonl,
    "multiple_choice": readers.read_multiple_choice_jsonl,
}
_PROMPTS = {"caption": CAPTION_PROMPT, "vqa": VQA_PROMPT, "grounding": GROUNDING_PROMPT,
            "multiple_choice": MULTIPLE_CHOICE_PROMPT}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalTask:
  """One official evaluation task.

  Attributes:
    name: the official dataset key (`flickr`, `vqav2_val`, `refcoco_testA`, ...).
    kind: `caption`, `vqa`, `grounding` or `multiple_choice` (which reader and prompt).
    metric: one of `METRICS`, or None for a submission split.
    max_new_tokens, min_new_tokens: greedy decoding lengths of the official script (0 for multiple choice,
      which ranks options by loss instead of generating).
    data_file: the test file in the official `data/` layout (RECIPES §2.10); users pass their own path.
    annotation_file: the official VQA annotation JSON the VQA accuracy needs, if any.
  """
  name: str
  kind: str
  metric: Optional[str]
  max_new_tokens: int
  min_new_tokens: int
  data_file: str
  annotation_file: Optional[str] = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
    if self.metric is not None and self.metric not in METRICS:
      raise ValueError(f"task {self.name!r}: metric must be one of {METRICS} or None, got {self.metric!r}")
    if not 0 <= self.min_new_tokens <= self.max_new_tokens:
      raise ValueError(f"task {self.name!r}: need 0 <= min_new_tokens <= max_new_tokens, got "
                       f"{self.min_new_tokens}, {self.max_new_tokens}")

  @property
  def prompt_template(self) -> str:
    return _PROMPTS[self.kind]

  @property
  def generates(self) -> bool:
    """False for multiple choice, which scores options by likelihood instead of generating."""
    return self.kind != "multiple_choice"

  def prompt(self, example: EvalExample) -> str:
    """The official raw prompt of one example (`<img>{image}</img>...`)."""
    fields = dict(example.fields)
    if self.kind == "multiple_choice":
      fields["options"] = mc_lib.format_options(example.choices)
    try:
      return self.prompt_template.format(image=example.image, **fields)
    except KeyError as e:
      raise EvalDataError(f"task {self.name!r}: example {example.example_id!r} lacks the prompt field {e}") from e

  def few_shot_prefix(self, shots: Sequence[EvalExample]) -> str:
    """Few-shot prompt prefix: each shot's prompt followed by " {its first reference}" (captions and VQA).

    Which shots to draw (the reference samples k random training examples per query, seeded) is decided by
    `few_shot.ShotSampler`; this only formats them.
    """
    if self.kind not in ("caption", "vqa"):
      raise ValueError(f"task {self.name!r}: few-shot prompts exist only for captioning and VQA")
    parts = []
    for shot in shots:
      if not shot.references:
        raise EvalDataError(f"few-shot example {shot.example_id!r} has no answer/caption to show")
      parts.append(f"{self.prompt(shot)} {shot.references[0]}")
    return "".join(parts)

  def read(self, data_path: Union[str, os.PathLike], *,
           annotation_path: Optional[Union[str, os.PathLike]] = None, tfds_data_dir: Optional[str] = None,
           tfds_split: str = "test") -> List[EvalExample]:
    """Reads the task's data file, or a prepared TFDS dataset; for VQA accuracy also the annotation JSON.

    Args:
      data_path: a file in the task's official format, or `tfds:NAME[/CONFIG][:VERSION][:SPLIT]` /
        `array_record:FOLDER[:SPLIT]` (`tfds_readers`: the public schemas of the task's kind).
      annotation_path: the official VQA annotation JSON with the human answers (VQA tasks only). Without it, VQA
        accuracy uses the data's own answers, which must then be the human answers (the official converted jsonl
        files keep a single answer: pass the annotation file; TFDS `answers` sequences hold them all).
      tfds_data_dir: TFDS data_dir of `tfds:` specs (None: TFDS's default).
      tfds_split: the split of a TFDS spec that names none.
    """
    if tfds_readers.is_spec(data_path):
      examples = tfds_readers.read_examples(data_path, self.kind, data_dir=tfds_data_dir, default_split=tfds_split)
    else:
      examples = _READERS[self.kind](data_path)
    if annotation_path is not None:
      if self.kind != "vqa":
        raise errors.ConfigError(f"task {self.name!r} ({self.kind}) reads no annotation file (annotation_path="
                                 f"{os.fspath(annotation_path)}): only VQA tasks do; its ground truth is in its data "
                                 "file", hint="leave annotation_path empty")
      annotations = readers.read_vqa_annotations(annotation_path)
      examples = readers.attach_vqa_annotations(examples, annotations, source=os.fspath(annotation_path))
    return examples

  def score(self, examples: Sequence[EvalExample], predictions: Sequence[Any]) -> Dict[str, Any]:
    """The task metric of predictions aligned with examples.

    Args:
      examples: the evaluated examples.
      predictions: per example the generated text (str), or for multiple choice the chosen index (int).

    Returns:
      {"metric": name, "score": float or None, "details": {...}, "per_example": [...] or None}.

    Raises:
      ValueError: misaligned inputs, a prediction of the wrong type, or examples without the ground truth
        the metric needs (naming the first such example).
    """
    if len(examples) != len(predictions):
      raise ValueError(f"task {self.name!r}: {len(predictions)} predictions for {len(examples)} examples")
    want = int if self.kind == "multiple_choice" else str
    for e, p in zip(examples, predictions):
      if isinstance(p, bool) or not isinstance(p, want):
        raise ValueError(f"task {self.name!r}: the prediction for example {e.example_id!r} must be "
                         f"{want.__name__}, got {p!r}")
    if self.metric is None:
      return {"metric": None, "score": None, "details": {}, "per_example": None}
    self.check_ground_truth(examples)
    return _SCORERS[self.metric](self, list(examples), list(predictions))

  def same_dataset(self, *, scored: bool) -> list[str]:
    """The other tasks of this task's dataset (the name up to its first '_': `docvqa_val`, `docvqa_test`) and kind
    that have a metric (`scored`) or have none (submission splits), for hints that name the task to use."""
    return [t.name for t in _TASK_LIST if t.name != self.name and t.kind == self.kind
            and (t.metric is not None) == scored and t.name.split("_")[0] == self.name.split("_")[0]]

  def check_ground_truth(self, examples: Sequence[EvalExample]) -> None:
    """Refuses examples without the ground truth the metric needs (a test split's file, VQA accuracy without the
    annotation file): the runner calls it before the model loads, not only after every example was generated.

    Raises:
      EvalDataError: naming the first example that lacks it, or the missing annotation file.
    """
    if self.metric is None:
      return
    what, present = _GROUND_TRUTH[self.metric]
    for e in examples:
      if not present(e):
        submission = self.same_dataset(scored=False)
        raise EvalDataError(f"task {self.name!r}: example {e.example_id!r} has no {what}, which metric "
                            f"{self.metric!r} needs",
                            "is it a test split without answers? "
                            + (f"its predictions alone come from task {' or '.join(submission)}" if submission
                               else "give the file with the ground truth"))
    if self.metric == "vqa_accuracy" and all(len(e.references) == 1 for e in examples):
      raise EvalDataError(f"task {self.name!r}: every example has a single answer; VQA accuracy needs the human "
                          f"answers of the official annotation file ({self.annotation_file or 'annotation_path'})",
                          "pass it as annotation_path")


def _has_references(e: EvalExample) -> bool:
  return bool(e.references)


# Per metric: the ground truth every example needs, and how to tell it is there (`EvalTask.check_ground_truth`).
_GROUND_TRUTH = {
    "cider": ("reference captions", _has_references),
    "vqa_accuracy": ("human answers", _has_references),
    "anls": ("answers", _has_references),
    "relaxed_accuracy": ("answers", _has_references),
    "exact_match": ("answers", _has_references),
    "gqa_exact_match": ("answers", _has_references),
    "grounding_accuracy": ("bbox and size", lambda e: e.bbox is not None and e.size is not None),
    "choice_accuracy": ("answer index", lambda e: e.answer_index is not None),
}


def _score_cider(task, examples, predictions):
  ids = [e.example_id for e in examples]
  score, per_image = cider_lib.cider_from_raw(dict(zip(ids, predictions)),
                                              {e.example_id: list(e.references) for e in examples})
  # Which caption normalisation produced the score: the Python port of pycocoevalcap's Java PTBTokenizer.
  return {"metric": "cider", "score": score, "details": {"tokenizer": cider_lib.ptb_tokenizer.NAME},
          "per_example": [per_image[i] for i in ids]}


def _score_vqa(task, examples, predictions):
  qtypes = [e.meta.get("question_type") for e in examples]
  atypes = [e.meta.get("answer_type") for e in examples]
  result = vqa_lib.vqa_accuracy(predictions, [list(e.references) for e in examples],
                                question_types=qtypes if all(t is not None for t in qtypes) else None,
                                answer_types=atypes if all(t is not None for t in atypes) else None)
  details = {k: v for k, v in result.items() if k.startswith("per_") and k != "per_question"}
  return {"metric": "vqa_accuracy", "score": result["overall"], "details": details,
          "per_example": result["per_question"]}


def _score_with(fn, key):
  def scorer(task, examples, predictions):
    result = fn(predictions, [list(e.references) for e in examples])
    return {"metric": task.metric, "score": result[key], "details": {}, "per_example": result["per_example"]}
  return scorer


def _score_grounding(task, examples, predictions):
  result = grounding_lib.grounding_accuracy(predictions, [e.bbox for e in examples], [e.size for e in examples])
  return {"metric": "grounding_accuracy", "score": result["accuracy"], "details": {"unparsed": result["unparsed"]},
          "per_example": result["per_example"]}


def _score_choice(task, examples, predictions):
  for e, p in zip(examples, predictions):
    if not 0 <= p < len(e.choices):
      raise ValueError(f"task {task.name!r}: example {e.example_id!r}: chosen index {p} outside its "
                       f"{len(e.choices)} choices")
  result = mc_lib.choice_accuracy(predictions, [e.answer_index for e in examples])
  return {"metric": "choice_accuracy", "score": result["accuracy"], "details": {},
          "per_example": result["per_example"]}


_SCORERS = {
    "cider": _score_cider,
    "vqa_accuracy": _score_vqa,
    "anls": _score_with(anls_lib.anls, "anls"),
    "relaxed_accuracy": _score_with(relaxed_lib.relaxed_accuracy, "relaxed_accuracy"),
    "exact_match": _score_with(vqa_lib.exact_match_accuracy, "accuracy"),
    "gqa_exact_match": _score_with(vqa_lib.gqa_accuracy, "accuracy"),
    "grounding_accuracy": _score_grounding,
    "choice_accuracy": _score_choice,
}


def _caption(name, data_file):
  return EvalTask(name=name, kind="caption", metric="cider", max_new_tokens=30, min_new_tokens=8,
                  data_file=data_file)


def _vqa(name, data_file, metric, max_new_tokens, annotation_file=None):
  return EvalTask(name=name, kind="vqa", metric=metric, max_new_tokens=max_new_tokens, min_new_tokens=1,
                  data_file=data_file, annotation_file=annotation_file)


def _grounding(name, data_file):
  return EvalTask(name=name, kind="grounding", metric="grounding_accuracy", max_new_tokens=28, min_new_tokens=10,
                  data_file=data_file)


_TASK_LIST = [
    _caption("flickr", "data/flickr30k/flickr30k_karpathy_test.json"),
    _caption("nocaps", "data/nocaps/nocaps_val.json"),
    _vqa("vqav2_val", "data/vqav2/vqav2_val.jsonl", "vqa_accuracy", 10,
         "data/vqav2/v2_mscoco_val2014_annotations.json"),
    _vqa("vqav2_testdev", "data/vqav2/vqav2_testdev.jsonl", None, 10),
    _vqa("okvqa_val", "data/okvqa/okvqa_val.jsonl", "vqa_accuracy", 10,
         "data/okvqa/mscoco_val2014_annotations.json"),
    _vqa("textvqa_val", "data/textvqa/textvqa_val.jsonl", "vqa_accuracy", 10,
         "data/textvqa/textvqa_val_annotations.json"),
    _vqa("vizwiz_val", "data/vizwiz/vizwiz_val.jsonl", "vqa_accuracy", 10,
         "data/vizwiz/vizwiz_val_annotations.json"),
    _vqa("vizwiz_test", "data/vizwiz/vizwiz_test.jsonl", None, 10),
    _vqa("docvqa_val", "data/docvqa/val.jsonl", "anls", 100),
    _vqa("docvqa_test", "data/docvqa/test.jsonl", None, 100),
    _vqa("chartqa_test_human", "data/chartqa/test_human.jsonl", "relaxed_accuracy", 100),
    _vqa("chartqa_test_augmented", "data/chartqa/test_augmented.jsonl", "relaxed_accuracy", 100),
    _vqa("gqa_testdev", "data/gqa/testdev_balanced.jsonl", "gqa_exact_match", 10),
    _vqa("ocrvqa_val", "data/ocrvqa/ocrvqa_val.jsonl", "exact_match", 100),
    _vqa("ocrvqa_test", "data/ocrvqa/ocrvqa_test.jsonl", "exact_match", 100),
    _vqa("ai2diagram_test", "data/ai2diagram/test.jsonl", "exact_match", 10),
    EvalTask(name="scienceqa_test_img", kind="multiple_choice", metric="choice_accuracy", max_new_tokens=0,
             min_new_tokens=0, data_file="data/scienceqa/scienceqa_test_img.jsonl"),
] + [
    _grounding(f"{dataset}_{split}", f"data/{dataset}/{dataset}_{split}.jsonl")
    for dataset, splits in (("refcoco", ("val", "testA", "testB")), ("refcoco+", ("val", "testA", "testB")),
                            ("refcocog", ("val", "test")))
    for split in splits
]
TASKS: Mapping[str, EvalTask] = {t.name: t for t in _TASK_LIST}


class UnknownTaskError(errors.ConfigError, KeyError):
  """A task name that is not registered (a KeyError, as before it was a user mistake)."""

  def __str__(self) -> str:  # KeyError's would quote the message
    return errors.ConfigError.__str__(self)


def get_task(name: str) -> EvalTask:
  """The registered task `name`; the error lists the known names."""
  if name not in TASKS:
    raise UnknownTaskError(f"unknown evaluation task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
  return TASKS[name]
