r"""B1: contrastive training step, pairs/s, f32, against open_clip at identical shapes.

ViT-Ti/16 and ViT-S/16 at 224 px (3 channels) with a 12-layer, 512-wide, 64-token text tower,
vocabulary 32,000, embedding 256, batch 16, the AdamW update included on both sides.

JAX side, all project code: the model is `klip.model.two_tower.Model` built from
configs/pretrain.py fields (`common.pair_config`: `text.fusion_layers=0`, `decoder.depth=0`,
contrast weight only), and the
step is `klip.train_step.make_train_step` jitted as the trainer jits it (objectives.total with only
the contrastive loss, klip.optim's clip + AdamW, the non-finite guard, the step's metrics).
`--lean` adds a second JAX row for the same model and loss with `klip.optim.make` applied to
the two towers only and nothing else in the step: the difference is the trainer's overhead.

open_clip side: bench/torch_side.py in .venv-bench (CLIP from a config dict; same tanh GELU,
norms, masks, pooling and vocabulary; ClipLoss, clipping, AdamW), as a subprocess.

Rounds interleave: XLA f32 matmul calibration, each JAX step, each open_clip step, torch's
matmul; ratios are per round. Each side runs `--warmup` untimed steps before its timed ones in
every round: the first step after another process's work is up to 1.6x slower (measured:
5.0 s against 3.2 s for klip's ViT-Ti step right after the torch workers), which with one
timed step per round penalised whichever side ran first. FLOP parity: matmul FLOPs of the
compiled XLA step (dots and convolutions of its optimized HLO) against torch's FlopCounterMode,
and against the analytic count (bench/flops.py); all three must agree within 2 %.

  .venv/bin/python -m bench.b1_contrast                # ViT-Ti and ViT-S, 5 rounds
  .venv/bin/python -m bench.b1_contrast --vits=ti --rounds=1 --steps=1   # quick check
"""

from __future__ import annotations

import argparse
import time

from bench import common
from bench import flops as flops_lib

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order
from flax import nnx  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order

PARITY_TOLERANCE = 0.02


