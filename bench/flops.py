"""FLOP counts: analytic (from a model config) and from XLA's compiled HLO (dots, convolutions).

Only matrix products are counted (dot and convolution: 2 FLOPs per multiply-add), on both
sides: element-wise work (norms, softmax, GELU, AdamW) is left out, as torch's
`FlopCounterMode` leaves it out. The analytic count follows the project's model code
(`klip/model/*`, `klip/objectives.py`) op by op; `hlo_matmul_flops` reads the optimized HLO that
XLA actually runs, so the two agreeing means the analytic model describes the compiled program.

Training multipliers: a dot whose two operands both need gradients costs 3x its forward FLOPs
(forward, input gradient, weight gradient); the patch embedding costs 2x (images need no
gradient); a dot under `stop_gradient` costs 1x.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

# ---------------------------------------------------------------------------------------------
# Analytic counts (forward FLOPs of the matrix products of one pass), per component.
# ---------------------------------------------------------------------------------------------


def _linear(rows: int, din: int, dout: int) -> int:
  return 2 * rows * din * dout


def self_attention_flops(batch: int, length: int, width: int) -> int:
  """Forward matmul FLOPs of a block's self-attention sublayer over [batch, length]."""
  f = 4 * _linear(batch * length, width, width)  # q, k, v, out
  return f + 2 * 2 * batch * length * length * width  # scores and weighted values (all heads)


def block_flops(batch: int, length: int, width: int, mlp_dim: int, *,
                cross: tuple[int, int] | None = None) -> int:
  """Forward matmul FLOPs of one pre-LN block (klip.model.layers.Block) over [batch, length].

  cross: (kv_length, kv_width) when the cross-attention sublayer runs.
  """
  rows = batch * length
  f = self_attention_flops(batch, length, width)
  f += _linear(rows, width, mlp_dim) + _linear(rows, mlp_dim, width)
  if cross is not None:
    kv_len, kv_width = cross
    f += 2 * _linear(rows, width, width)                 # q, out
    f += 2 * _linear(batch * kv_len, kv_width, width)    # k, v of the image tokens
    f += 2 * 2 * batch * length * kv_len * width
  return f


@dataclasses.dataclass
class Count:
  """FLOPs of one step, split by component: forward and with the training multipliers."""
  forward: dict[str, float] = dataclasses.field(default_factory=dict)
  train: dict[str, float] = dataclasses.field(default_factory=dict)

  def add(self, name: str, fwd: float, mult: float) -> None:
    self.forward[name] = self.forward.get(name, 0) + fwd
    self.train[name] = self.train.get(name, 0) + fwd * mult

  @property
  def forward_total(self) -> float:
    return float(sum(self.forward.values()))

  @property
  def train_total(self) -> float:
    return float(sum(self.train.values()))


def _get(node, key, default=None):
  try:
    return node[key]
  except (KeyError, AttributeError):
    return default


def image_tower(count: Count, m, batch: int, mult: float) -> None:
  """ViT (klip.model.vit.ViT): linear patch embedding, depth blocks over 1 + N tokens."""
  grid = m.image_size // m.patch_size
  n = grid * grid
  patch_dim = m.patch_size * m.patch_size * m.channels
  v = m.vit
  count.add("image/patch_embed", _linear(batch * n, patch_dim, v.width), min(mult, 2.0))
  count.add("image/blocks", v.depth * block_flops(batch, 1 + n, v.width, v.mlp_dim), mult)


def text_tower(count: Count, m, batch: int, length: int, mult: float, *, name="text",
               fused_only: bool = False) -> None:
  """TextEncoder (klip.model.text): all blocks (contrast), or only the top `fusion_layers`
  blocks with cross-attention (the matching path, whose lower states come from contrast)."""
  t = m.text
  grid = m.image_size // m.patch_size
  fused = int(_get(t, "fusion_layers", t.depth))
  blocks = fused if fused_only else t.depth
  for _ in range(blocks):
    count.add(f"{name}/blocks", block_flops(
        batch, length, t.width, t.mlp_dim,
        cross=(1 + grid * grid, m.vit.width) if fused_only else None), mult)


