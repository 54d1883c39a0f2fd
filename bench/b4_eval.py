r"""B4: evaluation throughput: image and text embeddings/s, Flax vs open_clip, and retrieval.

Inference at B1's shapes (ViT-Ti/16 or ViT-S/16 at 224 px, 12 x 512 text, 64 tokens, f32):
`klip.predict.embed_images` / `embed_texts` (what SCIO and the evaluators call) jitted by
the evaluators' harness (`klip.inference`) on the project's model, against open_clip's `encode_image` / `encode_text` in eval mode under
`torch.inference_mode()` (its fused attention fast path included), interleaved with the f32
matmul calibration.

Retrieval top-k over N x M: the similarity of N unit image embeddings with M text embeddings
and the k best per row, three ways: jitted XLA (`jax.lax.top_k`), the evaluator's host path
(`evals.retrieval.top_k`: a numpy partition, then a stable sort of the candidates at or above
each row's k-th score), and torch.topk.

  .venv/bin/python -m bench.b4_eval
  .venv/bin/python -m bench.b4_eval --vits=ti --rounds=1
"""

from __future__ import annotations

import argparse
import time

from bench import common
from bench import flops as flops_lib

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order
from flax import nnx  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order


def _host_top_k(similarity: np.ndarray, k: int) -> np.ndarray:
  try:
    from evals.retrieval import top_k  # pylint: disable=g-import-not-at-top
  except Exception:  # pylint: disable=broad-except
    def top_k(s, k):  # the same stable descending order
      return np.argsort(-np.asarray(s), axis=1, kind="stable")[:, :k]
  return top_k(similarity, k)


def _image_embedding(model, images):
  from klip import predict  # pylint: disable=g-import-not-at-top
  return predict.embed_images(model, images)[0]


