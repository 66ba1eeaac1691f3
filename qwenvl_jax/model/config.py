"""Architecture configs: frozen, keyword-only dataclasses and the named presets.

Each module receives only its own small config (`VisionConfig` for the ViT, `ResamplerConfig` for the adapter,
`LLMConfig` for the decoder); `QwenVLConfig` composes them with the numerics and memory knobs. Presets:

* `qwen_vl_7b()` — the released Qwen-VL / Qwen-VL-Chat sizes (QWENVL_SPEC §0, 9,656,935,168 parameters).
* `mid()` — about 1B parameters with the full Qwen vocabulary, for GPU benchmarks.
* `tiny()` — 365,632 parameters for tests and the CPU demo.

The input resolution (224 or 448) is `vision.image_size`; the same weights run at both, see `with_image_size`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from qwenvl_jax import errors

RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
AttentionImpl = Literal["xla", "xla_rows", "cudnn", "splash"]  # see model/attention.py


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise errors.ConfigError(msg)  # a ValueError: a bad preset override or flag


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
  """The ViT trunk (OpenCLIP ViT-bigG/14 as used by Qwen-VL, without class token and final LayerNorm)."""

  width: int = 1664
  layers: int = 48
  heads: int = 16
  mlp_dim: int = 8192  # int(1664 * 4.9231)
  patch_size: int = 14
  pos_grid: int = 16  # the stored positional table is pos_grid x pos_grid (the 224-px grid)
  image_size: int = 448
  ln_eps: float = 1e-6

  def __post_init__(self):
    _check(self.width % self.heads == 0, f"vision width {self.width} is not divisible by heads {self.heads}")
    _check(self.image_size > 0 and self.image_size % self.patch_size == 0,
           f"image_size {self.image_size} is not a positive multiple of patch_size {self.patch_size}")
    _check(min(self.width, self.layers, self.heads, self.mlp_dim, self.pos_grid) > 0, "vision sizes must be > 0")

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def grid(self) -> int:
    """Patches per side at the configured resolution (16 at 224 px, 32 at 448 px)."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResamplerConfig:
  """The position-aware adapter: grid*grid learned queries cross-attending to the ViT patches."""

  grid: int = 16  # queries = grid**2 = 256
  heads: int = 32
  ln_eps: float = 1e-6

  def __post_init__(self):
    _check(self.grid > 0 and self.heads > 0, "resampler grid and heads must be > 0")

  @property
  def num_queries(self) -> int:
    return self.grid * self.grid


