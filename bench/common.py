"""Shared benchmark machinery: configs at the benchmark shapes, the project's train step, the
same-run f32 matmul calibration, interleaved timing, the open_clip worker, tables and
bench/RESULTS.md rows.

Import this module before jax (it sets the CPU platform unless JAX_PLATFORMS is already set).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

from klip import host_memory

if os.environ.get("BENCH_PLATFORM", "cpu") == "cpu":  # bench/gpu_step.py sets "auto"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
OUT_DIR = os.environ.get("OUT") or os.path.join(ROOT, "bench", "out")
BENCH_PYTHON = os.path.join(ROOT, ".venv-bench", "bin", "python")

# The side-by-side shapes (B1, B4): ViT-Ti/16 or ViT-S/16 at 224 px, 12 x 512 text, 64 tokens.
VITS = {"ti": (192, 12, 3), "s": (384, 12, 6)}
TEXT = (512, 12, 8)
MAX_LEN = 64
IMAGE_SIZE, PATCH, CHANNELS = 224, 16, 3  # open_clip's ViT takes 3 channels
EMBED_DIM = 256
VOCAB = 32000  # the project's base vocabulary, on both sides


# ---------------------------------------------------------------------------------------------
# Configs (configs/pretrain.py fields only).
# ---------------------------------------------------------------------------------------------
def pair_config(vit: str = "ti", *, full: bool = False, batch: int = 16, vocab: int = VOCAB):
  """configs/pretrain.py:base overridden to the side-by-side shapes, float32, no scan/remat,
  and open_clip's image vector (the CLS token, learned position embeddings), no clause
  contrast.

  full=False: contrast only (match and reconstruct weights 0, `text.fusion_layers=0` and
  `decoder.depth=0`: no fusion blocks, no decoder, as open_clip).
  full=True: the three objectives with base's fusion blocks and decoder depth.
  """
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  c = pretrain.get_config("base")
  c.unlock()
  width, depth, heads = VITS[vit]
  t_width, t_depth, t_heads = TEXT
  m = c.model
  m.image_size, m.patch_size, m.channels = IMAGE_SIZE, PATCH, CHANNELS
  m.vit.update(width=width, depth=depth, heads=heads, mlp_dim=4 * width)
  m.text.update(vocab_size=vocab, max_len=MAX_LEN, width=t_width, depth=t_depth, heads=t_heads,
                mlp_dim=4 * t_width)
  if not full:
    m.text.fusion_layers = m.decoder.depth = 0
  m.update(embed_dim=EMBED_DIM, dtype="float32", scan_layers=False, remat_policy="none",
           pool="cls", posemb="learned")
  c.loss.clause_contrast_weight = 0.0
  c.batch_size = batch
  if not full:
    c.loss.update(match_weight=0.0, reconstruct_weight=0.0)
  c.mesh.update(slice=1, data=-1, fsdp=1, tensor=1)
  c.scio.enabled = False
  c.lock()
  return c


def variant_config(variant: str, **overrides):
  """configs/pretrain.py:VARIANT with dotted-key overrides."""
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  c = pretrain.get_config(variant)
  c.unlock()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.lock()
  return c


# ---------------------------------------------------------------------------------------------
# Synthetic batches shaped like the pipeline's.
# ---------------------------------------------------------------------------------------------
def synthetic_batch(config, seed: int = 0, batch: int | None = None) -> dict:
  """A batch as `klip.data.pipeline` makes it: images in [-1, 1], [ENC]-first token ids with
  no padding, eight value spans of 3 tokens (clause ids 0-7), unit weights; with clause
  contrast on, `clause_tokens` (and its rivals with `loss.clause_rivals`)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  m = config.model
  b = batch or config.batch_size
  rng = np.random.default_rng(seed)
  length = m.text.max_len
  tokens = rng.integers(6, m.text.vocab_size, (b, length), dtype=np.int32)
  tokens[:, 0] = 2  # [ENC]
  clause = np.full((b, length), -1, np.int32)
  for k in range(8):
    start = 2 + k * max((length - 2) // 8, 4)
    if start + 3 <= length:
      clause[:, start:start + 3] = k
  batch = {"image": rng.uniform(-1, 1, (b, m.image_size, m.image_size, m.channels)
                                ).astype(np.float32),
           "tokens": tokens, "clause": clause, "weight": np.ones(b, np.float32),
           "valid": np.ones(b, np.int32), "index": np.arange(b, dtype=np.int32)}
  if config.loss.clause_contrast_weight:  # one clause alone: its first clause_max_len tokens
    batch["clause_tokens"] = tokens[:, :config.loss.clause_max_len].copy()
    if config.loss.clause_rivals:  # ... and that clause with other values
      rivals = np.repeat(batch["clause_tokens"][:, None], config.loss.clause_rivals, axis=1)
      rivals[..., -3:] = rng.integers(6, m.text.vocab_size, rivals[..., -3:].shape)
      batch.update(rival_tokens=rivals,
                   has_rival=np.ones((b, config.loss.clause_rivals), np.int32))
  if config.loss.clause_negatives and config.loss.match_weight:  # one value span swapped
    swap = tokens.copy()
    swap[clause == 0] = rng.integers(6, m.text.vocab_size, int(np.sum(clause == 0)))
    batch.update(swap_tokens=swap, has_swap=np.ones(b, np.int32))
  return batch


# ---------------------------------------------------------------------------------------------
# The project's train step (klip.train_step.make_train_step), jitted as klip.train jits it.
# ---------------------------------------------------------------------------------------------
class ProjectStep:
  """State from `klip.train_state.create`, the step from `make_train_step`, with the trainer's
  shardings, donation and mesh/rules context. `make_train_step` defaults to the trainer's."""

  def __init__(self, config, make_train_step=None, batch: dict | None = None, devices=None):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from flax.core import spmd as core_spmd  # pylint: disable=g-import-not-at-top
    from klip import sharding, train_state  # pylint: disable=g-import-not-at-top
    if make_train_step is None:
      from klip.train_step import make_train_step  # pylint: disable=g-import-not-at-top
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = tuple((k, v) for k, v in config.sharding_rules)
    self._ctx = lambda: _Both(jax.set_mesh(self.mesh), core_spmd.logical_axis_rules(self.rules))
    t = time.perf_counter()
    self.graphdef, self.state, self.shardings = train_state.create(config, self.mesh, self.rules)
    jax.block_until_ready(self.state)
    self.init_seconds = time.perf_counter() - t
    batch = batch if batch is not None else synthetic_batch(config)
    with self._ctx():
      self.batch_sh = {k: sharding.batch_sharding(self.mesh, self.rules, v.ndim)
                       for k, v in batch.items()}
      replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      self.fn = jax.jit(make_train_step(config, self.graphdef),
                        in_shardings=(self.shardings, self.batch_sh, replicated),
                        out_shardings=(self.shardings, replicated), donate_argnums=0)
    self.batch = {k: jax.device_put(v, self.batch_sh[k]) for k, v in batch.items()}
    self.step_no = 0
    self._jnp = jnp
    self.compiled = None

  def compile(self) -> dict:
    """Lowers and compiles; returns {'lower_s', 'compile_s'} (no persistent cache is set)."""
    with self._ctx():
      t0 = time.perf_counter()
      lowered = self.fn.lower(self.state, self.batch, self._jnp.asarray(0, self._jnp.int32))
      t1 = time.perf_counter()
      self.compiled = lowered.compile()
      t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1}

  def run(self, steps: int = 1) -> list[float]:
    """Seconds of each of `steps` steps (each waited for)."""
    import jax  # pylint: disable=g-import-not-at-top
    fn = self.compiled or self.fn
    times = []
    with self._ctx():
      for _ in range(steps):
        t = time.perf_counter()
        self.state, metrics = fn(self.state, self.batch,
                                 self._jnp.asarray(self.step_no, self._jnp.int32))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
        self.step_no += 1
    self.last_metrics = metrics
    return times


