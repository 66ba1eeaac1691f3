"""Inference's `--attention=splash`: the TPU kernel in the image encoder and the prefills of `Generator` and the
serving engine, refused off a TPU before anything loads, and (in the Pallas interpreter, float32) the same
generations as the default xla attention."""
import numpy as np
import pytest

from qwenvl_jax import errors
from qwenvl_jax.inference import decode, loading, model_source
from qwenvl_jax.model import kernels
from qwenvl_jax.serving import slots as slots_lib

STEPS = 5


@pytest.fixture(scope="module")
def source(sp_model_file):
  return model_source.resolve(None, model="tiny", tokenizer=sp_model_file)


@pytest.fixture(scope="module")
def models(source):
  """(xla model, splash model): the same random weights (same seed), float32, one device."""
  xla = loading.load_source(source, dtype="float32", tensor_parallel=1)
  with kernels.interpret_mode():
    splash = loading.load_source(source, dtype="float32", tensor_parallel=1, attention="splash")
  return xla, splash


@pytest.fixture
def kernel_calls(monkeypatch):
  """(T, S) of each splash kernel call traced (so a silent fallback to xla fails the tests)."""
  calls = []
  real = kernels.splash_attention

  def recording(q, k, v, **kw):
    calls.append((q.shape[1], k.shape[1]))
    return real(q, k, v, **kw)

  monkeypatch.setattr(kernels, "splash_attention", recording)
  return calls


def test_splash_off_a_tpu_is_refused_before_anything_loads(source, monkeypatch):
  with pytest.raises(errors.ConfigError) as e:
    loading.check_attention("splash")
  assert errors.format_user_error(e.value) == (
      "error: --attention=splash is a TPU kernel, but JAX runs on 'cpu' here\n"
      "  hint: omit --attention (xla attention runs on any backend)")
  with pytest.raises(errors.ConfigError, match=r"--config.attention='cudnn': inference attention is one of xla, "
                                               r"splash"):
    loading.check_attention("cudnn", flag="--config.attention")
  loading.check_attention("splash", "tpu")
  with kernels.interpret_mode():
    loading.check_attention("splash")
  # load_source checks before the tokenizer, the mesh or any weight.
  monkeypatch.setattr(loading, "source_config", lambda *a, **k: pytest.fail("read the source"))
  with pytest.raises(errors.ConfigError, match="attention=splash is a TPU kernel"):
    loading.load_source(source, attention="splash")


def _prompts(tok, cfg, image):
  q = cfg.image_tokens
  with_image = (tok.encode("Picture 1:") + [tok.img_start_id] + [tok.img_pad_id] * q + [tok.img_end_id]
                + tok.encode("What is in the picture?"))
  return [with_image, tok.encode("a red circle and a blue square"), tok.encode("hello")], [[image], [], []]


def test_generation_with_splash_equals_xla(models, kernel_calls):
  """Generator: the ViT and the adapter (no mask) and the left-padded prefill (a square segment-causal mask, now
  that the prefill attends to the prompt slots only) run the kernel; the tokens are xla's and the first token's
  logits agree to float32 rounding."""
  (tok, cfg, _, _, xla_model), (_, splash_cfg, _, _, splash_model) = models
  assert (cfg.attention_impl, splash_cfg.attention_impl) == ("xla", "splash")
  image = np.random.default_rng(0).integers(0, 256, (cfg.vision.image_size,) * 2 + (3,), dtype=np.uint8)
  prompts, images = _prompts(tok, cfg, image)
  batch = decode.make_prompt_batch(prompts, images, pad_id=tok.eod_id, image_pad_id=cfg.image_pad_id,
                                   image_tokens=cfg.image_tokens, max_images=1, image_size=cfg.vision.image_size)
  gen = decode.GenerationConfig(max_new_tokens=STEPS, eos_id=-1, pad_id=tok.eod_id, vocab_limit=tok.vocab_size)
  expected = decode.Generator(xla_model).generate(batch, gen)
  with kernels.interpret_mode():
    generator = decode.Generator(splash_model)
    got = generator.generate(batch, gen)
    arrays = generator.device_batch(batch, gen)
    cache = splash_model.llm.init_cache(len(prompts), batch.input_ids.shape[1] + STEPS)
    logits, _ = decode.prefill(generator.graphdef, generator.state, arrays, cache, rope_base=arrays["rope_base"])
  ref = decode.Generator(xla_model)
  ref_logits, _ = decode.prefill(ref.graphdef, ref.state, arrays, xla_model.llm.init_cache(
      len(prompts), batch.input_ids.shape[1] + STEPS), rope_base=arrays["rope_base"])
  patches, p = (cfg.vision.image_size // cfg.vision.patch_size) ** 2, batch.input_ids.shape[1]
  assert {(patches, patches), (cfg.image_tokens, patches), (p, p)} <= set(kernel_calls), kernel_calls
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=2e-5)
  np.testing.assert_array_equal(got, expected)
  assert len(set(expected.ravel().tolist())) > 3, "a degenerate model would hide a wrong attention"


