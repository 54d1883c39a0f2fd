"""open_clip on PyTorch: the other side of the side-by-side benchmarks (runs in .venv-bench).

A worker that the JAX-side benchmark starts as a subprocess and drives with one JSON command per
line on stdin; it answers one JSON line per command on stdout (everything else it or its
libraries print goes to stderr). The two processes never compute at the same time: the parent
waits for each answer, so measurements of both sides can be interleaved in one run.

The model is open_clip's `CLIP`, built from a config dict at the shapes asked for, with random
weights (nothing is downloaded). Matched to klip's model (klip/model/*): the tanh GELU
(open_clip's `nn.GELU` modules, `quick_gelu=False`, set to `approximate='tanh'`), LayerNorm eps
1e-6, no LayerNorm before the ViT blocks (`no_ln_pre`), CLS-token image pooling after the final
norm, a bidirectional text tower (`no_causal_mask`) pooled at the first token
(`pool_type='first'`) with a key-padding mask built from the pad id per batch (klip masks pad
keys the same way), projections without bias. The training step is open_clip's `ClipLoss`,
global-norm gradient clipping at 1.0 and AdamW with klip's hyper-parameters and weight-decay rule
(matrices only).

  .venv-bench/bin/python bench/torch_side.py   # then write commands, e.g.
  {"op": "build", "name": "ti", "vit": [192, 12, 3], "text": [512, 12, 8], ...}
"""

from __future__ import annotations

import json
import os
import sys
import time

_REPLY = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
sys.stdout = sys.stderr  # library prints must not corrupt the protocol

import torch  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

_MODELS: dict[str, dict] = {}


def _versions() -> dict:
  import open_clip  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  return {"torch": torch.__version__, "torchvision": torchvision.__version__,
          "open_clip": open_clip.__version__, "threads": torch.get_num_threads()}


def build(spec: dict) -> dict:
  import open_clip  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  vw, vd, vh = spec["vit"]
  tw, td, th = spec["text"]
  norm = {"eps": 1e-6}
  vision = dict(layers=vd, width=vw, head_width=vw // vh, mlp_ratio=4.0,
                patch_size=spec["patch"], image_size=spec["image_size"], no_ln_pre=True,
                pool_type="tok", norm_kwargs=norm)
  text = dict(context_length=spec["max_len"], vocab_size=spec["vocab"], width=tw, heads=th,
              layers=td, mlp_ratio=4.0, no_causal_mask=True, pool_type="first",
              pad_id=spec.get("pad_id", 0), norm_kwargs=norm)
  model = open_clip.CLIP(spec["embed_dim"], vision, text, quick_gelu=False, output_dict=True)
  gelus = [m for m in model.modules() if isinstance(m, torch.nn.GELU)]
  if len(gelus) != vd + td:
    raise RuntimeError(f"expected one GELU per block ({vd + td}), found {len(gelus)}")
  for m in gelus:  # klip's MLP uses the tanh form
    m.approximate = "tanh"
  model.train()
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  kw = {}
  if spec.get("adamw", "default") == "foreach":
    kw["foreach"] = True
  elif spec.get("adamw") == "fused":
    kw["fused"] = True
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.get("weight_decay", 0.05)},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=spec.get("lr", 3e-4), betas=(spec.get("b1", 0.9),
                                                          spec.get("b2", 0.98)),
                          eps=spec.get("eps", 1e-6), **kw)
  g = torch.Generator().manual_seed(1)
  b, s, length = spec["batch"], spec["image_size"], spec["max_len"]
  images = torch.rand((b, 3, s, s), generator=g) * 2 - 1
  tokens = torch.randint(6, spec["vocab"], (b, length), generator=g)
  tokens[:, 0] = 2  # [ENC]
  _MODELS[spec["name"]] = dict(spec=spec, model=model, opt=opt, images=images, tokens=tokens,
                               loss=open_clip.ClipLoss(), heads=th)
  params = sum(p.numel() for p in model.parameters())
  return {"parameters": params, "image_parameters": sum(p.numel()
                                                        for p in model.visual.parameters())}


def _padding_mask(m: dict, tokens: torch.Tensor) -> torch.Tensor | None:
  """Additive key-padding mask [B * heads, L, L] (what klip's text tower applies)."""
  if m["spec"].get("mask", "padding") == "none":
    return None
  b, length = tokens.shape
  keep = tokens != m["spec"].get("pad_id", 0)
  add = torch.zeros((b, 1, 1, length)).masked_fill(~keep[:, None, None, :], float("-inf"))
  return add.expand(b, m["heads"], length, length).reshape(b * m["heads"], length, length)


