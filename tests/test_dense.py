"""Tests of `klip.model.dense.dot_general`: the dense layers' product and its weight gradient."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.ad_checkpoint import print_saved_residuals

from klip.model import dense

# (x shape, w shape, contracted axes): K < N, K > N, two contracted axes (the attention's
# output projection), two output axes (its query/key/value projections).
CASES = [((4, 7, 6), (6, 10), 1), ((4, 7, 10), (10, 6), 1), ((4, 7, 3, 5), (3, 5, 8), 2),
         ((4, 7, 8), (8, 3, 5), 1)]


def _dims(x_ndim, contracted):
  return ((tuple(range(x_ndim - contracted, x_ndim)), tuple(range(contracted))), ((), ()))


def _loss(dot, dims):
  return lambda x, w: jnp.sum(jnp.sin(dot(x, w, dims)) * jnp.arange(1.0, 1.0 + w.shape[-1]))


@pytest.mark.parametrize("x_shape,w_shape,contracted", CASES)
def test_value_and_gradients_equal_lax_dot_general(x_shape, w_shape, contracted):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
  dims = _dims(len(x_shape), contracted)
  want = jax.value_and_grad(_loss(lax.dot_general, dims), argnums=(0, 1))(x, w)
  got = jax.jit(jax.value_and_grad(_loss(dense.dot_general, dims), argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    assert g.shape == r.shape and g.dtype == r.dtype
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_keep_their_dtypes():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((16, 24)), jnp.bfloat16)
  dims = _dims(3, 1)
  loss = lambda dot: lambda x, w: jnp.sum(dot(x, w, dims).astype(jnp.float32) ** 2)
  want = jax.grad(loss(lax.dot_general), argnums=(0, 1))(x, w)
  got = jax.jit(jax.grad(loss(dense.dot_general), argnums=(0, 1)))(x, w)
  for g, r in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=0.02,
                               atol=0.05)


def test_products_that_are_not_dense_layers_are_plain():
  """Batch dimensions, or a contraction over leading axes of x, take lax.dot_general as is."""
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((3, 5, 6)), jnp.float32)
  c = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
  for x, w, dims in [(a, b, (((2,), (1,)), ((0,), (0,)))), (a, c, (((2,), (0,)), ((), ()))),
                     (a.transpose(2, 1, 0), c.T, (((0,), (1,)), ((), ())))]:
    f = lambda dot: lambda x, w: jnp.sum(jnp.cos(dot(x, w, dims)))
    want = jax.grad(f(lax.dot_general), argnums=(0, 1))(x, w)
    got = jax.grad(f(dense.dot_general), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_remat_policies_still_save_the_product(capsys):
  """The forward product is a plain dot_general, so `dots_saveable` keeps it for the backward
  pass (a custom rule around the whole product would hide it from the policy)."""
  dims = _dims(2, 1)

  def two_layers(x, w1, w2):
    return jnp.sum(jnp.tanh(dense.dot_general(jnp.tanh(dense.dot_general(x, w1, dims)), w2,
                                              dims)))

  policy = jax.checkpoint_policies.dots_saveable
  print_saved_residuals(jax.checkpoint(two_layers, policy=policy),
                        jnp.ones((8, 4)), jnp.ones((4, 6)), jnp.ones((6, 3)))
  saved = capsys.readouterr().out
  assert "f32[8,6] output of dot_general" in saved
  assert "f32[8,3] output of dot_general" in saved


def _weight_grad_dots(dot, x_shape, w_shape):
  """The compiled gradient program's dot instructions as (output shape, lhs contracting dims)."""
  x, w = jnp.zeros(x_shape), jnp.zeros(w_shape)
  text = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(dot(x, w, _dims(3, 1)))),
                          argnums=(0, 1))).lower(x, w).compile().as_text()
  return re.findall(r"= f32\[([\d,]+)\]\{[\d,]+\} dot\(.*?lhs_contracting_dims=\{([\d,]+)\}",
                    text)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the row-major weight gradient is "
                    "XLA:CPU's (other platforms take the plain product)")
@pytest.mark.parametrize("w_shape", [(48, 96), (96, 48)])
def test_cpu_weight_gradient_has_a_row_major_left_operand(w_shape):
  """On CPU the weight gradient's left operand contracts its last axis (YNNPACK takes only
  those); XLA's own gradient contracts the leading (token) axis, which Eigen runs."""
  x_shape = (4, 16, w_shape[0])
  plain = _weight_grad_dots(lax.dot_general, x_shape, w_shape)
  ours = _weight_grad_dots(dense.dot_general, x_shape, w_shape)
  w_grad = ",".join(map(str, w_shape))
  assert (w_grad, "0") in plain, plain  # the premise: XLA's gradient is not row-major
  assert any(shape in (w_grad, f"{w_shape[1]},{w_shape[0]}") and lhs == "1"
             for shape, lhs in ours), ours
  assert all(lhs == "1" for _, lhs in ours), ours


def test_other_platforms_lower_the_plain_weight_gradient():
  """Lowered for GPU or TPU (jax.export, no device needed) the weight gradient is XLA's own:
  no transposed copy behind an optimization barrier; lowered for CPU it has one."""
  x, w = jnp.zeros((4, 16, 48)), jnp.zeros((48, 96))
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(dense.dot_general(x, w, _dims(3, 1)))),
                          argnums=(0, 1)))
  fenced = {platform: "optimization_barrier" in
            jax.export.export(grad, platforms=[platform])(x, w).mlir_module()
            for platform in ("cpu", "cuda", "tpu")}
  assert fenced == {"cpu": True, "cuda": False, "tpu": False}
