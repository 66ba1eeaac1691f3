"""Tests of the stage 1/2 and stage 3 (finetune.py) sequences and labels."""
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from qwenvl_jax.text import formatting as fmt
from qwenvl_jax.text import masks

IGN = -100


def test_sft_example_matches_finetune_py_by_hand(qwen_tok):
  hi = qwen_tok.encode("hi")
  ex = masks.sft_example(qwen_tok, [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "你好"}])
  system_ids = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
  user_ids = [151644, 872, 198] + hi + [151645, 198]
  assistant_ids = [151644, 77091, 198, 108386, 151645, 198]
  assert ex.input_ids.tolist() == system_ids + user_ids + assistant_ids
  # finetune.py: every <|im_start|>, every <|im_end|> and the "\n" after it, and the assistant content.
  assert ex.labels.tolist() == ([151644] + [IGN] * 8 + [151645, 198]
                                + [151644, IGN, IGN] + [IGN] * len(hi) + [151645, 198]
                                + [151644, IGN, IGN, 108386, 151645, 198])
  assert ex.input_ids.dtype == np.int32 and ex.labels.dtype == np.int32
  assert ex.image_paths == []


def test_sft_supervised_tokens_by_role(any_tok):
  user = fmt.from_list_format([{"image": "a.jpg"}, {"text": "Where is the dog?"}])
  answer = fmt.box_to_text((1, 2, 3, 4), "the dog")
  conv = [{"from": "user", "value": user}, {"from": "assistant", "value": answer},
          {"from": "user", "value": "thanks"}, {"from": "assistant", "value": "welcome"}]
  ex = masks.sft_example(any_tok, conv, system="be brief", n_image_tokens=4)
  ids, labels = ex.input_ids.tolist(), ex.labels.tolist()
  assert ex.image_paths == ["a.jpg"]
  supervised = [t for t, l in zip(ids, labels) if l != IGN]
  assert all(l in (IGN, t) for t, l in zip(ids, labels))
  nl = any_tok.encode("\n")[0]
  structural = [any_tok.im_start_id, any_tok.im_end_id, nl]
  expected = (structural * 2 + [any_tok.im_start_id] + any_tok.encode(answer) + [any_tok.im_end_id, nl]
              + structural + [any_tok.im_start_id] + any_tok.encode("welcome") + [any_tok.im_end_id, nl])
  assert supervised == expected
  image_ids = {any_tok.img_start_id, any_tok.img_pad_id, any_tok.img_end_id}
  assert not any(labels[i] != IGN for i, t in enumerate(ids) if t in image_ids)


def test_sft_leading_non_user_turn_dropped(any_tok):
  conv = [{"from": "assistant", "value": "greeting"}, {"from": "user", "value": "q"},
          {"from": "assistant", "value": "a"}]
  assert masks.sft_example(any_tok, conv).input_ids.tolist() == masks.sft_example(any_tok, conv[1:]).input_ids.tolist()