def _train_step(m: dict) -> torch.Tensor:
  model, opt = m["model"], m["opt"]
  opt.zero_grad(set_to_none=True)
  model.attn_mask = _padding_mask(m, m["tokens"])
  out = model(m["images"], m["tokens"])
  loss = m["loss"](out["image_features"], out["text_features"], out["logit_scale"])
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  opt.step()
  return loss


def _embed(m: dict, what: str, batch: int | None = None):
  model = m["model"]
  if what == "image":
    x = m["images"] if batch is None else m["images"][:batch]
    return model.encode_image(x, normalize=True)
  t = m["tokens"] if batch is None else m["tokens"][:batch]
  model.attn_mask = _padding_mask(m, t)
  return model.encode_text(t, normalize=True)


def flops(cmd: dict) -> dict:
  """FlopCounterMode's count of one training step (forward + backward) or one inference pass.

  Attention runs through the math backend here so that its matmuls are counted (the fused CPU
  kernel is not in the counter's table); FLOPs do not depend on the backend.
  """
  from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=g-import-not-at-top
  m = _MODELS[cmd["name"]]
  counter = FlopCounterMode(display=False)
  with sdpa_kernel(SDPBackend.MATH), counter:
    if cmd["what"] == "train":
      m["opt"].zero_grad(set_to_none=True)
      m["model"].attn_mask = _padding_mask(m, m["tokens"])
      out = m["model"](m["images"], m["tokens"])
      m["loss"](out["image_features"], out["text_features"], out["logit_scale"]).backward()
      m["opt"].zero_grad(set_to_none=True)
    else:  # inference: train mode (no dropout here) keeps MHA off its uncounted fast path
      with torch.no_grad():
        _embed(m, cmd["what"])
  by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
  return {"flops": int(counter.get_total_flops()), "by_op": by_op}


def train(cmd: dict) -> dict:
  m = _MODELS[cmd["name"]]
  m["model"].train()
  times = []
  for _ in range(cmd.get("steps", 1)):
    t = time.perf_counter()
    loss = _train_step(m)
    float(loss.detach())
    times.append(time.perf_counter() - t)
  return {"seconds": times}


def infer(cmd: dict) -> dict:
  m = _MODELS[cmd["name"]]
  m["model"].eval()
  times = []
  with torch.inference_mode():
    for _ in range(cmd.get("reps", 1)):
      t = time.perf_counter()
      _embed(m, cmd["what"], cmd.get("batch")).sum().item()
      times.append(time.perf_counter() - t)
  m["model"].train()
  return {"seconds": times}


def matmul(cmd: dict) -> dict:
  n = cmd.get("n", 2048)
  dtype = getattr(torch, cmd.get("dtype", "float32"))
  a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
  (a @ b).sum().item()
  times = []
  for _ in range(cmd.get("reps", 3)):
    t = time.perf_counter()
    (a @ b).sum().item()
    times.append(time.perf_counter() - t)
  return {"seconds": times, "flops": 2 * n ** 3}


def topk(cmd: dict) -> dict:
  """Retrieval: similarity of N unit image embeddings with M text embeddings, top-k per row."""
  g = torch.Generator().manual_seed(0)
  zi = torch.nn.functional.normalize(torch.randn(cmd["n"], cmd["e"], generator=g), dim=-1)
  zt = torch.nn.functional.normalize(torch.randn(cmd["m"], cmd["e"], generator=g), dim=-1)
  times = []
  with torch.inference_mode():
    for _ in range(cmd.get("reps", 3)):
      t = time.perf_counter()
      torch.topk(zi @ zt.T, cmd["k"], dim=1).indices.sum().item()
      times.append(time.perf_counter() - t)
  return {"seconds": times}


OPS = {"build": build, "flops": flops, "train": train, "infer": infer, "matmul": matmul,
       "topk": topk}


def main() -> None:
  torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
  _REPLY.write(json.dumps({"ready": True, **_versions()}) + "\n")
  for line in sys.stdin:
    if not line.strip():
      continue
    cmd = json.loads(line)
    if cmd["op"] == "quit":
      break
    try:
      out = OPS[cmd["op"]](cmd)
      _REPLY.write(json.dumps({"ok": True, **out}) + "\n")
    except Exception as e:  # pylint: disable=broad-except
      import traceback  # pylint: disable=g-import-not-at-top
      traceback.print_exc()
      _REPLY.write(json.dumps({"ok": False, "error": repr(e)}) + "\n")


if __name__ == "__main__":
  main()
