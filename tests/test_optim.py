"""The weight-decay mask: decided by what a parameter is, the same with scanned layers (params
stacked along a leading layers axis) as without."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import pretrain
from klip import optim
from klip.model.two_tower import Model

NOT_DECAYED = ("bias", "scale", "logit_scale", "logit_bias", "itm_log_scale", "posemb", "cls",
               "cls_posemb")


def _config(scan: bool):
  config = pretrain.get_config("smoke")
  config.model.scan_layers = scan
  return config


def _names(path) -> tuple:
  """The path's dict keys (the Variables' `.value` attribute key left out)."""
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def _flat(tree) -> dict:
  return {_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("pure", [False, True])  # optax sees Variables at init, arrays later
def test_decay_mask_decays_kernels_and_embeddings_only(scan, pure):
  model = nnx.eval_shape(lambda: Model(_config(scan).model, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  if pure:
    params = nnx.as_pure(params)
  shapes, mask = _flat(params), _flat(optim.decay_mask(params))
  assert mask.keys() == shapes.keys()
  stacked = [p for p in shapes if "blocks" in p and p[-1] == "bias" and len(shapes[p].shape) > 1
             and not isinstance(p[p.index("blocks") + 1], int)]
  assert bool(stacked) == scan  # the scanned model has rank-2 (stacked) biases
  for path, decayed in mask.items():
    if path[-1] in ("kernel", "embedding"):
      assert decayed, f"{'/'.join(map(str, path))} {shapes[path].shape} is not decayed"
    else:
      assert path[-1] in NOT_DECAYED, path
      assert not decayed, f"{'/'.join(map(str, path))} {shapes[path].shape} is decayed"


def test_scanned_and_looped_models_decay_the_same_parameters():
  def by_name(scan):
    model = nnx.eval_shape(lambda: Model(_config(scan).model, rngs=nnx.Rngs(0)))
    mask = _flat(optim.decay_mask(nnx.state(model, nnx.Param)))
    return {tuple(k for k in path if not isinstance(k, int)): v for path, v in mask.items()}

  assert by_name(True) == by_name(False)


def test_adamw_step_decays_stacked_kernels_but_not_stacked_norms_or_biases():
  """One step of the real optimizer with zero gradients on a scanned model's params (all
  ones): only the weight decay moves a parameter."""
  config = _config(scan=True)
  config.optim.update(lr=1.0, warmup_steps=0, weight_decay=0.5)
  model = nnx.eval_shape(lambda: Model(config.model, rngs=nnx.Rngs(0)))
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                        nnx.as_pure(nnx.state(model, nnx.Param)))
  tx = optim.make(config)

  @jax.jit
  def step(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    return optax.apply_updates(params, updates)

  for path, value in _flat(step(params)).items():
    name = "/".join(map(str, path))
    if path[-1] == "kernel":
      np.testing.assert_allclose(value, 0.5, rtol=1e-6, err_msg=name)
    elif path[-1] in ("bias", "scale"):
      np.testing.assert_array_equal(value, 1.0, err_msg=name)
