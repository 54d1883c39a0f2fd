"""Human-readable eval reports: one Markdown page per checkpoint step and an index over steps.

DIR/eval/step_N/report.md: every evaluator's metrics (value and 95 % bootstrap interval),
figures and tables, skip reasons and tracebacks. DIR/eval/report.md: the metrics that carry
intervals across all evaluated steps, and whether the latest step's interval lies entirely
above or below the earliest step's (a change beyond the bootstrap intervals).
"""

from __future__ import annotations

import dataclasses
import math

from etils import epath

from klip import paths

LOW, HIGH = "/ci_low", "/ci_high"


@dataclasses.dataclass
class Outcome:
  """What one evaluator did at one step."""
  name: str
  type: str
  status: str  # "ok", "skipped" or "failed"
  seconds: float
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  detail: str = ""  # the skip reason or the traceback
  markdown: list[str] = dataclasses.field(default_factory=list)


def _number(v: float) -> str:
  if isinstance(v, float) and math.isnan(v):
    return "nan"
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def with_intervals(metrics: dict[str, float]) -> list[tuple[str, str]]:
  """(name, "value [low, high]") rows; a metric's interval entries are folded into it."""
  rows = []
  for name, value in metrics.items():
    if name.endswith((LOW, HIGH)):
      continue
    text = _number(value)
    if name + LOW in metrics:
      text += f" [{_number(metrics[name + LOW])}, {_number(metrics[name + HIGH])}]"
    rows.append((name, text))
  return rows


def write_step(directory: str, step: int, outcomes: list[Outcome], header: dict) -> str:
  lines = [f"# KLIP evaluation at step {step}", ""]
  lines += [f"- {k}: {v}" for k, v in header.items()]
  lines += ["", "| evaluator | status | seconds | headline |", "|---|---|---|---|"]
  for o in outcomes:
    first = with_intervals(o.metrics)[:1]
    headline = f"{first[0][0]} = {first[0][1]}" if first else o.detail.splitlines()[0][:120] \
        if o.detail else ""
    lines.append(f"| {o.name} ({o.type}) | {o.status} | {o.seconds:.1f} | "
                 f"{headline.replace('|', '/')} |")
  for o in outcomes:
    lines += ["", f"## {o.name} ({o.type}): {o.status}", ""]
    if o.status == "skipped":
      lines.append(f"skipped: {o.detail}")
    elif o.status == "failed":
      lines += ["```", o.detail.rstrip(), "```"]
    if o.metrics:
      lines += ["| metric | value [95 % CI] |", "|---|---|"]
      lines += [f"| {k} | {v} |" for k, v in with_intervals(o.metrics)]
    for md in o.markdown:
      lines += ["", md]
  path = epath.Path(directory) / "report.md"
  paths.write_atomic(path, "\n".join(lines) + "\n")
  return str(path)


def write_index(eval_dir: str, rows: list[dict], missed: dict[int, str]) -> str:
  """DIR/eval/report.md from the metrics.jsonl rows (one per evaluated step) and the steps the
  ledger records as missed (step -> why)."""
  rows = sorted(rows, key=lambda r: r["step"])
  steps = [r["step"] for r in rows]
  names = sorted({k for r in rows for k in r["metrics"] if k + LOW in r["metrics"]})
  lines = ["# KLIP evaluation: all steps", "",
           f"Steps evaluated: {', '.join(map(str, steps)) or 'none'}. Per-step reports: "
           + ", ".join(f"[{s}](step_{s}/report.md)" for s in steps), ""]
  if missed:
    lines += [f"Steps missed ({len(missed)}): the run saved them but they could not be "
              "evaluated:", ""] + [f"- {s}: {why}" for s, why in sorted(missed.items())] + [""]
  if len(steps) >= 2:
    lines += [f"Change from step {steps[0]} to step {steps[-1]}: **up** / **down** when the "
              "95 % bootstrap intervals do not overlap, `~` when they do.", ""]
  lines += ["| metric | " + " | ".join(f"step {s}" for s in steps) + " | change |",
            "|---|" + "---|" * (len(steps) + 1)]
  for name in names:
    cells = []
    for r in rows:
      m = r["metrics"]
      cells.append(f"{_number(m[name])} [{_number(m[name + LOW])}, {_number(m[name + HIGH])}]"
                   if name in m and name + LOW in m else "")
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {_change(rows, name)} |")
  skipped = {k: v for r in rows[-1:] for k, v in r.get("skipped", {}).items()}
  failed = {k: v for r in rows[-1:] for k, v in r.get("failed", {}).items()}
  if skipped or failed:
    lines += ["", f"At step {steps[-1]}:"]
    lines += [f"- {k}: skipped: {v}" for k, v in skipped.items()]
    lines += [f"- {k}: failed: {v.strip().splitlines()[-1]}" for k, v in failed.items()]
  path = epath.Path(eval_dir) / "report.md"
  paths.write_atomic(path, "\n".join(lines) + "\n")
  return str(path)


def _change(rows: list[dict], name: str) -> str:
  have = [r["metrics"] for r in rows if name in r["metrics"] and name + LOW in r["metrics"]]
  if len(have) < 2:
    return ""
  first, last = have[0], have[-1]
  if last[name + LOW] > first[name + HIGH]:
    return "**up**"
  if last[name + HIGH] < first[name + LOW]:
    return "**down**"
  return "~"