class _Both:
  def __init__(self, *cms):
    self._cms = cms

  def __enter__(self):
    for cm in self._cms:
      cm.__enter__()

  def __exit__(self, *exc):
    for cm in reversed(self._cms):
      cm.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# Calibration: the same-run f32 matmul rate.
# ---------------------------------------------------------------------------------------------
class MatmulCalibration:
  """XLA [n, n] x [n, n] matmul (f32 unless told) on the default device; `measure()` -> FLOP/s
  (median of the reps). Each rep times `inner` products dispatched back to back: on a GPU one
  8192^3 product takes about 1.4 ms, and timing it alone counts the dispatch too (an H200 read
  593-680 TFLOP/s that way while the step's own GEMM kernels ran at 800)."""

  def __init__(self, n: int = 2048, dtype: str = "float32", inner: int = 1):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self.n = n
    self.inner = inner
    k1, k2 = jax.random.split(jax.random.key(0))
    self.a = jax.random.normal(k1, (n, n), getattr(jnp, dtype))
    self.b = jax.random.normal(k2, (n, n), getattr(jnp, dtype))
    self.fn = jax.jit(lambda a, b: a @ b)
    self.fn(self.a, self.b).block_until_ready()

  def measure(self, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      outs = [self.fn(self.a, self.b) for _ in range(self.inner)]
      for out in outs:
        out.block_until_ready()
      times.append((time.perf_counter() - t) / self.inner)
    return 2.0 * self.n ** 3 / statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Interleaved rounds.
# ---------------------------------------------------------------------------------------------
def interleave(tasks: dict, rounds: int, log=None) -> dict[str, list[float]]:
  """Runs each task (a callable returning one measured rate) once per round, in order, for
  `rounds` rounds; returns {task: [rate per round]}."""
  out = {k: [] for k in tasks}
  for r in range(rounds):
    for name, fn in tasks.items():
      out[name].append(float(fn()))
      if log:
        log(f"  round {r + 1}/{rounds} {name}: {out[name][-1]:.4g}")
  return out


def median(xs) -> float:
  xs = [x for x in xs if x == x]
  return float(statistics.median(xs)) if xs else float("nan")


def ratios(a: list[float], b: list[float]) -> list[float]:
  """Per-round ratios a[i] / b[i] (same-round, so slow load shifts cancel)."""
  return [x / y for x, y in zip(a, b) if y]


# ---------------------------------------------------------------------------------------------
# open_clip worker (in .venv-bench).
# ---------------------------------------------------------------------------------------------
class TorchSide:
  """The open_clip worker process (bench/torch_side.py in .venv-bench), driven by JSON lines."""

  def __init__(self, python: str = BENCH_PYTHON, threads: int = 2, env: dict | None = None,
               base_env: dict | None = None):
    if not os.path.exists(python):
      raise FileNotFoundError(
          f"{python} is missing: the open_clip side runs in .venv-bench. Create it with "
          "`make bench-venv` (or run the benchmark with --torch=false)")
    env = dict(os.environ if base_env is None else base_env, BENCH_THREADS=str(threads),
               OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="", **(env or {}))
    self.proc = subprocess.Popen([python, os.path.join(ROOT, "bench", "torch_side.py")],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                 text=True, bufsize=1)
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the open_clip worker exited (code {self.proc.poll()}); see stderr")
    return json.loads(line)

  def __call__(self, op: str, **kw) -> dict:
    self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
    self.proc.stdin.flush()
    out = self._read()
    if not out.pop("ok", False):
      raise RuntimeError(f"open_clip worker {op} failed: {out.get('error')}")
    return out

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=30)
      except (BrokenPipeError, subprocess.TimeoutExpired):
        self.proc.kill()


