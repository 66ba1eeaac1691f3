"""Positional encodings against PyTorch: bicubic interpolation (F.interpolate), the MAE sin-cos table, RoPE."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qwenvl_jax.model import positional
from tests.model import torch_reference


def _torch_resize(table: np.ndarray, out: int) -> np.ndarray:
  g = int(round(table.shape[0] ** 0.5))
  x = torch.from_numpy(table).reshape(1, g, g, -1).permute(0, 3, 1, 2)
  y = F.interpolate(x, size=(out, out), mode="bicubic", align_corners=False)
  return y.permute(0, 2, 3, 1).reshape(out * out, -1).numpy()


@pytest.mark.parity
@pytest.mark.parametrize("src,dst", [(16, 32), (16, 16), (4, 16), (16, 20), (7, 5)])
def test_interpolate_grid_matches_torch_bicubic(src, dst):
  # Tolerance: float32 accumulation order differs between the separable matmuls and PyTorch's kernel.
  table = np.random.default_rng(src * 100 + dst).normal(size=(src * src, 6)).astype(np.float32)
  ours = np.asarray(positional.interpolate_grid(table, dst))
  np.testing.assert_allclose(ours, _torch_resize(table, dst), rtol=1e-5, atol=1e-5)


def test_bicubic_matrix_is_torch_semantics_not_keys():
  # Row 0 and 1 of the 16 -> 32 matrix (QWENVL_SPEC §1.3): A = -0.75 with clamped borders.
  m = positional.bicubic_matrix(16, 32)
  np.testing.assert_allclose(m[0, :2], [1.10546875, -0.10546875], atol=1e-7)
  np.testing.assert_allclose(m[1, :3], [0.7734375, 0.26171875, -0.03515625], atol=1e-7)
  np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
  eye = torch.eye(16).reshape(1, 1, 16, 16)
  # Independent check of the whole matrix: interpolate one-hot columns along one axis with PyTorch.
  cols = F.interpolate(eye, size=(16, 32), mode="bicubic", align_corners=False)[0, 0]  # [16 src, 32 dst]
  np.testing.assert_allclose(m, cols.numpy().T, atol=1e-6)


def test_sincos_matches_mae_recipe():
  ours = positional.sincos_2d(64, 4)
  ref = torch_reference.mae_sincos_2d(64, 4)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
  # Gotcha 7: the first half encodes the column index: rows 0 and 1 differ only in their second half.
  assert np.allclose(ours[0, :32], ours[4, :32]) and not np.allclose(ours[0, :32], ours[1, :32])


def test_sincos_rejects_bad_dim():
  with pytest.raises(ValueError, match="divisible by 4"):
    positional.sincos_2d(30, 4)


def test_ntk_base_follows_reference_thresholds():
  base = 10000.0
  assert positional.ntk_rope_base(base, 128, 2048, 2048) == base
  assert positional.ntk_rope_base(base, 128, 1, 2048) == base
  assert positional.ntk_rope_base(base, 128, 2049, 2048) == pytest.approx(base * 3 ** (128 / 126))
  assert positional.ntk_rope_base(base, 128, 4096, 2048) == pytest.approx(base * 3 ** (128 / 126))
  assert positional.ntk_rope_base(base, 128, 4097, 2048) == pytest.approx(base * 7 ** (128 / 126))


def test_logn_scale_only_past_seq_length():
  pos = np.array([[0, 2046, 2047, 2048, 4095]])
  s = np.asarray(positional.logn_scale(pos, 2048))
  np.testing.assert_allclose(s, [[1, 1, 1, np.log(2049) / np.log(2048), np.log(4096) / np.log(2048)]], rtol=1e-6)
