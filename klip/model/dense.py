"""The dense layers' product, with a weight gradient that XLA:CPU runs at its matmul rate.

A dense layer y = x W contracts x's trailing axes with W's leading ones. Its weight gradient
x^T dy contracts over the tokens, the leading axis of both operands; XLA:CPU hands such a dot
to Eigen, which runs B1's weight gradients well below the rate of the forward products, which
YNNPACK runs (YNNPACK takes only dots whose left operand is row-major [M, K]). On CPU the weight gradient here first copies the smaller of x and dy to its
transpose, so that the product is [K, M] x [M, N] and goes to YNNPACK (the copy is fenced with
an optimization barrier, or XLA folds it back into the dot); bench/README.md has its effect
on B1. Other platforms take the plain product at lowering
(`lax.platform_dependent`), as do products that are not a dense layer's.

The forward product stays a plain `lax.dot_general`, so remat policies that save dots
(`dots_saveable`, ...) still save it: only the weight's cotangent goes through a custom rule,
attached to a zero that is added to the output and that XLA folds away. Being a custom VJP, it
takes reverse-mode differentiation only (`jax.grad`, `jax.vjp`), not `jax.jvp`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

_NN = (((1,), (0,)), ((), ()))  # [M, K] x [K, N]


def _weight_grad_plain(x2: jax.Array, dy2: jax.Array) -> jax.Array:
  return lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())))


def _weight_grad_row_major(x2: jax.Array, dy2: jax.Array) -> jax.Array:
  """x2^T dy2 ([M, K], [M, N] -> [K, N]) as a product whose left operand is row-major."""
  fence = lax.optimization_barrier
  if x2.shape[1] <= dy2.shape[1]:
    return lax.dot_general(fence(x2.T), dy2, _NN)
  return fence(lax.dot_general(fence(dy2.T), x2, _NN)).T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _weight_grad(x: jax.Array, w: jax.Array, contracted: int, dtype) -> jax.Array:
  """Zeros of `dtype` shaped like x W (x's last `contracted` axes with w's first ones), whose
  cotangent rule returns nothing for x and x^T dy for w."""
  return jnp.zeros(x.shape[:x.ndim - contracted] + w.shape[contracted:], dtype)


def _weight_grad_fwd(x, w, contracted, dtype):
  return _weight_grad(x, w, contracted, dtype), (x, w)


def _weight_grad_bwd(contracted, dtype, residuals, dy):
  del dtype
  x, w = residuals  # w (a parameter, or its cast that the input gradient keeps) for its shape
  x2 = x.reshape(-1, math.prod(w.shape[:contracted]))
  dy2 = dy.reshape(x2.shape[0], -1).astype(x.dtype)
  dw = lax.platform_dependent(x2, dy2, cpu=_weight_grad_row_major, default=_weight_grad_plain)
  return None, dw.reshape(w.shape).astype(w.dtype)


_weight_grad.defvjp(_weight_grad_fwd, _weight_grad_bwd)


def dot_general(x: jax.Array, w: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None, out_sharding=None) -> jax.Array:
  """`lax.dot_general` for `nnx.Linear` / `nnx.LinearGeneral`'s `dot_general` argument: the
  same product and gradients, with the weight gradient computed as described above. Products
  with batch axes, other contractions, or a precision or output type set are left to
  `lax.dot_general` and its own gradient."""
  (x_axes, w_axes), batch = dimension_numbers
  n = len(x_axes)
  dense = (not any(batch) and tuple(w_axes) == tuple(range(n))
           and tuple(x_axes) == tuple(range(x.ndim - n, x.ndim))
           and precision is None and preferred_element_type is None)
  y = lax.dot_general(x, lax.stop_gradient(w) if dense else w, dimension_numbers,
                      precision=precision, preferred_element_type=preferred_element_type,
                      out_sharding=out_sharding)
  return y + _weight_grad(x, w, n, y.dtype) if dense else y