class LeanStep:
  """Model from the config, `losses.contrastive`, `optim.make` on the towers, plain jit."""

  def __init__(self, config, batch: dict):
    from klip import losses, optim  # pylint: disable=g-import-not-at-top
    from klip.model import two_tower  # pylint: disable=g-import-not-at-top
    with nnx.use_eager_sharding(False):
      model = two_tower.Model(config.model, rngs=nnx.Rngs(config.seed))
    towers = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("decoder")))
    opt = nnx.Optimizer(model, optim.make(config), wrt=towers)
    self.graphdef, self.state = nnx.split((model, opt))

    def step(state, images, tokens, weights):
      model, opt = nnx.merge(self.graphdef, state)

      def loss_fn(model):
        zimg, ztxt = model.embed_images(images), model.embed_texts(tokens)
        return losses.contrastive(zimg, ztxt, model.temperature_scale(), weights)[0]

      loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, towers))(model)
      opt.update(model, grads)
      return nnx.state((model, opt)), loss

    self.args = tuple(jnp.asarray(batch[k]) for k in ("image", "tokens", "weight"))
    self.fn = jax.jit(step, donate_argnums=0)
    self.compiled = None

  def compile(self) -> dict:
    t0 = time.perf_counter()
    lowered = self.fn.lower(self.state, *self.args)
    t1 = time.perf_counter()
    self.compiled = lowered.compile()
    return {"lower_s": t1 - t0, "compile_s": time.perf_counter() - t1}

  def run(self, steps: int = 1) -> list[float]:
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      self.state, loss = self.compiled(self.state, *self.args)
      loss.block_until_ready()
      times.append(time.perf_counter() - t)
    return times


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--vits", default="ti,s", help="comma list of ti, s")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=1, help="timed steps per side per round")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed steps before each side's timed ones, every round")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--torch", default="both", choices=("both", "default", "passive", "none"),
                 help="open_clip workers: torch as installed and/or with OMP_WAIT_POLICY="
                 "PASSIVE (common.TORCH_WORKERS); ratios are against the faster per round")
  p.add_argument("--lean", default="ti", help="vits that also get the lean JAX step ('' none)")
  p.add_argument("--adamw", default="default", choices=("default", "foreach", "fused"),
                 help="torch AdamW implementation (default: what open_clip's trainer uses)")
  args = p.parse_args(argv)
  load_start = common.load()
  vits = [v for v in args.vits.split(",") if v]
  lean_vits = {v for v in args.lean.split(",") if v}
  log = common.log
  log(f"B1 contrastive step, batch {args.batch}, f32; {common.machine()}; "
      f"{common.versions()}; load {load_start:.1f}")
  workers = common.torch_workers(args.torch)
  for w, ts in workers.items():
    log(f"open_clip worker {w}: {ts.info}")

  steps, results = {}, {}
  for vit in vits:
    config = common.pair_config(vit, batch=args.batch)
    batch = common.synthetic_batch(config)
    analytic = flops_lib.contrast_step(config.model, args.batch).train_total
    sides = [("klip", "klip step", common.ProjectStep(config, batch=batch))]
    if vit in lean_vits:
      sides.append(("lean", "klip lean", LeanStep(config, batch)))
    for key, side, runner in sides:
      comp = runner.compile()
      xla = flops_lib.compiled_flops(runner.compiled)
      runner.run(1)
      steps[f"{key}_{vit}"] = runner
      results[f"{key}_{vit}"] = dict(vit=vit, side=side, analytic=analytic,
                                     counted=xla["matmul"], xla_total=xla["xla_total"], **comp)
      log(f"{vit}: {side} compiled in {comp['lower_s']:.1f}+{comp['compile_s']:.1f} s; "
          f"matmul FLOPs/step XLA {xla['matmul'] / 1e9:.2f} G, analytic {analytic / 1e9:.2f} G")
    for w, ts in workers.items():
      info = ts("build", **common.torch_spec(vit, vit, args.batch, adamw=args.adamw))
      tfl = ts("flops", name=vit, what="train")
      ts("train", name=vit, steps=1)
      results[f"{w}_{vit}"] = dict(vit=vit, side=common.TORCH_LABELS[w], analytic=analytic,
                                   counted=float(tfl["flops"]), by_op=tfl["by_op"],
                                   parameters=info["parameters"])
      log(f"{vit}: {common.TORCH_LABELS[w]} {info['parameters'] / 1e6:.1f}M parameters; torch "
          f"counter {tfl['flops'] / 1e9:.2f} G/step")

  calib = common.MatmulCalibration()
  tasks = {"xla_matmul": calib.measure}
  for vit in vits:
    for key in (f"klip_{vit}", f"lean_{vit}"):
      if key in steps:
        tasks[key] = (lambda s=steps[key]: args.batch / common.median(
            s.run(args.warmup + args.steps)[args.warmup:]))
    for w, ts in workers.items():
      tasks[f"{w}_{vit}"] = (lambda v=vit, ts=ts: args.batch / common.median(
          ts("train", name=v, steps=args.warmup + args.steps)["seconds"][args.warmup:]))
  for w, ts in workers.items():
    tasks[f"{w}_matmul"] = (lambda ts=ts: (lambda r: r["flops"] / common.median(r["seconds"]))(
        ts("matmul", n=2048, reps=3)))
  rates = common.interleave(tasks, args.rounds, log=log)
  for ts in workers.values():
    ts.close()
  for vit in vits:  # the faster open_clip worker of each round
    per_worker = [rates[f"{w}_{vit}"] for w in workers]
    if per_worker:
      rates[f"best_torch_{vit}"] = [max(xs) for xs in zip(*per_worker)]

  rows, figures = [], {}
  mm = rates["xla_matmul"]
  for key, r in results.items():
    pairs = rates[key]
    per_pair = r["counted"] / args.batch
    achieved = [x * per_pair for x in pairs]
    worker = key.rsplit("_", 1)[0]
    calib_rates = rates.get(f"{worker}_matmul", mm)
    best = rates.get(f"best_torch_{r['vit']}")
    per_round = (common.ratios(pairs, best) if best and key.startswith(("klip", "lean"))
                 else [])
    vs_torch = common.median(per_round)
    spread = f"{min(per_round):.2f}-{max(per_round):.2f}" if per_round else ""
    frac = common.median(common.ratios(achieved, mm))
    frac_own = common.median(common.ratios(achieved, calib_rates))
    parity = r["counted"] / r["analytic"] - 1
    r.update(pairs_per_s=common.median(pairs), pairs_per_s_best=max(pairs), vs_open_clip=vs_torch,
             gflop_per_pair=per_pair / 1e9, achieved_gflops=common.median(achieved) / 1e9,
             frac_xla_matmul=frac, frac_own_matmul=frac_own, counted_vs_analytic=parity)
    rows.append([f"ViT-{r['vit'].upper()}/16", r["side"], r["pairs_per_s"],
                 r["pairs_per_s_best"], vs_torch, spread, r["gflop_per_pair"],
                 f"{parity:+.2%}", r["achieved_gflops"], f"{frac:.0%}", f"{frac_own:.0%}"])
    figures[f"{key}_pairs_s"] = r["pairs_per_s"]
    if key.startswith(("klip", "lean")):
      figures[f"{key}_vs_open_clip"] = vs_torch
      figures[f"{key}_vs_open_clip_rounds"] = "/".join(f"{x:.3f}" for x in per_round)
    figures[f"{key}_frac_matmul"] = frac
  for vit in vits:
    if f"best_torch_{vit}" in rates:
      figures[f"open_clip_best_{vit}_pairs_s"] = common.median(rates[f"best_torch_{vit}"])
  parity_rows = []
  for vit in vits:
    for w in workers:
      x, t = results[f"klip_{vit}"]["counted"], results[f"{w}_{vit}"]["counted"]
      ok = abs(x / t - 1) <= PARITY_TOLERANCE
      parity_rows.append([f"ViT-{vit.upper()}/16", x / 1e9, t / 1e9,
                          results[f"klip_{vit}"]["analytic"] / 1e9, f"{x / t - 1:+.3%}",
                          "ok" if ok else "MISMATCH"])
      figures[f"{vit}_flop_parity"] = f"{x / t - 1:+.3%}"
      break  # the count does not depend on the worker's environment
  log("")
  mm_text = ", ".join(f"{common.TORCH_LABELS[w]} {common.median(rates[w + '_matmul']) / 1e9:.0f}"
                      for w in workers)
  log(f"B1 contrastive step (batch {args.batch}, f32, 2 threads; {args.rounds} interleaved "
      f"rounds; same-run f32 matmul GFLOP/s: XLA {common.median(mm) / 1e9:.0f}"
      + (f", {mm_text}" if mm_text else "") + f"; load {load_start:.1f}->{common.load():.1f})")
  log(common.table(rows, ["model", "side", "pairs/s", "best", "vs open_clip", "range",
                          "GFLOP/pair", "vs analytic", "GFLOP/s", "of XLA mm",
                          "of own mm"]))
  log("(vs open_clip: median of the per-round ratios to the faster open_clip worker of that "
      "round; range: their lowest and highest)")
  if parity_rows:
    log("\nFLOP parity (matmul FLOPs per step: XLA dots+convs of the compiled step vs torch "
        "FlopCounterMode; within 2 %)")
    log(common.table(parity_rows, ["model", "XLA G", "torch G", "analytic G", "diff", ""]))
  figures["xla_matmul_gflops"] = common.median(mm) / 1e9
  for w in workers:
    figures[f"{w}_matmul_gflops"] = common.median(rates[f"{w}_matmul"]) / 1e9
  common.record("b1", figures, load_start=load_start,
                note=f"{args.rounds} rounds x ({args.warmup} untimed + {args.steps}) steps")
  return {"results": results, "rates": rates, "figures": figures}


if __name__ == "__main__":
  main()