# The open_clip workers: torch as installed, and with OpenMP's passive wait. GNU OpenMP threads
# spin-wait between parallel regions; on a loaded machine (a descheduled thread) that costs
# torch far more than XLA's thread pool, so both are measured and the faster one is compared.
# When this process runs with glibc's huge pages (klip/host_memory.py, which the JAX side gains
# from), the workers inherit them and a third runs torch with glibc's default 4 KiB pages, so
# open_clip is compared under whichever host setting suits it.
TORCH_WORKERS = {"torch": {}, "torchp": {"OMP_WAIT_POLICY": "PASSIVE"}}
TORCH_LABELS = {"torch": "open_clip", "torchp": "open_clip OMP passive",
                "torchg": "open_clip 4 KiB pages"}


def torch_workers(which: str) -> dict:
  """{'torch': TorchSide, ...} for which in 'both', 'default', 'passive', 'none'.

  'both' and 'default' add the 'torchg' worker (glibc's default pages) when this process has
  glibc's huge pages.
  """
  keys = {"both": ("torch", "torchp"), "default": ("torch",), "passive": ("torchp",),
          "none": ()}[which]
  workers = {k: TorchSide(env=TORCH_WORKERS[k]) for k in keys}
  if "torch" in keys and host_memory.enabled():
    workers["torchg"] = TorchSide(base_env=host_memory.environ(on=False))
  return workers


