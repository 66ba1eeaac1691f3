"""Token sequences and loss labels for the three training stages.

Labels use the reference's UNSHIFTED convention: `labels[t]` is `input_ids[t]` where token t is a training target
(predicted from the tokens before it) and `IGNORE_INDEX` (−100) elsewhere; the HF model shifts them inside its
loss. `shift_labels` converts to the project's shifted convention (DESIGN.md §4): `targets[t]` is the token that
follows position t and `loss_mask[t]` says whether it is supervised.

Stage 1/2 (`pretrain_example`; the reference publishes no pre-training code, the paper says "cross-entropy on
text tokens"): supervised = every token of `text` (including `<ref>`/`<box>` tags, the box digits and the final
`<|endoftext|>`), except the image spans; never supervised = every `<img>`, `<imgpad>`, `</img>`, every token
of the optional `prompt` (a task prefix such as a VQA question) and padding. The first text token after `</img>`
IS supervised: predicting the caption from the image is the point.

Stage 3 (`sft_example`) is the official `finetune.py` `preprocess` (SPEC §6.2, Gotcha 21), piece by piece:
  system     ids [im_start] enc("system") enc("\\n") enc(system) [im_end] enc("\\n")
             labels [im_start] IGNORE … [im_end] "\\n"
  user       ids [im_start] enc("user") enc("\\n") enc(value) [im_end] enc("\\n")
             labels [im_start] IGNORE … [im_end] "\\n"            (content, incl. image spans, ignored)
  assistant  ids [im_start] enc("assistant") enc("\\n") enc(value) [im_end] enc("\\n")
             labels [im_start] IGNORE IGNORE enc(value) [im_end] "\\n"
A leading message that is not from the user is dropped (only the first, as the reference); contents are encoded
with all specials allowed. Padding (optional) is right padding with `<|endoftext|>` and IGNORE labels.

Over-long examples: with `max_len` set, a longer example raises ValueError unless `truncate=True`, which cuts
it at `max_len` like the reference, but never inside an image span (a partial span is removed with its path,
so every kept `<img>` still has its Q slots and its image).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from qwenvl_jax.text import chat
from qwenvl_jax.text import formatting
from qwenvl_jax.text import tokenizer as qtok

IGNORE_INDEX = -100
ROLES = ("user", "assistant")


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
  """One tokenized training example.

  input_ids: int32[T] token ids, image spans expanded.
  labels: int32[T] `input_ids` where supervised, IGNORE_INDEX elsewhere (unshifted).
  image_paths: path of each image span, in order (len == number of `<img>` in input_ids).
  """
  input_ids: np.ndarray
  labels: np.ndarray
  image_paths: list[str]

  @property
  def num_images(self) -> int:
    return len(self.image_paths)

  def shifted(self, fill_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`shift_labels(self.input_ids, self.labels, fill_id=fill_id)`."""
    return shift_labels(self.input_ids, self.labels, fill_id=fill_id)


def pretrain_example(tok: qtok.Tokenizer, text: str, *, prompt: str = "", append_eod: bool = True,
                     n_image_tokens: int = formatting.IMAGE_TOKENS, max_len: int | None = None,
                     truncate: bool = False, pad_to_max_len: bool = False) -> Example:
  """A stage-1/2 example: `prompt` (unsupervised) then `text` (supervised) then `<|endoftext|>`.

  Args:
    tok: any `Tokenizer`.
    text: the target text, e.g. `"<img>cat.jpg</img>a cat on a mat"` (stage 1) or a grounded caption.
      Image spans inside it are expanded and never supervised.
    prompt: an unsupervised prefix, encoded separately (the model generates `text` after it at inference),
      e.g. `"<img>p.jpg</img>What colour is the circle? Answer:"`.
    append_eod: end with a supervised `<|endoftext|>` so the model learns to stop.
    n_image_tokens: slots per image span.
    max_len, truncate, pad_to_max_len: see the module docstring.
  """
  prompt_enc = formatting.encode_with_images(tok, prompt, n_image_tokens=n_image_tokens)
  text_enc = formatting.encode_with_images(tok, text, n_image_tokens=n_image_tokens)
  text_ids = text_enc.ids + ([tok.eod_id] if append_eod else [])
  if not text_ids:
    raise ValueError("pretrain_example got an empty text: nothing to supervise")
  image_ids = {tok.img_start_id, tok.img_end_id, tok.img_pad_id}
  ids = prompt_enc.ids + text_ids
  labels = [IGNORE_INDEX] * len(prompt_enc.ids) + [IGNORE_INDEX if t in image_ids else t for t in text_ids]
  return _finish(tok, ids, labels, prompt_enc.image_paths + text_enc.image_paths, max_len=max_len,
                 truncate=truncate, pad_to_max_len=pad_to_max_len)