def decoder(count: Count, m, batch: int, length: int, mult: float) -> None:
  """TextDecoder (cross-attention in every layer) and the tied vocabulary logits."""
  t = m.text
  grid = m.image_size // m.patch_size
  dec = _get(m, "decoder")
  depth = int(_get(dec, "depth", t.depth) if dec is not None else t.depth)
  if not depth:
    return
  for _ in range(depth):
    count.add("decoder/blocks", block_flops(batch, length, t.width, t.mlp_dim,
                                            cross=(1 + grid * grid, m.vit.width)), mult)
  count.add("decoder/logits", _linear(batch * length, t.width, t.vocab_size), mult)


def contrast_step(m, batch: int, length: int | None = None) -> Count:
  """The contrastive step: both towers, projections, the [B, B] similarity (training)."""
  length = length or m.text.max_len
  c = Count()
  image_tower(c, m, batch, 3.0)
  text_tower(c, m, batch, length, 3.0)
  c.add("heads", _linear(batch, m.vit.width, m.embed_dim) + _linear(batch, m.text.width,
                                                                     m.embed_dim), 3.0)
  c.add("contrast/logits", _linear(batch, m.embed_dim, batch), 3.0)
  return c


def full_step(config, batch: int | None = None, length: int | None = None) -> Count:
  """klip.objectives.total under klip.train_step.make_train_step (training FLOPs)."""
  m = config.model
  batch = batch or config.batch_size
  length = length or m.text.max_len
  w = config.loss
  c = contrast_step(m, batch, length)
  t = m.text
  if _get(w, "clause_contrast_weight", 0.0):  # each image against one clause alone
    text_tower(c, m, batch, int(w.clause_max_len), 3.0, name="clause")
    c.add("clause/heads", _linear(batch, t.width, m.embed_dim), 3.0)
    c.add("clause/logits", _linear(batch, m.embed_dim, batch), 3.0)
    rivals = batch * int(_get(w, "clause_rivals", 0))
    if rivals:  # the clause's rivals through the text tower, each scored against its image
      text_tower(c, m, rivals, int(w.clause_max_len), 3.0, name="clause_rivals")
      c.add("clause_rivals/heads", _linear(rivals, t.width, m.embed_dim), 3.0)
      c.add("clause_rivals/logits", _linear(rivals, m.embed_dim, 1), 3.0)
  if w.match_weight:
    c.add("match/sim", _linear(batch, m.embed_dim, batch), 1.0)  # stop_gradient
    rows = 3 * batch
    if _get(w, "clause_negatives", False):  # the swapped captions' own text pass
      fused = int(_get(t, "fusion_layers", t.depth))
      for _ in range(t.depth - fused):
        c.add("match/swap_text", block_flops(batch, length, t.width, t.mlp_dim), 3.0)
      if _get(m, "match_cosine", False):  # their contrastive embeddings, for the cosine
        for _ in range(fused):
          c.add("match/swap_embed", block_flops(batch, length, t.width, t.mlp_dim), 3.0)
        c.add("match/swap_embed", _linear(batch, t.width, m.embed_dim), 3.0)
      rows += batch
    text_tower(c, m, rows, length, 3.0, name="match", fused_only=True)
    c.add("match/head", _linear(rows, m.text.width, 2), 3.0)
  if w.reconstruct_weight:
    decoder(c, m, batch, length, 3.0)
  return c


def embed_images(m, batch: int) -> Count:
  """Inference: image embeddings (tower + projection)."""
  c = Count()
  image_tower(c, m, batch, 1.0)
  c.add("heads", _linear(batch, m.vit.width, m.embed_dim), 1.0)
  return c


def embed_texts(m, batch: int, length: int | None = None) -> Count:
  c = Count()
  text_tower(c, m, batch, length or m.text.max_len, 1.0)
  c.add("heads", _linear(batch, m.text.width, m.embed_dim), 1.0)
  return c


def scio_scores(m, pairs: int, variants: int, length: int | None = None) -> Count:
  """One SCIO scoring chunk: images once, `variants` texts per image through the contrastive
  text tower, then its fusion blocks again with cross-attention, the ITM head
  (klip.inference.variant_scores).

  The first fusion block's self-attention reads the same lower states with the same weights
  as the contrastive pass's block did (self-attention comes before cross-attention), and XLA
  computes it once (common-subexpression elimination): it is counted once. Training gathers
  hard negatives into the fused batch, so its step has no such duplicate."""
  length = length or m.text.max_len
  c = embed_images(m, pairs)
  rows = pairs * variants
  text_tower(c, m, rows, length, 1.0)
  c.add("heads", _linear(rows, m.text.width, m.embed_dim), 1.0)
  text_tower(c, m, rows, length, 1.0, name="match", fused_only=True)
  if int(_get(m.text, "fusion_layers", m.text.depth)):
    c.add("match/blocks", -self_attention_flops(rows, length, m.text.width), 1.0)
  c.add("match/head", _linear(rows, m.text.width, 2), 1.0)
  return c


