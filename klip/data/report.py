"""Build report of a prepared dataset: what was written and skipped, and how good the text is.

Per split: examples, scenes, platform/city/category counts. Per field: distinct values, the share
the generator marked generic or uncertain, and consistency violations found by re-checking every
record's fields against its metadata and ground truth (must be zero). Text length and vocabulary
statistics, the skipped items with their reasons, and example pairs drawn with a fixed seed.
"""

from __future__ import annotations

import collections
import json
import os
import re

import numpy as np

from klip.data import schema

_SAMPLE = 20_000  # records read per split for the statistics (split sizes are exact)
_EXAMPLES = 20
_WORD = re.compile(r"[a-z0-9][a-z0-9.'-]*")


def build_report(builder, seconds: float, *, check, skipped=(), seed: int = 0) -> dict:
  """Summarises a prepared TFDS builder. `check(chip, family, values)`: the text generator's
  consistency violations of a record's fields (objects with `field` and `reason`);
  `skipped`: (path, reason) pairs of the build."""
  report = {"dataset": f"{builder.name}/{builder.builder_config.name}",
            "path": os.fspath(builder.data_dir), "build_seconds": round(seconds, 1),
            "splits": {}, "skipped": [{"path": p, "reason": r} for p, r in skipped]}
  fields = collections.defaultdict(lambda: {"values": collections.Counter(), "records": 0,
                                            "generic": 0, "uncertain": 0, "violations": 0})
  violations, words, chars, pool = [], collections.Counter(), [], []
  for split, src in builder.as_data_source().items():
    n = len(src)
    counters = collections.defaultdict(collections.Counter)
    for i in np.unique(np.linspace(0, n - 1, min(n, _SAMPLE)).astype(int)):
      r = src[int(i)]
      for key in ("family", "platform", "band", "scene_id", "city", "region_function"):
        counters[key][schema.text_of(r[key])] += 1
      counters["polarisations"]["+".join(map(schema.text_of, r["polarisations"]))] += 1
      for c in r["instance_categories"]:
        counters["instances"][schema.text_of(c)] += 1
      st = schema.structured_text(r)
      chars.append(len(st.caption))
      words.update(_WORD.findall(st.caption.lower()))
      generic = set(map(schema.text_of, r["text_generic"]))
      uncertain = set(map(schema.text_of, r["text_uncertain"]))
      bad = check(schema.to_chip(r), st.family, st.values)
      for v in bad:
        violations.append({"id": schema.text_of(r["id"]), "field": v.field, "reason": v.reason})
      for name, value in zip(st.field_names, st.values):
        f = fields[f"{st.family}.{name}"]
        f["values"][value] += 1
        f["records"] += 1
        f["generic"] += name in generic
        f["uncertain"] += name in uncertain
        f["violations"] += sum(v.field == name for v in bad)
      pool.append((split, int(i)))
    report["splits"][split] = {
        "examples": n, "scenes": len(counters["scene_id"]),
        **{k: dict(v.most_common()) for k, v in counters.items() if k != "scene_id"},
        "scene_ids": sorted(counters["scene_id"]),
    }
  report["fields"] = {
      name: {"distinct_values": len(f["values"]), "records": f["records"],
             "generic_share": f["generic"] / max(f["records"], 1),
             "uncertain_share": f["uncertain"] / max(f["records"], 1),
             "violations": f["violations"],
             "top_values": dict(f["values"].most_common(3))}
      for name, f in sorted(fields.items())}
  report["consistency_violations"] = violations
  report["text"] = {"caption_chars_mean": float(np.mean(chars)) if chars else 0.0,
                    "caption_chars_p95": float(np.percentile(chars, 95)) if chars else 0.0,
                    "caption_words_mean": sum(words.values()) / max(len(chars), 1),
                    "vocabulary": len(words),
                    "type_token_ratio": len(words) / max(sum(words.values()), 1)}
  report["scene_leaks"] = _scene_leaks(report)
  report["examples"] = _examples(builder, pool, seed)
  return report


