"""Matmul FLOPs from the jaxpr, checked against closed-form counts (scan trips, remat, convolutions, cond)."""
import jax
import jax.numpy as jnp
import pytest

from qwenvl_jax.planning import jaxpr_flops, mesh as mesh_lib
from tests.planning import standin


@pytest.mark.parametrize("remat,factor", [(False, 1.0), (True, 4 / 3)])
def test_train_step_counts_every_layer_and_the_remat_recompute(remat, factor):
  width, depth, batch = 32, 5, 8
  mesh = mesh_lib.build_mesh(jax.devices())
  step, args, _, model_flops = standin.mlp_train_step(width, depth, batch, mesh, remat=remat)
  with jax.set_mesh(mesh):
    counted = jaxpr_flops.program_flops(step, *args)
  # Forward 2BD^2 per layer, backward 4BD^2; remat runs the forward again (+2BD^2).
  assert model_flops == 6 * batch * depth * width**2
  assert counted.flops == pytest.approx(factor * model_flops)
  assert counted.while_loops == 0


def test_batched_dot_and_nested_scans():
  x = jax.ShapeDtypeStruct((3, 4, 5), jnp.float32)
  y = jax.ShapeDtypeStruct((3, 5, 6), jnp.float32)

  def f(x, y):
    def outer(c, _):
      return c, jax.lax.scan(lambda c2, _: (c2, jnp.einsum("bij,bjk->bik", x, y)), 0, None, length=7)[1]
    return jax.lax.scan(outer, 0, None, length=2)[1]

  assert jaxpr_flops.program_flops(f, x, y).flops == 2 * 7 * (2 * 3 * 4 * 6 * 5)


def test_patch_convolution():
  images = jax.ShapeDtypeStruct((2, 28, 28, 3), jnp.float32)
  kernel = jax.ShapeDtypeStruct((14, 14, 3, 8), jnp.float32)

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (14, 14), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  # 2 x 2 x 2 output positions x 8 features, each a dot over a 14 x 14 x 3 patch.
  assert jaxpr_flops.program_flops(conv, images, kernel).flops == 2 * (2 * 2 * 2 * 8) * (14 * 14 * 3)


def test_cond_counts_the_dearer_branch_and_while_loops_are_reported():
  a = jnp.ones((4, 4))

  def f(p, a):
    return jax.lax.cond(p, lambda a: a @ a @ a, lambda a: a @ a, a)

  assert jaxpr_flops.program_flops(f, True, a).flops == 2 * (2 * 4 * 4 * 4)

  def g(a):
    return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ c[1]), (0, a))[1]

  counted = jaxpr_flops.program_flops(g, a)
  assert counted.while_loops == 1 and counted.flops == 2 * 4 * 4 * 4
