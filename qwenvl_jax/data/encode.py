"""Record -> one unpacked training example: token ids, shifted targets, loss mask and preprocessed images.

Tokens and labels come from `qwenvl_jax.text.masks`: stages 1 and 2 read a record as raw text
(`pretrain_example`: the user turn is the unsupervised prompt, the assistant turn the supervised text, then a
supervised `<|endoftext|>`, which is also the separator between packed examples); stage 3 as ChatML with the
official `finetune.py` labels (`sft_example`, SPEC §6.2, Gotcha 21). Images become `<img>` + Q x `<imgpad>` +
`</img>` (Gotcha 16) and are never supervised.

The next-token shift happens here, per example, so packing can never let a target cross into the next example:
  targets[t] = input_ids[t + 1],  loss_mask[t] = supervised(input_ids[t + 1]),  and the last position of an
  example predicts nothing (target = eod, loss 0).

Letters: n tokens of the example, k images, S image side.
"""
import dataclasses
from typing import Any

import numpy as np

from qwenvl_jax import text
from qwenvl_jax.data import records as rec
from qwenvl_jax.data.images import ImageError, preprocess_image

DEFAULT_SYSTEM = text.DEFAULT_SYSTEM


def encode_turns(tokenizer, record: rec.Record, *, stage: int, image_tokens: int,
                 system: str = DEFAULT_SYSTEM, truncate_to: int | None = None) -> text.Example:
  """The unshifted example of a record (`qwenvl_jax.text.masks`): ids and labels (IGNORE_INDEX = no loss).

  Stages 1/2 need exactly one user turn (the unsupervised prompt, possibly empty) and one assistant turn (the
  supervised text); stage 3 takes any alternating conversation. With `truncate_to`, longer examples are cut there
  as finetune.py does, never inside an image span (the text package drops a partial span with its image).

  Raises:
    BadRecordError: a multi-turn record in stage 1 or 2, or text the tokenizer-side checks reject.
  """
  # The text package reads an image path inside each span; the pipeline carries the images beside the text, so
  # each span gets its image index as a placeholder path (the slots become <imgpad> all the same).
  counter = iter(range(len(record.images) + 1))
  turns = [(role, text.IMAGE_SPAN.sub(lambda _: f"<img>{next(counter)}</img>", t)) for role, t in record.turns]
  try:
    if stage in (1, 2):
      if len(turns) != 2:
        raise rec.BadRecordError(record.id, f"stage {stage} needs one prompt and one answer, got {len(turns)} turns")
      return text.pretrain_example(tokenizer, turns[1][1], prompt=turns[0][1], n_image_tokens=image_tokens,
                                   max_len=truncate_to, truncate=truncate_to is not None)
    if stage == 3:
      conversations = [{"from": role, "value": t} for role, t in turns]
      return text.sft_example(tokenizer, conversations, system=system, n_image_tokens=image_tokens,
                              max_len=truncate_to, truncate=truncate_to is not None)
  except ValueError as e:
    if isinstance(e, rec.BadRecordError):
      raise
    raise rec.BadRecordError(record.id, str(e)) from e
  raise ValueError(f"stage must be 1, 2 or 3, got {stage}")


@dataclasses.dataclass(frozen=True)
class ExampleEncoder:
  """Record -> dict of numpy arrays (one unpacked example). Picklable, so grain workers can run it.

  Attributes:
    tokenizer: a `qwenvl_jax.text` Tokenizer.
    stage: 1, 2 or 3.
    image_tokens: Q, `<imgpad>` ids per image.
    image_size: S.
    seq_len: T; longer examples are bad records, or cut at T when `truncate`.
    max_images: M; examples with more images are bad records.
    system: the stage-3 system prompt.
    truncate: cut over-long examples like finetune.py instead of skipping them.
  """
  tokenizer: Any
  stage: int
  image_tokens: int
  image_size: int
  seq_len: int
  max_images: int
  system: str = DEFAULT_SYSTEM
  truncate: bool = False

  def __call__(self, record: rec.Record) -> dict[str, np.ndarray]:
    """Returns input_ids int32[n], targets int32[n], loss_mask float32[n], images uint8[k, S, S, 3].

    Raises:
      BadRecordError: invalid record, too many images, over-long text, missing or corrupt image.
    """
    rec.validate(record)
    if len(record.images) > self.max_images:
      raise rec.BadRecordError(record.id, f"{len(record.images)} images > max_images={self.max_images}")
    example = encode_turns(self.tokenizer, record, stage=self.stage, image_tokens=self.image_tokens,
                           system=self.system, truncate_to=self.seq_len if self.truncate else None)
    n = len(example.input_ids)
    if n > self.seq_len:
      raise rec.BadRecordError(record.id, f"over-long: {n} tokens > seq_len={self.seq_len}")
    # Truncation may have dropped trailing image spans; their images go with them.
    sources = record.images[:example.num_images] if self.truncate else record.images
    if example.num_images != len(sources):
      raise rec.BadRecordError(record.id, f"{example.num_images} image spans for {len(sources)} images")
    targets, loss_mask = text.shift_labels(example.input_ids, example.labels, fill_id=self.tokenizer.eod_id)
    if not loss_mask.any():
      raise rec.BadRecordError(record.id, "no supervised token")
    images = np.zeros((len(sources), self.image_size, self.image_size, 3), np.uint8)
    for i, image in enumerate(sources):
      try:
        images[i] = preprocess_image(image, self.image_size)
      except ImageError as e:
        raise rec.BadRecordError(record.id, f"image {i}: {e}") from e
    return {"input_ids": example.input_ids.astype(np.int32), "targets": targets, "loss_mask": loss_mask,
            "images": images}