class Embedder:
  """predict.embed_images / embed_texts of a freshly initialised project model, jitted by the
  evaluators' harness (`klip.inference`) on one device."""

  def __init__(self, config, batch: dict):
    from klip import inference  # pylint: disable=g-import-not-at-top
    from klip import predict  # pylint: disable=g-import-not-at-top
    from klip import sharding  # pylint: disable=g-import-not-at-top
    from klip.model import two_tower  # pylint: disable=g-import-not-at-top
    with nnx.use_eager_sharding(False):
      model = two_tower.Model(config.model, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    mesh = sharding.make_mesh(dict(slice=1, data=1, fsdp=1, tensor=1), jax.devices()[:1])
    shardings = sharding.state_shardings(state, mesh, config.sharding_rules)
    self.state = jax.device_put(state, shardings)
    harness = inference.Inference(graphdef, shardings, mesh, config.sharding_rules)
    self.images = jnp.asarray(batch["image"])
    self.tokens = jnp.asarray(batch["tokens"])
    self.image = harness.jitted(_image_embedding, 4).lower(self.state, self.images).compile()
    self.text = harness.jitted(predict.embed_texts, 2).lower(self.state, self.tokens).compile()
    self.image(self.state, self.images).block_until_ready()
    self.text(self.state, self.tokens).block_until_ready()

  def rate(self, what: str, reps: int) -> float:
    fn, x = (self.image, self.images) if what == "image" else (self.text, self.tokens)
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      fn(self.state, x).block_until_ready()
      times.append(time.perf_counter() - t)
    return x.shape[0] / common.median(times)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--vits", default="ti,s")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--reps", type=int, default=3, help="timed calls per round")
  p.add_argument("--torch", default="both", choices=("both", "default", "passive", "none"),
                 help="open_clip workers (see bench/b1_contrast.py); ratios against the faster")
  p.add_argument("--retrieval", default="4096x4096", help="N x M ('' to skip)")
  p.add_argument("--k", type=int, default=10)
  args = p.parse_args(argv)
  load_start = common.load()
  log = common.log
  log(f"B4 evaluation throughput; {common.machine()}; {common.versions()}")
  workers = common.torch_workers(args.torch)
  vits = [v for v in args.vits.split(",") if v]
  emb, info, tasks = {}, {}, {}
  calib = common.MatmulCalibration()
  tasks["xla_matmul"] = calib.measure
  for vit in vits:
    config = common.pair_config(vit, batch=args.batch)
    batch = common.synthetic_batch(config)
    e = Embedder(config, batch)
    emb[vit] = e
    for what, count in (("image", flops_lib.embed_images(config.model, args.batch)),
                        ("text", flops_lib.embed_texts(config.model, args.batch))):
      compiled = e.image if what == "image" else e.text
      xla = flops_lib.compiled_flops(compiled)
      info[f"klip_{vit}_{what}"] = dict(vit=vit, what=what, side="klip",
                                         counted=xla["matmul"], analytic=count.forward_total)
      tasks[f"klip_{vit}_{what}"] = (lambda e=e, w=what: e.rate(w, args.reps))
      for wk, ts in workers.items():
        if what == "image":
          ts("build", **common.torch_spec(vit, vit, args.batch))
        tfl = ts("flops", name=vit, what=what)
        ts("infer", name=vit, what=what, reps=1)
        info[f"{wk}_{vit}_{what}"] = dict(vit=vit, what=what, side=common.TORCH_LABELS[wk],
                                           counted=float(tfl["flops"]),
                                           analytic=count.forward_total)
        tasks[f"{wk}_{vit}_{what}"] = (lambda v=vit, w=what, ts=ts: args.batch / common.median(
            ts("infer", name=v, what=w, reps=args.reps)["seconds"]))
  if args.retrieval:
    n, m = (int(x) for x in args.retrieval.lower().split("x"))
    rng = np.random.default_rng(0)
    zi = rng.standard_normal((n, common.EMBED_DIM)).astype(np.float32)
    zt = rng.standard_normal((m, common.EMBED_DIM)).astype(np.float32)
    zi /= np.linalg.norm(zi, axis=1, keepdims=True)
    zt /= np.linalg.norm(zt, axis=1, keepdims=True)
    jzi, jzt = jnp.asarray(zi), jnp.asarray(zt)
    top = jax.jit(lambda a, b: jax.lax.top_k(a @ b.T, args.k)[1])
    top(jzi, jzt).block_until_ready()

    def xla_topk():
      t = time.perf_counter()
      top(jzi, jzt).block_until_ready()
      return n / (time.perf_counter() - t)

    def host_topk():
      t = time.perf_counter()
      _host_top_k(zi @ zt.T, args.k)
      return n / (time.perf_counter() - t)

    tasks["retrieval_xla"] = xla_topk
    tasks["retrieval_host"] = host_topk
    for wk, ts in workers.items():
      tasks[f"retrieval_{wk}"] = (lambda ts=ts: n / common.median(
          ts("topk", n=n, m=m, e=common.EMBED_DIM, k=args.k, reps=1)["seconds"]))
  rates = common.interleave(tasks, args.rounds, log=log)
  for ts in workers.values():
    ts.close()
  for vit in vits:
    for what in ("image", "text"):
      per_worker = [rates[f"{wk}_{vit}_{what}"] for wk in workers]
      if per_worker:
        rates[f"best_{vit}_{what}"] = [max(xs) for xs in zip(*per_worker)]
  mm = rates["xla_matmul"]
  rows, figures, parity = [], {}, []
  for key, r in info.items():
    x = rates[key]
    per = r["counted"] / args.batch
    achieved = [v * per for v in x]
    best = rates.get(f"best_{r['vit']}_{r['what']}")
    vs = (common.median(common.ratios(x, best)) if best and r["side"] == "klip"
          else float("nan"))
    frac = common.median(common.ratios(achieved, mm))
    rows.append([f"ViT-{r['vit'].upper()}/16", r["what"], r["side"], common.median(x), vs,
                 per / 1e9, f"{r['counted'] / r['analytic'] - 1:+.2%}",
                 common.median(achieved) / 1e9, f"{frac:.0%}"])
    figures[f"{key}_per_s"] = common.median(x)
    if r["side"] == "klip":
      figures[f"{key}_vs_open_clip"] = vs
      if best:
        figures[f"open_clip_best_{r['vit']}_{r['what']}_per_s"] = common.median(best)
        t = info[f"{next(iter(workers))}_{r['vit']}_{r['what']}"]["counted"]
        parity.append(f"{r['vit']}/{r['what']} {r['counted'] / t - 1:+.2%}")
  log("")
  log(f"B4 inference (batch {args.batch}, f32; {args.rounds} interleaved rounds; same-run XLA "
      f"f32 matmul {common.median(mm) / 1e9:.0f} GFLOP/s; load {load_start:.1f}->"
      f"{common.load():.1f})")
  log("(vs open_clip: per-round ratio to the faster open_clip worker of that round)")
  log(common.table(rows, ["model", "tower", "side", "embeddings/s", "vs open_clip",
                          "GFLOP/emb", "counted vs analytic", "GFLOP/s", "of XLA mm"]))
  if parity:
    log("FLOP parity XLA vs torch counter: " + ", ".join(parity))
    figures["flop_parity"] = ", ".join(parity)
  if args.retrieval:
    rrows = [[name, common.median(rates[f"retrieval_{name}"])]
             for name in ("xla", "host", "torch", "torchp") if f"retrieval_{name}" in rates]
    log(f"\nretrieval top-{args.k} over {args.retrieval} (similarity + top-k), query rows/s")
    log(common.table(rrows, ["path", "queries/s"]))
    for name, v in rrows:
      figures[f"retrieval_{name}_rows_s"] = v
  common.record("b4", figures, load_start=load_start, note=f"{args.rounds} rounds")
  return {"rates": rates, "figures": figures, "info": info}


if __name__ == "__main__":
  main()