def torch_spec(name: str, vit: str, batch: int = 16, vocab: int = VOCAB, **kw) -> dict:
  return dict(name=name, vit=list(VITS[vit]), text=list(TEXT), vocab=vocab, max_len=MAX_LEN,
              image_size=IMAGE_SIZE, patch=PATCH, embed_dim=EMBED_DIM, batch=batch, **kw)


# ---------------------------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------------------------
def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} cores"


def load() -> float:
  try:
    return os.getloadavg()[0]
  except OSError:
    return float("nan")


def versions() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  return {"jax": jax.__version__, "flax": flax.__version__, "huge_pages": host_memory.enabled(),
          "backend": jax.default_backend(), "devices": jax.device_count()}


def table(rows: list[list], header: list[str]) -> str:
  cells = [[_fmt(c) for c in r] for r in [header] + rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _fmt(x) -> str:
  if isinstance(x, float):
    if x != x:
      return "-"
    if abs(x) >= 1e9:
      return f"{x / 1e9:.2f} G"
    if abs(x) >= 100:
      return f"{x:.0f}"
    if abs(x) >= 1:
      return f"{x:.2f}"
    return f"{x:.3f}"
  return str(x)


def gflops(x: float) -> str:
  return f"{x / 1e9:.1f}"


def record(bench: str, figures: dict, *, load_start: float, note: str = "") -> None:
  """Appends a row to bench/RESULTS.md and writes OUT_DIR/<bench>.json."""
  command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT)
                                               if sys.executable.startswith(ROOT)
                                               else sys.executable] + sys.argv)
  if sys.argv and sys.argv[0].endswith(".py"):
    command = f"python -m bench.{os.path.splitext(os.path.basename(sys.argv[0]))[0]} " + \
        " ".join(shlex.quote(a) for a in sys.argv[1:])
  for var in ("GLIBC_TUNABLES", "XLA_FLAGS"):  # they change what was measured: the row says so
    value = os.environ.get(var, "").strip()
    if value:
      command = f"{var}={shlex.quote(value)} {command}"
  now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  load_text = f"load {load_start:.1f}->{load():.1f}"
  figs = "; ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in figures.items())
  if not os.path.exists(RESULTS):
    with open(RESULTS, "w") as f:
      f.write("# Benchmark results\n\nOne row per benchmark invocation, appended by the script "
              "itself (bench/README.md). Rates taken on a shared machine are only comparable "
              "as same-run ratios.\n\n| date | bench | command | machine | figures |\n"
              "|---|---|---|---|---|\n")
  row = (f"| {now} | {bench} | `{command.strip()}` | {machine()}; {load_text}"
         f"{'; ' + note if note else ''} | {figs} |")
  with open(RESULTS, "a") as f:
    f.write(row + "\n")
  os.makedirs(OUT_DIR, exist_ok=True)
  with open(os.path.join(OUT_DIR, f"{bench}.json"), "w") as f:
    json.dump({"bench": bench, "date": now, "command": command, "machine": machine(),
               "load_start": load_start, "load_end": load(), "figures": figures,
               "results_row": row}, f, indent=1,
              default=str)


def log(msg: str) -> None:
  print(msg, flush=True)