@pytest.mark.parametrize("conv, match", [
    ([{"from": "human", "value": "q"}], "turn 0"),
    ([{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"}], "turn 1"),
    ([{"from": "user", "value": 3}], "turn 0"),
    ([{"from": "assistant", "value": "only"}], "without any turn"),
    ([], "without any turn"),
])
def test_sft_bad_conversations(any_tok, conv, match):
  with pytest.raises(ValueError, match=match):
    masks.sft_example(any_tok, conv)


def test_length_policy(any_tok):
  conv = [{"from": "user", "value": "Picture 1:<img>a.jpg</img>\nq"}, {"from": "assistant", "value": "an answer"}]
  full = masks.sft_example(any_tok, conv, n_image_tokens=8)
  n = len(full.input_ids)
  with pytest.raises(ValueError, match=f"{n} tokens"):
    masks.sft_example(any_tok, conv, n_image_tokens=8, max_len=n - 1)
  cut = masks.sft_example(any_tok, conv, n_image_tokens=8, max_len=n - 1, truncate=True)
  assert cut.input_ids.tolist() == full.input_ids.tolist()[:n - 1] and cut.image_paths == ["a.jpg"]
  # A cut inside the image span removes the whole span and its path.
  start = full.input_ids.tolist().index(any_tok.img_start_id)
  mid = masks.sft_example(any_tok, conv, n_image_tokens=8, max_len=start + 5, truncate=True)
  assert mid.input_ids.tolist() == full.input_ids.tolist()[:start] and mid.image_paths == []
  # finetune.py's layout: right padding with <|endoftext|> and ignored labels.
  padded = masks.sft_example(any_tok, conv, n_image_tokens=8, max_len=n + 5, pad_to_max_len=True)
  assert padded.input_ids.tolist() == full.input_ids.tolist() + [any_tok.eod_id] * 5
  assert padded.labels.tolist() == full.labels.tolist() + [IGN] * 5
  with pytest.raises(ValueError, match="needs max_len"):
    masks.sft_example(any_tok, conv, pad_to_max_len=True)


def test_pretrain_example(any_tok):
  ex = masks.pretrain_example(any_tok, "<img>cat.png</img>a cat on a mat", n_image_tokens=4)
  ids, labels = ex.input_ids.tolist(), ex.labels.tolist()
  caption = any_tok.encode("a cat on a mat")
  assert ids == fmt.image_span_ids(any_tok, 4) + caption + [any_tok.eod_id]
  assert labels == [IGN] * 6 + caption + [any_tok.eod_id]
  assert ex.image_paths == ["cat.png"] and ex.num_images == 1
  # Shifted: the </img> position predicts the first caption token.
  targets, loss_mask = ex.shifted()
  assert targets[5] == caption[0] and loss_mask[5] == 1 and loss_mask[4] == 0 and loss_mask[-1] == 0


def test_pretrain_example_with_prompt(any_tok):
  ex = masks.pretrain_example(any_tok, " red", prompt="<img>p.png</img>What colour? Answer:", n_image_tokens=2,
                              max_len=64, pad_to_max_len=True)
  prompt_len = len(fmt.encode_with_images(any_tok, "<img>p.png</img>What colour? Answer:", n_image_tokens=2).ids)
  labels = ex.labels.tolist()
  answer = any_tok.encode(" red")
  assert labels[:prompt_len] == [IGN] * prompt_len
  assert labels[prompt_len:prompt_len + len(answer) + 1] == answer + [any_tok.eod_id]
  assert set(labels[prompt_len + len(answer) + 1:]) == {IGN} and len(labels) == 64
  with pytest.raises(ValueError, match="empty text"):
    masks.pretrain_example(any_tok, "", append_eod=False)


@hypothesis.given(st.lists(st.integers(0, 50), min_size=1, max_size=30), st.data())
def test_shift_labels(ids, data):
  supervised = data.draw(st.lists(st.booleans(), min_size=len(ids), max_size=len(ids)))
  ids = np.asarray(ids)
  labels = np.where(supervised, ids, IGN)
  targets, loss_mask = masks.shift_labels(ids, labels, fill_id=7)
  assert targets.dtype == np.int32 and loss_mask.dtype == np.float32
  for t in range(len(ids) - 1):
    assert targets[t] == ids[t + 1]
    assert loss_mask[t] == float(supervised[t + 1])
  assert targets[-1] == 7 and loss_mask[-1] == 0


def test_shift_labels_batched_and_checked():
  ids = np.array([[1, 2, 3], [4, 5, 6]])
  labels = np.array([[IGN, 2, 3], [IGN, IGN, 6]])
  targets, loss_mask = masks.shift_labels(ids, labels)
  assert targets.tolist() == [[2, 3, 0], [5, 6, 0]]
  assert loss_mask.tolist() == [[1, 1, 0], [0, 1, 0]]
  with pytest.raises(ValueError, match="labels must equal"):
    masks.shift_labels(ids, np.array([[IGN, 9, 3], [IGN, IGN, 6]]))
  with pytest.raises(ValueError, match="shape"):
    masks.shift_labels(ids, labels[:, :2])


def test_sft_accepts_a_whole_record(any_tok):
  conv = [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]
  ex = masks.sft_example(any_tok, {"id": "identity_0", "conversations": conv})
  assert ex.input_ids.tolist() == masks.sft_example(any_tok, conv).input_ids.tolist()
