"""KV-cache generation: cached == recomputed, left-padded batches == single prompts, stop words, lengths.

Every batch has 4 rows and one image slot (empty for text rows), so the tests share a few compiled loops.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import errors
from qwenvl_jax.inference import decode
from qwenvl_jax.model import attention

N = 6
ROWS = 4
FULL = 64  # the right-padded length of the recomputing reference


def _batch(generator, prompts, images=None, buckets=(32,)):
  cfg = generator.cfg
  return decode.make_prompt_batch(prompts, images, pad_id=0, image_pad_id=cfg.image_pad_id,
                                  image_tokens=cfg.image_tokens, buckets=buckets, num_rows=ROWS, max_images=1,
                                  image_size=cfg.vision.image_size)


def _gen(**kw):
  kw.setdefault("max_new_tokens", N)
  kw.setdefault("eos_id", 2)  # an id random weights rarely pick first; rows then run to max_new_tokens
  kw.setdefault("pad_id", 0)
  return decode.GenerationConfig(**kw)


@nnx.jit
def _full_logits(model, ids, segment_ids, images, image_mask):
  return model(ids, segment_ids=segment_ids, images=images, image_mask=image_mask).logits


def _recompute_greedy(model, ids, image=None, steps=N):
  """Greedy decoding without a cache: the whole sequence is run again for every new token (right-padded to a
  fixed length so it compiles once; pads are segment 0 and come after the real tokens, so they change nothing)."""
  s = model.cfg.vision.image_size
  images = np.zeros((1, 1, s, s, 3), np.uint8) if image is None else np.asarray(image)[None, None]
  mask = np.full((1, 1), image is not None)
  seq = list(ids)
  for _ in range(steps):
    padded = np.zeros((1, FULL), np.int32)
    padded[0, :len(seq)] = seq
    segments = (np.arange(FULL) < len(seq)).astype(np.int32)[None]
    logits = _full_logits(model, jnp.asarray(padded), jnp.asarray(segments), images, mask)
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(ids):]


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(3, 390, n).tolist() for n in (5, 13, 2)]


def test_cached_greedy_equals_recomputing_the_sequence(generator, tiny_model, prompts, image_prompt):
  got = generator.generate(_batch(generator, prompts), _gen())
  for row, ids in zip(got, prompts):
    assert row.tolist() == _recompute_greedy(tiny_model, ids)
  ids, image = image_prompt
  got = generator.generate(_batch(generator, [ids, prompts[0]], [[image], []]), _gen())
  assert got[0].tolist() == _recompute_greedy(tiny_model, ids, image)


@pytest.fixture(scope="module")
def compiled_generation(generator, prompts):
  """(the prompt batch, its device arrays, the text of the compiled whole-generation program)."""
  batch = _batch(generator, prompts)
  static, dyn = _gen().split()
  arrays = generator.device_batch(batch, _gen())
  text = generator._generate.lower(generator.graphdef, static, generator.state, arrays,  # pylint: disable=W0212
                                   jax.random.key(0), dyn).compile().as_text()
  return batch, arrays, text


def test_the_prefill_builds_the_last_position_logits_only(generator, tiny_model, compiled_generation):
  """The prefill took `model(...).logits[:, -1]`, and XLA computes a dot whose output is sliced whole: every
  prompt position's logits were built first (for a 1024-token row of the 7B model on a v5e, 1.27 TFLOP of ~20).
  The compiled generation holds no [rows x P, V] buffer now, and the first token's logits are still the full
  forward's at the last position (float32, atol 1e-5)."""
  batch, arrays, text = compiled_generation
  rows, p = batch.input_ids.shape
  vocab = tiny_model.cfg.llm.vocab_size
  assert f"[{rows * p},{vocab}]" not in text and f"[{rows},{p},{vocab}]" not in text
  assert f"[{rows},{vocab}]" in text  # the last position's (the check would pass on a renamed shape otherwise)
  cache = tiny_model.llm.init_cache(rows, p + N)
  logits, _ = decode.prefill(generator.graphdef, generator.state, arrays, cache, rope_base=arrays["rope_base"])
  full = _full_logits(tiny_model, jnp.asarray(batch.input_ids), jnp.asarray(batch.segment_ids), None, None)
  # The full forward numbers the left padding's slots too; RoPE is relative, so only rounding differs.
  real = np.flatnonzero(batch.lengths > 0)
  np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(full[:, -1])[real], atol=1e-5)


def test_the_prefill_attends_to_the_prompt_slots_only(tiny_model, compiled_generation):
  """The prefill attended to the whole cache (P + N slots), all of them empty past the prompt: [rows, heads, P,
  P + N] float32 scores per layer. It reads the P prompt slots now ([rows, heads, P, P], a square a kernel can
  tile); the generation is unchanged (test_cached_greedy_equals_recomputing_the_sequence)."""
  batch, _, text = compiled_generation
  rows, p = batch.input_ids.shape
  heads = tiny_model.cfg.llm.heads
  assert f"f32[{rows},{heads},{p},{p + N}]" not in text
  assert f"f32[{rows},{heads},{p},{p}]" in text


