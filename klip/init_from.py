"""Initialising a new run from another run's checkpoint (parameters only, partial restore).

Every parameter whose path and shape match is copied; the ViT position embeddings are
resampled when the image size differs; everything else keeps its fresh initialisation. What
was copied, resized and left alone is printed.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from klip import checkpoint as checkpoint_lib
from klip.model import vit

_POSEMB = ("image", "posemb")


def _flat(tree, prefix=()):
  """(path, leaf) pairs; path parts are strings (a restored checkpoint has "0" for 0)."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, prefix + (str(k),))
    else:
      yield prefix + (str(k),), v


def _key(node, part: str):
  return part if part in node else int(part)


def load(state, shardings, path: str, model_config):
  """Returns `state` with model parameters taken from the checkpoint at `path`."""
  loaded = dict(_flat(checkpoint_lib.read_params(path)))
  pure = nnx.to_pure_dict(state)
  copied, resized, kept = 0, [], []
  model = pure["model"]
  for key, current in _flat(model):
    node = model
    for k in key[:-1]:
      node = node[_key(node, k)]
    source = loaded.get(key)
    if source is not None and source.shape == current.shape:
      node[_key(node, key[-1])] = np.asarray(source, current.dtype)
      copied += 1
    elif source is not None and key == _POSEMB:
      old = int(round(source.shape[0] ** 0.5))
      new = vit.patch_grid(model_config)
      node[_key(node, key[-1])] = np.asarray(vit.interpolate_posemb(source, old, new),
                                             current.dtype)
      resized.append(f"{'/'.join(key)} {source.shape} -> {current.shape}")
    else:
      kept.append("/".join(key) + ("" if source is None else f" (shape {source.shape} != "
                                                             f"{current.shape})"))
  print(f"init from {path}: {copied} parameters copied, resized {resized or 'none'}, "
        f"{len(kept)} left at initialisation{': ' + ', '.join(kept[:10]) if kept else ''}",
        flush=True)
  nnx.replace_by_pure_dict(state, pure)
  return jax.device_put(state, shardings)
