"""What a person watching a run wants: JSON lines, TensorBoard, a progress line, a loss plot."""

from __future__ import annotations

import json
import math
import time

from etils import epath
from tensorboardX import SummaryWriter

from klip import paths


class MetricsWriter:
  """Writes DIR/metrics.jsonl and TensorBoard events under DIR/tb (process 0 only); DIR may be
  a gs:// prefix (klip/paths.py: each row rewrites the object there; tensorboardX writes gs://
  through google-cloud-storage)."""

  def __init__(self, workdir: str, *, total_steps: int, batch_size: int, enabled: bool = True):
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.enabled = enabled
    self._total = total_steps
    self._batch = batch_size
    self._tb = SummaryWriter(str(epath.Path(workdir) / "tb")) if enabled else None
    self._last = None  # (step, time) of the last progress line

  def truncate_after(self, step: int) -> None:
    """Drops rows past `step`: a resumed run re-logs the steps after its checkpoint."""
    if not self.enabled or not self.path.exists():
      return
    kept = [r for r in read(self.path) if r["step"] <= step]
    paths.write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    paths.append(self.path, json.dumps({"step": step, **metrics}) + "\n")
    for k, v in metrics.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)

  def progress(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
    """Prints a progress line; returns the throughput numbers it computed."""
    now = time.time()
    rates = {}
    if self._last is not None and step > self._last[0]:
      steps_per_s = (step - self._last[0]) / max(now - self._last[1], 1e-9)
      rates = {"perf/steps_per_s": steps_per_s,
               "perf/examples_per_s": steps_per_s * self._batch}
      eta = (self._total - step) / steps_per_s
      rate_text = (f" | {steps_per_s:.2f} steps/s {rates['perf/examples_per_s']:.0f} ex/s"
                   f" | ETA {_duration(eta)}")
    else:
      rate_text = ""
    self._last = (step, now)
    if self.enabled:
      losses = " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                        if k == "loss" or k.endswith("/loss"))
      print(f"step {step}/{self._total} | {losses}{rate_text}", flush=True)
    return rates

  def close(self, quiet: bool = False) -> None:
    """Flushes and closes TensorBoard's writer; quiet: an OSError on the way (a full disk) is
    dropped, since metrics.jsonl, not the events, is what a resumed run rewrites."""
    if self._tb is not None:
      try:
        self._tb.close()
      except OSError:
        if not quiet:
          raise
      self._tb = None


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


def read(path) -> list[dict]:
  """The rows of a metrics.jsonl. A last line without its newline that does not parse is a
  write torn by a kill or a full disk and is dropped (the resumed run writes that step again);
  any other bad line is an error naming it."""
  with epath.Path(path).open() as f:
    lines = f.readlines()
  rows = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if n == len(lines) and not line.endswith("\n"):
        break
      raise ValueError(f"{path}:{n}: not a JSON metrics row ({e})") from None
  return rows


def plot_losses(metrics_path, out_path) -> str:
  """A PNG of every loss in metrics.jsonl against step."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = read(metrics_path)
  keys = sorted({k for r in rows for k in r if k == "loss" or k.endswith("/loss")})
  fig, ax = plt.subplots(figsize=(7, 4))
  for k in keys:
    pts = [(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])]
    if pts:
      ax.plot(*zip(*pts), label=k)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with epath.Path(out_path).open("wb") as f:  # one object write on GCS
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)
  return str(out_path)