# ---------------------------------------------------------------------------------------------
# XLA: matmul FLOPs of the optimized HLO, with loop trip counts.
# ---------------------------------------------------------------------------------------------
_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


def _dims(text: str) -> tuple[int, ...]:
  return tuple(int(d) for d in text.split(",") if d)


def _split_shape_op(rhs: str) -> tuple[str, str, str]:
  """'f32[2,3]{1,0} dot(%a, %b), attrs' -> (shape text, opcode, rest after the opcode)."""
  if rhs.startswith("("):  # tuple shape
    depth = 0
    for i, ch in enumerate(rhs):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    shape, rest = rhs[:i + 1], rhs[i + 1:].lstrip()
  else:
    shape, _, rest = rhs.partition(" ")
  op, _, rest = rest.partition("(")
  return shape, op.strip(), rest


def _operands(rest: str) -> tuple[list[str], list[tuple[int, ...] | None], str]:
  """Operand names, their inline shapes (when printed) and the attribute text."""
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      end = i
      break
  inside, attrs = rest[:end], rest[end + 1:]
  names, shapes = [], []
  for part in _top_level_split(inside):
    part = part.strip()
    m = re.search(r"%([\w.\-]+)\s*$", part)
    if not m:
      continue
    names.append(m.group(1))
    a = _ARRAY.search(part)
    shapes.append(_dims(a.group(2)) if a and a.start() < m.start() else None)
  return names, shapes, attrs


def _top_level_split(text: str) -> list[str]:
  parts, depth, cur = [], 0, []
  for ch in text:
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
    if ch == "," and depth == 0:
      parts.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  if cur:
    parts.append("".join(cur))
  return parts


def _attr_dims(attrs: str, key: str) -> tuple[int, ...]:
  m = re.search(key + r"=\{([0-9,]*)\}", attrs)
  return _dims(m.group(1)) if m else ()


@dataclasses.dataclass
class HloFlops:
  """Matmul FLOPs of a compiled program (loops counted by their known trip counts)."""
  dot: float = 0.0
  conv: float = 0.0
  gemm_custom_calls: float = 0.0
  uncounted_custom_calls: dict[str, int] = dataclasses.field(default_factory=dict)
  loops_without_trip_count: int = 0
  by_name: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def total(self) -> float:
    return self.dot + self.conv + self.gemm_custom_calls


def _shape_table(instrs) -> dict[str, tuple[int, ...]]:
  table = {}
  for name, shape, _, _ in instrs:
    a = _ARRAY.search(shape)
    table[name] = _dims(a.group(2)) if a else ()
  return table


def _instr_flops(shape: str, op: str, rest: str, table: dict):
  """(kind, FLOPs, custom-call target) of one instruction; kind None if not a matmul."""
  if op not in ("dot", "convolution", "custom-call"):
    return None, 0.0, None
  names, inline, attrs = _operands(rest)
  shapes = [s if s is not None else table.get(n, ()) for n, s in zip(names, inline)]
  out = _ARRAY.search(shape)
  out_dims = _dims(out.group(2)) if out else ()
  if op == "dot":
    k = math.prod(shapes[0][d] for d in _attr_dims(attrs, "lhs_contracting_dims"))
    return "dot", 2.0 * math.prod(out_dims) * k, None
  if op == "convolution":
    kernel = shapes[1]
    labels = re.search(r"dim_labels=\w+_(\w+)->", attrs)
    o_axis = labels.group(1).index("o") if labels else len(kernel) - 1
    per_out = math.prod(d for i, d in enumerate(kernel) if i != o_axis)
    return "conv", 2.0 * math.prod(out_dims) * per_out, None
  target = re.search(r'custom_call_target="([^"]+)"', attrs)
  target = target.group(1) if target else "?"
  dnums = re.search(r'"dot_dimension_numbers"\s*:\s*(\{[^}]*\})', attrs)
  if dnums and ("gemm" in target.lower() or "matmul" in target.lower()):
    d = json.loads(dnums.group(1))
    k = math.prod(shapes[0][int(i)] for i in d.get("lhs_contracting_dimensions", []))
    return "gemm_custom_calls", 2.0 * math.prod(out_dims) * k, target
  return None, 0.0, target


