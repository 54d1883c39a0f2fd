"""Build report of a prepared dataset: split sizes, scenes, families, metadata and examples."""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from klip.data import schema

_SAMPLE = 20_000  # records read per split for the distributions (sizes are exact)


def _s(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


def build_report(builder, seconds: float, num_examples: int = 5) -> dict:
  """Summarises a prepared TFDS builder; distributions come from up to _SAMPLE records/split."""
  report = {"dataset": f"{builder.name}/{builder.builder_config.name}",
            "path": os.fspath(builder.data_dir), "build_seconds": round(seconds, 1), "splits": {}}
  sources = builder.as_data_source()
  for split, src in sources.items():
    n = len(src)
    counters = collections.defaultdict(collections.Counter)
    caption_chars = []
    for i in np.linspace(0, n - 1, min(n, _SAMPLE)).astype(int):
      r = src[int(i)]
      for key in ("family", "platform", "band", "scene_id", "region_function"):
        counters[key][_s(r[key])] += 1
      counters["polarisations"]["+".join(map(_s, r["polarisations"]))] += 1
      for c in r["instance_categories"]:
        counters["instances"][_s(c)] += 1
      caption_chars.append(len(_s(r["caption"])))
    examples = [schema.structured_text(src[int(i)]).caption
                for i in np.linspace(0, n - 1, min(n, num_examples)).astype(int)]
    report["splits"][split] = {
        "examples": n,
        "scenes": len(counters["scene_id"]),
        **{k: dict(v.most_common()) for k, v in counters.items() if k != "scene_id"},
        "scene_ids": sorted(counters["scene_id"]),
        "caption_chars_mean": float(np.mean(caption_chars)) if caption_chars else 0.0,
        "example_captions": examples,
    }
  leaks = _scene_leaks(report)
  report["scene_leaks"] = leaks
  return report


def _scene_leaks(report) -> list[str]:
  seen = collections.defaultdict(set)
  for split, r in report["splits"].items():
    for scene in r["scene_ids"]:
      seen[scene].add(split)
  return sorted(s for s, where in seen.items() if len(where) > 1)


def to_markdown(report: dict) -> str:
  lines = [f"# Build report: {report['dataset']}", "",
           f"Path: `{report['path']}`; built in {report['build_seconds']} s.", "",
           "| split | examples | scenes | families | platforms |", "|---|---|---|---|---|"]
  for split, r in report["splits"].items():
    lines.append(f"| {split} | {r['examples']} | {r['scenes']} | {r['family']} | "
                 f"{r['platform']} |")
  lines += ["", f"Scenes in more than one split: {report['scene_leaks'] or 'none'}", ""]
  for split, r in report["splits"].items():
    lines += [f"## {split}", "", f"- instances: {r.get('instances', {})}",
              f"- region functions: {r['region_function']}",
              f"- polarisations: {r['polarisations']}",
              f"- mean caption length: {r['caption_chars_mean']:.0f} characters", "",
              "Examples:", ""] + [f"- {c}" for c in r["example_captions"]] + [""]
  return "\n".join(lines)


def write(report: dict) -> str:
  """Writes build_report.{json,md} into the dataset directory; returns the Markdown path."""
  path = report["path"]
  with open(os.path.join(path, "build_report.json"), "w") as f:
    json.dump(report, f, indent=1)
  md = os.path.join(path, "build_report.md")
  with open(md, "w") as f:
    f.write(to_markdown(report))
  return md