@dataclasses.dataclass(frozen=True, kw_only=True)
class LLMConfig:
  """The Qwen-7B decoder (QWENVL_SPEC §2)."""

  vocab_size: int = 151936
  width: int = 4096
  layers: int = 32
  heads: int = 32
  head_dim: int = 128
  mlp_dim: int = 11008  # config intermediate_size 22016 // 2
  rms_eps: float = 1e-6
  rope_base: float = 10000.0
  seq_length: int = 2048  # threshold of dynamic NTK and logn scaling (inference only)

  def __post_init__(self):
    _check(self.heads * self.head_dim == self.width,
           f"heads * head_dim = {self.heads * self.head_dim} must equal width {self.width}")
    _check(self.head_dim % 2 == 0, "head_dim must be even for rotate-half RoPE")
    _check(min(self.vocab_size, self.layers, self.mlp_dim) > 0, "LLM sizes must be > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QwenVLConfig:
  """The whole model plus numerics (dtypes), memory (remat) and kernel choices."""

  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  resampler: ResamplerConfig = dataclasses.field(default_factory=ResamplerConfig)
  llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
  image_pad_id: int = 151859  # `<imgpad>`: positions whose embeddings are replaced by image features
  dtype: str = "bfloat16"  # compute dtype (the reference runs everything in bf16)
  param_dtype: str = "float32"
  remat_policy: RematPolicy = "full"
  attention_impl: AttentionImpl = "xla"
  # Unroll the scans over layers (True, or unroll factor k): for shallow models on CPU, where a scan's stacked
  # residual buffers (zero-filled, then written and read one layer at a time) cost more than the layers' math.
  scan_unroll: bool | int = 1
  # A CPU option (the CPU bench turns it on; same values up to float rounding, tests/model/test_cpu_layouts.py):
  # * the linear layers run as 2-D matmuls (`layers.flat_matmul`): XLA:CPU's gradient of a 3-D einsum transposes
  #   its operands and runs the weight-gradient dot slowly;
  # * the pixels are normalized and cut into patches in buffers of their own (optimization barriers): left to
  #   itself XLA:CPU fuses both into the patch matmul's operands as strided gathers, computed twice (forward and
  #   weight gradient): 45 ms for a 32-image batch, 14 ms with the barriers (PyTorch's conv: 5 ms).
  # Accelerators fuse these well and keep the einsums, whose letters shard independently: leave it off there.
  cpu_layouts: bool = False

  def __post_init__(self):
    _check(self.resampler.num_queries > 0, "the adapter needs queries")
    _check(self.llm.width % self.resampler.heads == 0,
           f"LLM width {self.llm.width} is not divisible by resampler heads {self.resampler.heads}")
    _check(0 <= self.image_pad_id < self.llm.vocab_size,
           f"image_pad_id {self.image_pad_id} is outside the vocabulary of {self.llm.vocab_size}")
    _check(self.dtype in ("bfloat16", "float32", "float16"),
           f"unknown dtype {self.dtype!r}; known: 'bfloat16', 'float32', 'float16'")
    _check(self.param_dtype in ("bfloat16", "float32"),
           f"unknown param_dtype {self.param_dtype!r}; known: 'bfloat16', 'float32'")
    _check(self.remat_policy in ("none", "full", "dots", "dots_no_batch"),
           f"unknown remat_policy {self.remat_policy!r}")
    _check(self.attention_impl in ("xla", "xla_rows", "cudnn", "splash"),
           f"unknown attention_impl {self.attention_impl!r}; known: 'xla', 'xla_rows' (CPU), 'cudnn' (GPU), "
           "'splash' (TPU)")

  @property
  def image_tokens(self) -> int:
    """Features each image contributes to the LLM: the `<imgpad>` slots of one `<img>...</img>` span."""
    return self.resampler.num_queries

  @property
  def attention_head_dims(self) -> tuple[int, int, int]:
    """The head dims of the model's three attentions, those `attention_impl` runs: ViT, adapter, LLM."""
    return self.vision.head_dim, self.llm.width // self.resampler.heads, self.llm.head_dim

  def with_image_size(self, image_size: int) -> "QwenVLConfig":
    """Same weights at another resolution (stage 1 at 224 px -> stage 2 at 448 px)."""
    return dataclasses.replace(self, vision=dataclasses.replace(self.vision, image_size=image_size))

  def with_cpu_formulations(self) -> "QwenVLConfig":
    """The same model (same parameters; values equal up to float rounding, tests/model/test_cpu_layouts.py) in
    the formulations XLA:CPU runs faster: row-wise attention where the default "xla" is set, `cpu_layouts`, and
    the layer scans unrolled when no stack is deeper than `CPU_UNROLL_MAX_LAYERS`. Used by the CPU train-step bench
    and by the trainer on a CPU backend (`config.cpu_options`)."""
    return dataclasses.replace(self, attention_impl="xla_rows" if self.attention_impl == "xla" else self.attention_impl,
                               cpu_layouts=True, scan_unroll=True if self.shallow else self.scan_unroll)

  @property
  def shallow(self) -> bool:
    """No layer stack deeper than `CPU_UNROLL_MAX_LAYERS` (the stacks CPU runs unroll)."""
    return max(self.vision.layers, self.llm.layers) <= CPU_UNROLL_MAX_LAYERS


# Shallow stacks (the `tiny` preset) are unrolled on CPU; deeper ones keep their scan, whose compile time does not
# grow with depth. `small`'s 12 layers unrolled gain little at small batches and lose at large ones: CPU seconds
# per JAX step, one core, scanned against unrolled, 2.27-2.37 / 2.22-2.35 at batch 1, 7.44-7.65 / 7.25-7.31 at
# batch 4, 29.7-30.2 / 33.7-34.3 at batch 16 (three steps each, seventh session; an earlier single measurement
# at batch 1 gave 1.96 / 1.81 s).
CPU_UNROLL_MAX_LAYERS = 8


def qwen_vl_7b(**overrides) -> QwenVLConfig:
  """Qwen-VL / Qwen-VL-Chat as released: 9,656,935,168 parameters."""
  return QwenVLConfig(**overrides)


def mid(**overrides) -> QwenVLConfig:
  """About 1.0B parameters (ViT-B/14-sized tower, 16-layer 1536-wide decoder, full vocabulary) for GPU benchmarks."""
  return QwenVLConfig(
      vision=VisionConfig(width=768, layers=12, heads=12, mlp_dim=3072),
      resampler=ResamplerConfig(grid=16, heads=12),
      llm=LLMConfig(width=1536, layers=16, heads=12, head_dim=128, mlp_dim=4096),
      **overrides)


def small(**overrides) -> QwenVLConfig:
  """About 110M parameters (6-layer 384-wide ViT, 12-layer 768-wide decoder, 8192-token vocabulary, 64 image
  tokens): big enough that a CPU train step is bound by its matmuls, not by per-op overhead, for CPU benchmarks
  (bench/bench_train_step.py)."""
  overrides.setdefault("image_pad_id", 8191)
  return QwenVLConfig(
      vision=VisionConfig(width=384, layers=6, heads=6, mlp_dim=1536, image_size=224),
      resampler=ResamplerConfig(grid=8, heads=12),
      llm=LLMConfig(vocab_size=8192, width=768, layers=12, heads=12, head_dim=64, mlp_dim=2048, seq_length=1024),
      **overrides)


def tiny(**overrides) -> QwenVLConfig:
  """A model that trains in minutes on a CPU: 16 image tokens, 1024-token vocabulary, 224 px.

  The decoder has 4 layers because with 2 a CPU run of 2000 steps learned where a shape is at some seeds only
  (bench/bench_synthetic_eval.py, one-shape grounding, lr 1e-3: 4 layers scored 0.46 / 0.67 / 0.71 at seeds
  0 / 1 / 2, 2 layers 0.15 / 0.48, against 0.15 for the best image-blind box; 3 layers were not tried).
  """
  overrides.setdefault("image_pad_id", 1023)
  return QwenVLConfig(
      vision=VisionConfig(width=32, layers=2, heads=2, mlp_dim=64, image_size=224),
      resampler=ResamplerConfig(grid=4, heads=2),
      llm=LLMConfig(vocab_size=1024, width=64, layers=4, heads=4, head_dim=16, mlp_dim=128, seq_length=512),
      **overrides)


PRESETS = {"qwen_vl_7b": qwen_vl_7b, "mid": mid, "small": small, "tiny": tiny}


def get_preset(name: str, **overrides) -> QwenVLConfig:
  """Looks a preset up by name; unknown names are an error that lists the known ones."""
  if name not in PRESETS:
    raise errors.ConfigError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  return PRESETS[name](**overrides)