def _computations(hlo_text: str):
  """({computation name: [(instruction, shape text, opcode, rest)]}, ENTRY name or None)."""
  comps: dict[str, list[tuple[str, str, str, str]]] = {}
  entry, cur = None, None
  for line in hlo_text.splitlines():
    if cur is None:
      h = _COMP_HEAD.match(line)
      if h:
        cur = h.group(2)
        comps[cur] = []
        if h.group(1):
          entry = cur
      continue
    if line.strip() == "}":
      cur = None
      continue
    m = _INSTR.match(line)
    if m:
      shape, op, rest = _split_shape_op(m.group(2))
      comps[cur].append((m.group(1), shape, op, rest))
  return comps, entry


def hlo_matmul_flops(hlo_text: str) -> HloFlops:
  """Dot, convolution and GEMM custom-call FLOPs of an HLO module's text (optimized or not).

  dot: 2 * prod(output dims) * prod(contracting dims of the lhs); convolution: 2 * prod(output)
  * prod(kernel dims other than the output feature); cuBLAS/cuDNN-style GEMM custom calls
  (GPU) are read from their dot_dimension_numbers. Each computation is weighted by how often it
  runs: 1 for fusions and calls, the known trip count for while bodies.
  """
  comps, entry = _computations(hlo_text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")

  # How often each computation runs.
  weight = {entry: 1.0}
  order = [entry]
  for comp in order:  # breadth-first; HLO call graphs are acyclic
    for name, shape, op, rest in comps.get(comp, ()):
      _, _, attrs = _operands(rest)
      trip = 1.0
      if op == "while":
        t = _TRIP.search(attrs)
        trip = float(t.group(1)) if t else 1.0
      called = [(k, v) for k, v in _CALLS.findall(attrs)]
      b = _BRANCHES.search(attrs)
      if b:
        called += [("branch", x.strip().lstrip("%")) for x in b.group(1).split(",") if x.strip()]
      for kind, target in called:
        if kind == "to_apply":
          continue  # reductions' scalar computations
        mult = trip if (op == "while" and kind in ("body", "condition")) else 1.0
        if target not in weight:
          order.append(target)
          weight[target] = 0.0
        weight[target] += weight[comp] * mult
  result = HloFlops()
  for comp, instrs in comps.items():
    w = weight.get(comp, 0.0)
    if not w:
      continue
    table = _shape_table(instrs)
    for name, shape, op, rest in instrs:
      kind, f, target = _instr_flops(shape, op, rest, table)
      if kind is None:
        if target:
          result.uncounted_custom_calls[target] = result.uncounted_custom_calls.get(target, 0) + 1
        continue
      setattr(result, kind, getattr(result, kind) + w * f)
      key = {"dot": "dot", "conv": "convolution", "gemm_custom_calls": "gemm"}[kind]
      result.by_name[key] = result.by_name.get(key, 0.0) + w * f
  for comp, instrs in comps.items():
    for name, shape, op, rest in instrs:
      if op == "while" and weight.get(comp) and not _TRIP.search(rest):
        result.loops_without_trip_count += 1
  return result


def compiled_flops(compiled) -> dict[str, float]:
  """{'matmul': dot + conv FLOPs from the optimized HLO, 'xla_total': cost_analysis()['flops']
  (XLA's own count, all ops, loop bodies once)} of a `jax.stages.Compiled`."""
  hlo = hlo_matmul_flops(compiled.as_text())
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  out = {"matmul": hlo.total, "xla_total": float((cost or {}).get("flops", float("nan")))}
  if hlo.uncounted_custom_calls:
    out["uncounted_custom_calls"] = hlo.uncounted_custom_calls
  if hlo.loops_without_trip_count:
    out["loops_without_trip_count"] = hlo.loops_without_trip_count
  return out


# ---------------------------------------------------------------------------------------------
# Per-instruction view (for the profiler): FLOPs, op_name and source location of each
# instruction that the CPU runtime executes as a thunk.
# ---------------------------------------------------------------------------------------------
_TABLE_ENTRY = re.compile(r"^(\d+)\s+(.*)$")


def _source_tables(hlo_text: str):
  """(file names, function names, file locations, stack frames) of an HLO module's text."""
  sections = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
  current = None
  for line in hlo_text.splitlines():
    s = line.strip()
    if s in sections:
      current = sections[s]
      continue
    if not s or _COMP_HEAD.match(line) or s.startswith("HloModule"):
      current = None if not s else current
      if _COMP_HEAD.match(line):
        break
      continue
    if current is not None:
      m = _TABLE_ENTRY.match(s)
      if m:
        current[int(m.group(1))] = m.group(2)
  files = {k: v.strip('"') for k, v in sections["FileNames"].items()}
  funcs = {k: v.strip('"') for k, v in sections["FunctionNames"].items()}
  locs = {}
  for k, v in sections["FileLocations"].items():
    f = re.search(r"file_name_id=(\d+)", v)
    fn = re.search(r"function_name_id=(\d+)", v)
    ln = re.search(r"\bline=(\d+)", v)
    locs[k] = (files.get(int(f.group(1)), "?") if f else "?",
               funcs.get(int(fn.group(1)), "?") if fn else "?", int(ln.group(1)) if ln else 0)
  frames = {}
  for k, v in sections["StackFrames"].items():
    loc = re.search(r"file_location_id=(\d+)", v)
    parent = re.search(r"parent_frame_id=(\d+)", v)
    frames[k] = (int(loc.group(1)) if loc else 0, int(parent.group(1)) if parent else 0)
  return locs, frames


def _stack(frame_id: int, locs, frames) -> list[tuple[str, str, int]]:
  """Innermost-first frames of a stack. The printed parent_frame_id is one more than the
  parent's id (0 printed as 1 would be the root's own id: no parent), as read off XLA's text."""
  out, seen = [], set()
  while frame_id in frames and frame_id not in seen:
    seen.add(frame_id)
    loc, parent = frames[frame_id]
    if loc in locs:
      out.append(locs[loc])
    frame_id = parent - 1
  return out


def instruction_table(hlo_text: str, prefer=("klip/", "optax/", "flax/")) -> dict[str, dict]:
  """{instruction name: {op, flops (dots inside, for fusions), op_name, where}} for every
  instruction of every non-fused computation. `where` is the innermost stack frame in a file
  whose path contains the first of `prefer` found in the stack (file:line function), with the
  innermost frame's function in brackets when that is another one."""
  locs, frames = _source_tables(hlo_text)
  comps, _ = _computations(hlo_text)

  def comp_flops(comp: str, depth: int = 0) -> float:
    if depth > 8 or comp not in comps:
      return 0.0
    text = "\n".join(f"%{n} = {s} {o}({r}" for n, s, o, r in comps[comp])
    total = hlo_matmul_flops(f"ENTRY %{comp} () -> () {{\n{text}\n}}").total
    return total

  inner = set()  # computations run inside another instruction (fusions, reducers)
  for instrs in comps.values():
    for _, _, op, rest in instrs:
      if op != "while":
        inner.update(t for k, t in _CALLS.findall(rest) if k in ("calls", "to_apply"))
  table = {}
  for comp, instrs in comps.items():
    if comp in inner:
      continue
    shapes = _shape_table(instrs)
    for name, shape, op, rest in instrs:
      if op in ("parameter", "get-tuple-element", "tuple", "constant", "bitcast"):
        continue
      _, _, attrs = _operands(rest)
      f = 0.0
      called = re.search(r"\bcalls=%?([\w.\-]+)", attrs)
      if op == "fusion" and called:
        f = comp_flops(called.group(1))
      elif op in ("dot", "convolution", "custom-call"):
        f = _instr_flops(shape, op, rest, shapes)[1]
      op_name = re.search(r'op_name="([^"]*)"', attrs)
      frame = re.search(r"stack_frame_id=(\d+)", attrs)
      stack = _stack(int(frame.group(1)), locs, frames) if frame else []
      where = next((s for p in prefer for s in stack if p in s[0]), stack[0] if stack else None)
      label = "?"
      if where:
        label = f"{os.path.basename(where[0])}:{where[2]} {where[1]}"
        if stack and stack[0] is not where:
          label += f" [{stack[0][1]}]"
      table[name] = {"op": op, "flops": f, "op_name": op_name.group(1) if op_name else "",
                     "where": label}
  return table
