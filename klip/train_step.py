"""The train step: one jitted function of (state, batch, step) with donated state.

Kept apart from `klip/train.py` (which wires in data, checkpoints and logging) so that it imports
only jax, flax, optax and the model code: benchmarks and the GPU script build the very same step
on hosts without the input stack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from klip import faults
from klip import objectives
from klip import optim


def make_train_step(config, graphdef):
  accum = config.grad_accum_steps
  mcfg = config.loss.momentum

  def loss_and_grads(model, batch, rng, momentum):
    mgraph, params = nnx.split(model)

    def loss_fn(p, mb):
      return objectives.total(nnx.merge(mgraph, p), mb, rng, config, momentum)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      return grad_fn(params, batch)
    micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]),
                         batch)

    def body(carry, mb):
      return jax.tree.map(jnp.add, carry, grad_fn(params, mb)), None

    zero = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro)))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
    total, _ = jax.lax.scan(body, zero, micro)
    return jax.tree.map(lambda x: x / accum, total)

  def train_step(state, batch, step):
    # A read-only view: the new state is built from pure arrays below, never by mutating
    # Variables, so XLA can update the donated buffers in place.
    ts = nnx.merge(graphdef, state)
    # the key is made inside the trace: an eager one would run on the default backend, which
    # compile-only devices (klip.compile_ahead --topology) cannot
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    momentum = ((ts.momentum, (ts.image_queue[...], ts.text_queue[...])) if mcfg.enabled
                else None)
    (loss, (metrics, features)), grads = loss_and_grads(ts.model, batch, rng, momentum)
    if (bad_step := faults.planned("nonfinite_loss_at_step")) is not None:
      loss = jnp.where(step == bad_step, jnp.nan, loss)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    opt = ts.optimizer
    params = nnx.as_pure(nnx.state(ts.model, nnx.Param))
    opt_state = nnx.as_pure(opt.opt_state)
    lr = optim.schedule(config)(opt.step[...])

    def apply(operands):
      g, p, s = operands
      updates, new_s = opt.tx.update(g, s, p)
      return optax.apply_updates(p, updates), new_s

    # A non-finite update is skipped (the counter counts it): the optimizer runs inside a
    # conditional whose other branch returns the old state. Selecting each new array against
    # its old value instead split XLA's fusions, and the donated optimizer state was copied
    # every step (bench/README.md, B1).
    new_params, new_opt_state = jax.lax.cond(finite, apply, lambda o: o[1:],
                                              (nnx.as_pure(grads), params, opt_state))
    nnx.update(ts.model, new_params)
    nnx.update(opt.opt_state, nnx.state(new_opt_state))
    opt.step[...] = opt.step[...] + finite.astype(opt.step.dtype)
    if mcfg.enabled:
      # EMA of the model into the momentum encoders; the batch's momentum features enqueued
      # (both kept as they were on a skipped update).
      keep = lambda new, old: jnp.where(finite, new, old)
      old = nnx.as_pure(nnx.state(ts.momentum, nnx.Param))
      ema = jax.tree.map(lambda m, p: mcfg.decay * m + (1 - mcfg.decay) * p, old, new_params)
      nnx.update(ts.momentum, jax.tree.map(keep, ema, old))
      ptr = ts.queue_ptr[...]
      for queue, feats in ((ts.image_queue, features[0]), (ts.text_queue, features[1])):
        queue[...] = keep(jax.lax.dynamic_update_slice(queue[...], feats.astype(queue.dtype),
                                                       (ptr, 0)), queue[...])
      ts.queue_ptr[...] = keep((ptr + features[0].shape[0]) % mcfg.queue_size, ptr)
    ts.nonfinite[...] = ts.nonfinite[...] + (~finite).astype(jnp.int32)
    metrics.update({"loss": loss, "grad_norm": grad_norm,
                    "param_norm": optax.global_norm(new_params), "learning_rate": lr,
                    "nonfinite_updates": ts.nonfinite[...],
                    "data/valid": jnp.sum(batch["valid"])})
    return nnx.state(ts), metrics

  return train_step
