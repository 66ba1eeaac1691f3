"""Record -> one unpacked training example: token ids, shifted targets, loss mask and preprocessed images.

Stages 1 and 2 read a record as raw text (SPEC §4.3 `chat_format="raw"`): the user turns are the prompt (no loss),
the assistant turns the answer (loss), and `<|endoftext|>` closes the example (loss, so the model learns to stop;
it is also the separator between packed examples as in the reference's pre-training data). Stage 3 reads it as
ChatML with the official `finetune.py` labels (SPEC §6.2, Gotcha 21). Images become `<img>` + Q x `<imgpad>` +
`</img>` (Gotcha 16) and are never supervised.

The next-token shift happens here, per example, so packing can never let a target cross into the next example:
  targets[t] = input_ids[t + 1],  loss_mask[t] = supervised(input_ids[t + 1]),  and the last position of an
  example predicts nothing (target = eod, loss 0).

Letters: n tokens of the example, k images, S image side.
"""
import dataclasses
from typing import Any

import numpy as np

from qwenvl_jax.data import records as rec
from qwenvl_jax.data.images import ImageError, preprocess_image

DEFAULT_SYSTEM = "You are a helpful assistant."


def encode_turns(tokenizer, record: rec.Record, *, stage: int, image_tokens: int,
                 system: str = DEFAULT_SYSTEM) -> tuple[list[int], list[int]]:
  """Token ids of a record and the per-token supervision flags (1 = this token is a label), unshifted.

  Returns:
    (ids, labels) of equal length n.
  """
  if stage in (1, 2):
    return _encode_raw(tokenizer, record, image_tokens)
  if stage == 3:
    return _encode_chatml(tokenizer, record, image_tokens, system)
  raise ValueError(f"stage must be 1, 2 or 3, got {stage}")


def _encode_text(tokenizer, text: str, image_tokens: int) -> list[int]:
  """Encodes text with `<img></img>` spans expanded to `<img>` + Q x `<imgpad>` + `</img>` (SPEC §3.4).

  Pieces between spans are encoded separately; `<img>`/`</img>` are special tokens, so tiktoken splits there anyway
  and this equals encoding the reference's text with the path bytes replaced.
  """
  ids: list[int] = []
  pieces = rec.IMG_SPAN.split(text)
  # re.split with one group alternates text, span content, text, ...
  for i, piece in enumerate(pieces):
    if i % 2:
      ids += [tokenizer.img_start_id] + [tokenizer.img_pad_id] * image_tokens + [tokenizer.img_end_id]
    elif piece:
      ids += tokenizer.encode(piece, allowed_special="all")
  return ids


def _encode_raw(tokenizer, record: rec.Record, image_tokens: int) -> tuple[list[int], list[int]]:
  ids: list[int] = []
  labels: list[int] = []
  for role, text in record.turns:
    piece = _encode_text(tokenizer, text, image_tokens)
    ids += piece
    labels += [int(role == "assistant")] * len(piece)
  ids.append(tokenizer.eod_id)
  labels.append(1)
  return ids, labels


def _encode_chatml(tokenizer, record: rec.Record, image_tokens: int, system: str) -> tuple[list[int], list[int]]:
  """finetune.py's `preprocess`: pieces tokenized separately, labels on <|im_start|>, <|im_end|>, the "\\n" after
  it, and assistant content; role names, the "\\n" after them, system text and user content get no loss."""
  nl = tokenizer.encode("\n")
  ids: list[int] = []
  labels: list[int] = []
  for role, text in [("system", system)] + list(record.turns):
    head = [tokenizer.im_start_id] + tokenizer.encode(role) + nl
    content = _encode_text(tokenizer, text, image_tokens) if role != "system" else tokenizer.encode(text)
    tail = [tokenizer.im_end_id] + nl
    ids += head + content + tail
    labels += [1] + [0] * (len(head) - 1) + [int(role == "assistant")] * len(content) + [1] * len(tail)
  return ids, labels


@dataclasses.dataclass(frozen=True)
class ExampleEncoder:
  """Record -> dict of numpy arrays (one unpacked example). Picklable, so grain workers can run it.

  Attributes:
    tokenizer: a `qwenvl_jax.text` Tokenizer.
    stage: 1, 2 or 3.
    image_tokens: Q, `<imgpad>` ids per image.
    image_size: S.
    seq_len: T; longer examples are bad records.
    max_images: M; examples with more images are bad records.
  """
  tokenizer: Any
  stage: int
  image_tokens: int
  image_size: int
  seq_len: int
  max_images: int
  system: str = DEFAULT_SYSTEM

  def __call__(self, record: rec.Record) -> dict[str, np.ndarray]:
    """Returns input_ids int32[n], targets int32[n], loss_mask float32[n], images uint8[k, S, S, 3].

    Raises:
      BadRecordError: invalid record, too many images, over-long text, missing or corrupt image.
    """
    rec.validate(record)
    if len(record.images) > self.max_images:
      raise rec.BadRecordError(record.id, f"{len(record.images)} images > max_images={self.max_images}")
    ids, labels = encode_turns(self.tokenizer, record, stage=self.stage, image_tokens=self.image_tokens,
                               system=self.system)
    if len(ids) > self.seq_len:
      raise rec.BadRecordError(record.id, f"over-long: {len(ids)} tokens > seq_len={self.seq_len}")
    if not any(labels[1:]):
      raise rec.BadRecordError(record.id, "no supervised token")
    images = np.zeros((len(record.images), self.image_size, self.image_size, 3), np.uint8)
    for i, image in enumerate(record.images):
      try:
        images[i] = preprocess_image(image, self.image_size)
      except ImageError as e:
        raise rec.BadRecordError(record.id, f"image {i}: {e}") from e
    ids_a = np.asarray(ids, np.int32)
    if int(np.sum(ids_a == self.tokenizer.img_pad_id)) != self.image_tokens * len(record.images):
      # A literal "<imgpad>" in the text would shift every later image feature: never let it through.
      raise rec.BadRecordError(record.id, "stray <imgpad> tokens in the text")
    targets = np.append(ids_a[1:], np.int32(self.tokenizer.eod_id)).astype(np.int32)
    loss_mask = np.append(np.asarray(labels[1:], np.float32), np.float32(0))
    return {"input_ids": ids_a, "targets": targets, "loss_mask": loss_mask, "images": images}