def test_a_prefill_in_query_blocks_generates_the_same_tokens(tiny_model, prompts, monkeypatch):
  """Long prompts attend in blocks of `attention.QUERY_BLOCK` queries (512); at 8, the 32-token prefill runs in
  4 blocks and the greedy tokens are still those of the whole sequence recomputed without a cache."""
  monkeypatch.setattr(attention, "QUERY_BLOCK", 8)
  generator = decode.Generator(tiny_model)  # traced anew
  got = generator.generate(_batch(generator, prompts), _gen())
  for row, ids in zip(got, prompts):
    assert row.tolist() == _recompute_greedy(tiny_model, ids)


def test_left_padded_batch_equals_single_prompts(generator, prompts, image_prompt):
  ids, image = image_prompt
  rows = prompts + [ids]
  images = [[] for _ in prompts] + [[image]]
  batched = generator.generate(_batch(generator, rows, images), _gen())
  for i, (row, imgs) in enumerate(zip(rows, images)):
    # Alone, and alone in a bigger bucket (more left padding): same tokens.
    alone = generator.generate(_batch(generator, [row], [imgs]), _gen())
    padded = generator.generate(_batch(generator, [row], [imgs], buckets=(64,)), _gen())
    assert batched[i].tolist() == alone[0].tolist() == padded[0].tolist(), i


def test_stream_yields_the_generated_tokens(generator, prompts):
  batch = _batch(generator, prompts)
  streamed = np.stack(list(generator.stream(batch, _gen())), axis=1)
  np.testing.assert_array_equal(streamed, generator.generate(batch, _gen()))


def test_eos_ends_a_row_and_pads_follow(generator, prompts):
  batch = _batch(generator, prompts)
  free = generator.generate(batch, _gen())
  eos = int(free[0, 2])  # make row 0's third token the end-of-text id
  got = generator.generate(batch, _gen(eos_id=eos, pad_id=1))
  np.testing.assert_array_equal(got[0, :3], free[0, :3])
  assert got[0, 3:].tolist() == [1] * (N - 3)
  assert decode.trim(got, eos)[0] == free[0, :3].tolist()


def test_stop_word_forces_eos_next(generator, prompts):
  batch = _batch(generator, prompts[:1])
  free = generator.generate(batch, _gen())[0]
  stop = (int(free[1]), int(free[2]))  # a two-token stop sequence the free run produces at steps 1-2
  got = generator.generate(batch, _gen(stop_words=(stop,), eos_id=3, pad_id=1))[0]
  assert got.tolist()[:4] == free[:3].tolist() + [3]
  assert got.tolist()[4:] == [1] * (N - 4)


def test_min_new_tokens_forbids_an_early_eos(generator, prompts):
  batch = _batch(generator, prompts[:1])
  first = int(generator.generate(batch, _gen())[0, 0])
  assert generator.generate(batch, _gen(eos_id=first))[0, 0] == first  # ends at once without a minimum
  got = generator.generate(batch, _gen(eos_id=first, min_new_tokens=3))[0]
  assert first not in got[:3].tolist()


def test_vocab_limit_is_respected(generator, prompts):
  got = generator.generate(_batch(generator, prompts), _gen(vocab_limit=50))
  assert got.max() < 50