def _examples(builder, pool, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  sources = builder.as_data_source()
  picks = rng.choice(len(pool), size=min(_EXAMPLES, len(pool)), replace=False) if pool else []
  out = []
  for k in sorted(picks):
    split, i = pool[k]
    r = sources[split][i]
    out.append({"id": schema.text_of(r["id"]), "split": split,
                "metadata": f"{schema.text_of(r['platform'])} {schema.text_of(r['band'])}-band "
                            f"{'+'.join(map(schema.text_of, r['polarisations']))}, "
                            f"{float(r['pixel_spacing_m']):.2g} m/px, "
                            f"{schema.text_of(r['city'])} ({float(r['lat']):.3f}, "
                            f"{float(r['lon']):.3f}), "
                            f"{', '.join(map(schema.text_of, r['instance_subtypes'])) or '-'}",
                "caption": schema.structured_text(r).caption})
  return out


def _scene_leaks(report) -> list[str]:
  seen = collections.defaultdict(set)
  for split, r in report["splits"].items():
    for scene in r["scene_ids"]:
      seen[scene].add(split)
  return sorted(s for s, where in seen.items() if len(where) > 1)


def to_markdown(report: dict) -> str:
  lines = [f"# Build report: {report['dataset']}", "",
           f"Path: `{report['path']}`; built in {report['build_seconds']} s. "
           f"Written: {sum(r['examples'] for r in report['splits'].values())}; skipped: "
           f"{len(report['skipped'])}.", "",
           "| split | examples | scenes | families | platforms |", "|---|---|---|---|---|"]
  for split, r in report["splits"].items():
    lines.append(f"| {split} | {r['examples']} | {r['scenes']} | {r['family']} | "
                 f"{r['platform']} |")
  lines += ["", f"Scenes in more than one split: {report['scene_leaks'] or 'none'}", ""]
  if report["skipped"]:
    reasons = collections.Counter(s["reason"] for s in report["skipped"])
    lines += ["## Skipped", ""] + [f"- {n} x {reason}" for reason, n in reasons.most_common()]
    lines += [""] + [f"  - `{s['path']}`: {s['reason']}" for s in report["skipped"][:50]] + [""]
  t = report["text"]
  lines += ["## Text", "",
            f"Captions: {t['caption_chars_mean']:.0f} characters on average (p95 "
            f"{t['caption_chars_p95']:.0f}), {t['caption_words_mean']:.0f} words; vocabulary "
            f"{t['vocabulary']} words, type/token ratio {t['type_token_ratio']:.4f}. "
            f"Consistency violations: {len(report['consistency_violations'])}.", "",
            "| field | distinct values | generic | uncertain | violations | most common |",
            "|---|---|---|---|---|---|"]
  for name, f in report["fields"].items():
    top = "; ".join(f"{v} ({n})" for v, n in f["top_values"].items())
    lines.append(f"| {name} | {f['distinct_values']} | {f['generic_share']:.1%} | "
                 f"{f['uncertain_share']:.1%} | {f['violations']} | {top} |")
  for split, r in report["splits"].items():
    lines += ["", f"## {split}", "", f"- instances: {r.get('instances', {})}",
              f"- region functions: {r['region_function']}",
              f"- cities: {dict(list(r['city'].items())[:12])}",
              f"- polarisations: {r['polarisations']}"]
  lines += ["", f"## {len(report['examples'])} example pairs (fixed seed)", ""]
  for e in report["examples"]:
    lines += [f"- `{e['id']}` ({e['split']}; {e['metadata']}):", f"  {e['caption']}"]
  return "\n".join(lines) + "\n"


def write(report: dict) -> str:
  """Writes build_report.{json,md} into the dataset directory; returns the Markdown path."""
  path = report["path"]
  with open(os.path.join(path, "build_report.json"), "w") as f:
    json.dump(report, f, indent=1)
  md = os.path.join(path, "build_report.md")
  with open(md, "w") as f:
    f.write(to_markdown(report))
  return md