def test_the_serving_programs_with_splash_equal_xla(models, kernel_calls):
  """The engine's programs: image encoding (kernel), the right-padded prefill into slot rows (kernel: its mask is
  square) and the decode steps (xla either way) give xla's tokens and cache."""
  (tok, cfg, _, _, xla_model), (_, _, _, _, splash_model) = models
  image = np.random.default_rng(1).integers(0, 256, (1,) + (cfg.vision.image_size,) * 2 + (3,), dtype=np.uint8)
  prompts, _ = _prompts(tok, cfg, None)
  width = 32 * -(-max(map(len, prompts)) // 32)
  ids = np.full((2, width), tok.eod_id, np.int32)
  lengths = np.array([len(prompts[0]), len(prompts[1])], np.int32)
  for row, p in enumerate(prompts[:2]):
    ids[row, :len(p)] = p
  rope = np.full(2, cfg.llm.rope_base, np.float32)

  def run(model):
    slot_model = slots_lib.SlotModel(model, num_slots=4, context=width + 16, feature_slots=1)
    feats = slot_model.encode(image)
    first = slot_model.prefill(ids, lengths, np.array([0, 1], np.int32), feats, np.array([2, 0], np.int32),
                               rope, slots_lib.Sampling.greedy(2)).tokens
    out, last, pos = [np.asarray(first)], np.asarray(first), lengths.copy()
    for _ in range(STEPS):
      # Slot rows 2 and 0 hold the prompts: decode the first 3 rows, row 1 idle.
      tokens, positions = np.zeros(3, np.int32), np.zeros(3, np.int32)
      tokens[[2, 0]], positions[[2, 0]] = last, pos
      step = np.asarray(slot_model.decode(tokens, positions, np.array([True, False, True]), np.full(3, rope[0]),
                                          slots_lib.Sampling.greedy(3)).tokens)[0]
      last = step[[2, 0]]
      out.append(last)
      pos = pos + 1
    # The keys of the slots the prompts and the fed tokens filled ([L, N, slots, H] per prompt); the padding's
    # slots past them hold other values with the kernel (padding queries' outputs differ) and are never keys.
    k = np.asarray(slot_model.cache.k)
    filled = [k[:, row, :, :n + STEPS] for row, n in zip((2, 0), lengths)]
    return np.stack(out, 1), np.asarray(feats), filled, np.asarray(slot_model.cache.segment_ids)

  expected, feats, keys, segments = run(xla_model)
  with kernels.interpret_mode():
    got, got_feats, got_keys, got_segments = run(splash_model)
  patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
  assert {(patches, patches), (cfg.image_tokens, patches), (width, width)} <= set(kernel_calls), kernel_calls
  np.testing.assert_allclose(got_feats, feats, atol=2e-5)
  for a, b in zip(got_keys, keys):
    np.testing.assert_allclose(a, b, atol=2e-5)
  np.testing.assert_array_equal(got_segments, segments)
  np.testing.assert_array_equal(got, expected)
  assert len(set(expected.ravel().tolist())) > 3, "a degenerate model would hide a wrong attention"