def test_make_prompt_batch_left_pads_with_positions_per_row(generator):
  cfg = generator.cfg
  b = decode.make_prompt_batch([[5, 6, 7], [8]], pad_id=0, image_pad_id=cfg.image_pad_id, image_tokens=16,
                               buckets=(4,), num_rows=3)
  np.testing.assert_array_equal(b.input_ids, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b.segment_ids, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b.positions, [[0, 0, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b.lengths, [3, 1, 0])


def test_make_prompt_batch_rejects_image_mismatches(generator, image_prompt):
  ids, image = image_prompt
  with pytest.raises(ValueError, match="prompt 0 holds 16 <imgpad>"):
    _batch(generator, [ids], [[]])
  with pytest.raises(ValueError, match="prompt 1 holds 0 <imgpad>"):
    _batch(generator, [ids, [4, 5]], [[image], [image]])
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    _batch(generator, [[]])


def test_bucket_length():
  assert decode.bucket_length(1, (8, 32)) == 8
  assert decode.bucket_length(9, (8, 32)) == 32
  assert decode.bucket_length(33, (8, 32)) == 64
  with pytest.raises(ValueError):
    decode.bucket_length(0)


def test_dynamic_ntk_base_is_per_row_and_follows_the_reference_formula(generator):
  llm = generator.cfg.llm  # tiny: seq_length 512, head_dim 16
  bases = decode.rope_bases(np.array([1, 512, 513, 1024, 1025]), generator.cfg, dynamic_ntk=True)
  # alpha = 2**ceil(log2(len/512) + 1) - 1 (min 1): 1, 1, 3, 3, 7; base * alpha**(16/14)
  expected = [llm.rope_base * a ** (16 / 14) for a in (1, 1, 3, 3, 7)]
  np.testing.assert_allclose(bases, expected, rtol=1e-6)
  assert (decode.rope_bases(np.array([5000]), generator.cfg, dynamic_ntk=False) == llm.rope_base).all()


def test_generation_config_validates():
  with pytest.raises(ValueError, match="max_new_tokens"):
    decode.GenerationConfig(max_new_tokens=0)
  with pytest.raises(ValueError, match="min_new_tokens"):
    decode.GenerationConfig(max_new_tokens=2, min_new_tokens=3)
  with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
    decode.GenerationConfig(do_sample=True, top_p=0)
  with pytest.raises(ValueError, match="stop words"):
    decode.GenerationConfig(stop_words=((),))


def test_generation_config_wants_numbers_of_the_right_type():
  """A float or string length passed the checks (5.5) or failed on '<' between str and int; 5.5 then failed inside
  the jitted loop's shapes."""
  with pytest.raises(ValueError, match="max_new_tokens must be an int, got float 5.5"):
    decode.GenerationConfig(max_new_tokens=5.5)
  with pytest.raises(ValueError, match="max_new_tokens must be an int, got str '5'"):
    decode.GenerationConfig(max_new_tokens="5")
  with pytest.raises(ValueError, match="top_p must be a number, got str"):
    decode.GenerationConfig(top_p="0.3")
  assert decode.GenerationConfig(max_new_tokens=np.int64(3), do_sample=True, top_p=np.float32(0.5)).top_p == 0.5


@pytest.mark.parametrize("knob", [{"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.3}])
def test_sampling_settings_without_do_sample_are_refused_not_ignored(knob):
  """Greedy decoding ignores them: `GenerationConfig(top_p=0.3)` decoded argmax without a word."""
  with pytest.raises(errors.ConfigError, match="act only when sampling, and do_sample=False decodes greedily"):
    decode.GenerationConfig(**knob)
  assert decode.GenerationConfig(do_sample=True, **knob).do_sample


def test_generator_arguments_of_the_wrong_kind_are_one_line(generator, tiny_model, prompts):
  """What a library user gets wrong first: `load()`'s result for the model, a list of ids for the batch, no
  config. Each was an AttributeError or a JAX indexing TypeError."""
  with pytest.raises(ValueError, match=r"Generator takes the model \(a QwenVL\), got str"):
    decode.Generator("runs/stage2")
  with pytest.raises(ValueError, match="the batch must be a PromptBatch, got list"):
    generator.generate(prompts, _gen())
  with pytest.raises(ValueError, match="the batch must be a PromptBatch, got list"):
    next(generator.stream(prompts, _gen()))
  with pytest.raises(ValueError, match="the generation config must be a GenerationConfig, got NoneType"):
    generator.generate(_batch(generator, prompts), None)
  with pytest.raises(errors.ConfigError, match="kv_cache_dtype must be None .* or 'int8', got 'bf16'"):
    decode.Generator(tiny_model, kv_cache_dtype="bf16")


def test_ids_outside_the_vocabulary_and_float_images_are_refused(generator, image_prompt):
  """Both gave a silently wrong answer: the embedding lookup clamps an id past the vocabulary (a prompt encoded
  with another tokenizer), and float images in [0, 1] were cast to an all-black uint8 picture."""
  vocab = generator.cfg.llm.vocab_size
  with pytest.raises(ValueError, match=f"token id {vocab}, outside the model's vocabulary 0..{vocab - 1}"):
    generator.generate(_batch(generator, [[5, vocab]]), _gen())
  with pytest.raises(ValueError, match="token id -1, outside"):
    generator.generate(_batch(generator, [[-1, 5]]), _gen())
  ids, image = image_prompt
  with pytest.raises(ValueError, match="images must be uint8 RGB arrays .* got dtype float32"):
    _batch(generator, [ids], [[image.astype(np.float32) / 255]])


def test_text_prompts_and_image_paths_are_named_not_parsed(generator, image_prompt):
  """Text for the ids was `invalid literal for int() with base 10: 'hello'`; a path for an image was 'all images
  must be uint8[S, S, 3] of one size, got shapes [()]'."""
  with pytest.raises(errors.ConfigError, match=r"prompt 1 is text \('hello'\); make_prompt_batch takes token ids"):
    _batch(generator, [[5, 6], "hello"])
  ids, _ = image_prompt
  with pytest.raises(errors.ConfigError, match="takes images as preprocessed uint8.* arrays, not paths"):
    _batch(generator, [ids], [["a.png"]])
