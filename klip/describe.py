r"""Builds a config's model and train state from shapes alone and prints what it would place.

  python -m klip.describe --config=configs/pretrain.py:base --devices=8

Nothing is allocated (`nnx.eval_shape`); with --devices=N the CPU pretends to have N devices so
the mesh and per-device parameter bytes of a pod-sized config can be read on a laptop.
"""

from __future__ import annotations

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from klip import train_state

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path:variant).",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 0, "Fake CPU devices (0: the real devices).")


def main(argv):
  del argv
  if _DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    jax.config.update("jax_platforms", "cpu")
  d = train_state.describe(_CONFIG.value)
  print(f"config {_CONFIG.value.variant}: {d['parameters']:,} parameters "
        f"({d['parameters'] / 1e6:.1f}M)")
  for name, n in d["parts"].items():
    print(f"  {name:12s} {n:>14,}")
  print(f"two towers (ViT + text encoder, without fusion cross-attention): "
        f"{d['two_tower']:,} ({d['two_tower'] / 1e6:.1f}M); fusion cross-attention "
        f"{d['fusion_cross_attention']:,}")
  print(f"mesh {d['mesh']}: train state (params + optimizer) "
        f"{d['state_bytes_per_device'] / 2**30:.2f} GiB per device")

if __name__ == "__main__":
  app.run(main)