def sft_example(tok: qtok.Tokenizer, conversations: Sequence[Mapping[str, str]] | Mapping, *,
                system: str = chat.DEFAULT_SYSTEM, n_image_tokens: int = formatting.IMAGE_TOKENS,
                max_len: int | None = None, truncate: bool = False, pad_to_max_len: bool = False) -> Example:
  """A stage-3 example exactly as the official `finetune.py` (see the module docstring).

  Args:
    tok: any `Tokenizer`.
    conversations: `[{"from": "user" | "assistant", "value": str}, ...]` (the official data format; images as
      `Picture k: <img>PATH</img>\\n` inside user values), or a whole record `{"conversations": [...], ...}`.
    system: the system message.
    n_image_tokens: slots per image span.
    max_len, truncate, pad_to_max_len: see the module docstring (finetune.py always pads to and truncates at
      `model_max_length`: pass `max_len=2048, truncate=True, pad_to_max_len=True` for that).
  Raises:
    ValueError naming the turn on an unknown role, a non-str value, or an empty conversation.
  """
  if isinstance(conversations, Mapping) and "conversations" in conversations:
    conversations = conversations["conversations"]  # a whole record of the official JSON format
  turns = list(conversations)
  for i, turn in enumerate(turns):
    if not isinstance(turn, Mapping) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
      raise ValueError(f"conversation turn {i} must be {{'from': 'user'|'assistant', 'value': str}}, got {turn!r}")
  if turns and turns[0]["from"] != "user":
    turns = turns[1:]
  if not turns:
    raise ValueError("sft_example got a conversation without any turn after dropping a leading non-user turn")

  nl = tok.encode("\n")
  if len(nl) != 1:
    # finetune.py's label layout (the "- 3" and "[:-2]" below) assumes "\n" is a single token.
    raise ValueError(f"the tokenizer encodes '\\n' as {len(nl)} tokens; sft_example needs exactly one")
  im_start, im_end = tok.im_start_id, tok.im_end_id

  system_enc = formatting.encode_with_images(tok, system, n_image_tokens=n_image_tokens)
  system_ids = [im_start] + tok.encode("system") + nl + system_enc.ids + [im_end] + nl
  ids = list(system_ids)
  labels = [im_start] + [IGNORE_INDEX] * (len(system_ids) - 3) + [im_end] + nl
  paths = list(system_enc.image_paths)
  for turn in turns:
    role_ids = [im_start] + tok.encode(turn["from"])
    value = formatting.encode_with_images(tok, turn["value"], n_image_tokens=n_image_tokens)
    turn_ids = role_ids + nl + value.ids + [im_end] + nl
    if turn["from"] == "user":
      turn_labels = [im_start] + [IGNORE_INDEX] * (len(turn_ids) - 3) + [im_end] + nl
    else:
      turn_labels = ([im_start] + [IGNORE_INDEX] * len(role_ids) + turn_ids[len(role_ids) + 1:-2]
                     + [im_end] + nl)
    ids += turn_ids
    labels += turn_labels
    paths += value.image_paths
  return _finish(tok, ids, labels, paths, max_len=max_len, truncate=truncate, pad_to_max_len=pad_to_max_len)


def shift_labels(input_ids: np.ndarray, labels: np.ndarray, *, fill_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Unshifted labels → the project's shifted convention (DESIGN.md §4), over the last axis.

  Args:
    input_ids: int[..., T].
    labels: int[..., T], IGNORE_INDEX where unsupervised.
    fill_id: target id at the last position (never supervised).
  Returns:
    targets int32[..., T] with `targets[t] = input_ids[t + 1]`, and loss_mask float32[..., T] with
    `loss_mask[t] = labels[t + 1] != IGNORE_INDEX` (0 at the last position).
  """
  input_ids = np.asarray(input_ids)
  labels = np.asarray(labels)
  if input_ids.shape != labels.shape:
    raise ValueError(f"input_ids {input_ids.shape} and labels {labels.shape} differ in shape")
  supervised = labels != IGNORE_INDEX
  if np.any(supervised & (labels != input_ids)):
    raise ValueError("labels must equal input_ids wherever they are not IGNORE_INDEX (unshifted convention)")
  targets = np.full(input_ids.shape, fill_id, dtype=np.int32)
  loss_mask = np.zeros(input_ids.shape, dtype=np.float32)
  targets[..., :-1] = input_ids[..., 1:]
  loss_mask[..., :-1] = supervised[..., 1:]
  return targets, loss_mask


def _finish(tok: qtok.Tokenizer, ids: list[int], labels: list[int], paths: list[str], *, max_len: int | None,
            truncate: bool, pad_to_max_len: bool) -> Example:
  """Applies the length policy and packs the lists into an `Example`."""
  if pad_to_max_len and max_len is None:
    raise ValueError("pad_to_max_len needs max_len")
  if max_len is not None and len(ids) > max_len:
    if not truncate:
      raise ValueError(f"example has {len(ids)} tokens, more than max_len={max_len} (pass truncate=True to cut it)")
    cut = max_len
    last_start = _rfind(ids, tok.img_start_id, cut)
    if last_start >= 0 and _rfind(ids, tok.img_end_id, cut) < last_start:
      cut = last_start  # the cut falls inside an image span: drop the whole span
    ids, labels = ids[:cut], labels[:cut]
    paths = paths[:ids.count(tok.img_start_id)]
  if pad_to_max_len:
    n_pad = max_len - len(ids)
    ids = ids + [tok.eod_id] * n_pad
    labels = labels + [IGNORE_INDEX] * n_pad
  return Example(np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32), list(paths))


def _rfind(ids: Sequence[int], value: int, stop: int) -> int:
  for i in range(min(stop, len(ids)) - 1, -1, -1):
    if ids[i] == value:
      return i
  return -1
