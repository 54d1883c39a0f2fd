"""Zero-shot classification: each image goes to the class whose prompt embedding is nearest.

A class is described by prompts built from its readable names (`readable_names`) inside
the caption clause templates the model was pretrained on (`klip.data.caption.PREFIXES`), plus a
plain "a SAR image of {name}":

- subtype, category: "the targets are classified as {name}", "the number of targets is one
  {name}";
- region_function: "the regional function is {name}", "the region is the {area}" (the
  caption writer's area noun, e.g. "port area");
- dominant_landcover: "the terrain is classified as {name}", "the spatial distribution is
  almost uniformly {name}";
- any other text feature with a clause of its own (e.g. "terrain"): that clause.

prompts="ensemble": the class embedding is the normalised mean of all its prompt embeddings;
prompts="single": the first prompt only (the clause with the literal class name). Classes: the
label's closed vocabulary if it has one (`VOCABULARIES`), and every class of the split.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from evals import classes as classes_lib
from klip.data import chip as chip_lib
from klip.data import knowledge
from klip.data.text import PREFIXES
from klip.hcot import rules

# Labels with a closed vocabulary: zero-shot chooses among all of it, not only the classes
# that happen to occur in the scored split.
VOCABULARIES = {"category": chip_lib.TARGET_CATEGORIES,
                "dominant_landcover": chip_lib.LANDCOVER_CLASSES}


def class_list(label: str, labels: list[str]) -> list[str]:
  """Sorted classes: the label's closed vocabulary, if any, and every class in `labels`."""
  return sorted(set(VOCABULARIES.get(label, ())).union(labels))


def readable_names(label: str, name: str) -> list[str]:
  """How captions name a class, most literal first (no duplicates).

  subtype: the archive's name and the knowledge base's caption label ("BTR60", "BTR-60 armoured
  personnel carrier"); category: the name and its singular noun ("storage tank");
  region_function / dominant_landcover: the name and the phrase the caption writer uses for it
  ("airport", "air transport"; "urban", "built-up area"); any other label: the name.
  """
  names = [name.replace("_", " ")]
  if label == "subtype":
    subtype = knowledge.objects().subtype(name)
    names += [subtype.label] if subtype else []
  elif label == "category":
    category = knowledge.objects().categories.get(name)
    names += [category.singular] if category else []
  elif label == "region_function":
    names += [rules.FUNCTION.get(name, name)]
  elif label == "dominant_landcover":
    names += [rules.TERRAIN.get(name, name), rules.COVER.get(name, name)]
  return list(dict.fromkeys(names))


PLAIN = "a SAR image of {}"
TEMPLATES = {
    "subtype": (PREFIXES["category"] + "{}", PREFIXES["count"] + "one {}"),
    "category": (PREFIXES["category"] + "{}", PREFIXES["count"] + "one {}"),
    "region_function": (PREFIXES["functionality"] + "{}",),
    "dominant_landcover": (PREFIXES["terrain"] + "{}",
                           PREFIXES["distribution"] + "almost uniformly {}"),
}


def class_prompts(label: str, name: str) -> list[str]:
  """The prompt ensemble of class `name` of `label`, the literal-name clause first."""
  templates = TEMPLATES.get(label, (PREFIXES[label] + "{}",) if label in PREFIXES else ())
  names = readable_names(label, name)
  out = [t.format(n) for t in templates + (PLAIN,) for n in names]
  if label == "region_function" and name in rules.REGION:
    out.append(PREFIXES["region"] + "the " + rules.REGION[name])
  return list(dict.fromkeys(out))


def class_embeddings(embed_texts, prompts: list[list[str]]) -> np.ndarray:
  """Unit class embeddings [C, E]: the normalised mean embedding of each class's prompts."""
  z = embed_texts([p for ps in prompts for p in ps])
  ends = np.cumsum([len(ps) for ps in prompts])
  means = np.stack([z[e - len(ps):e].mean(axis=0) for e, ps in zip(ends, prompts)])
  return means / np.linalg.norm(means, axis=-1, keepdims=True)


class Evaluator:
  """Zero-shot top-1 classification of `split` of dataset `data` by `label`."""

  def __init__(self, predictor, datasets, *, data: str, split: str, label: str,
               prompts: str = "ensemble", max_examples: int | None = None):
    if prompts not in ("ensemble", "single"):
      raise ValueError(f"prompts must be 'ensemble' or 'single', got {prompts!r}")
    self.predictor = predictor
    self.datasets = datasets
    self.data, self.split, self.label = data, split, label
    self.prompts = prompts
    self.max_examples = max_examples

  def run(self, artifacts) -> Iterator[tuple[str, float]]:
    split, labels = classes_lib.labelled(self.datasets, self.data, self.split, self.label,
                                         self.max_examples)
    names = class_list(self.label, labels)
    target = classes_lib.encode(labels, names)
    prompts = [class_prompts(self.label, n) for n in names]
    if self.prompts == "single":
      prompts = [p[:1] for p in prompts]
    text = class_embeddings(self.predictor.embed_texts, prompts)
    images = self.predictor.split_features(split).embedding
    pred = np.argmax(images @ text.T, axis=-1)
    yield from classes_lib.scores(pred, target, len(names))
    classes_lib.report(artifacts, names, pred, target)
    artifacts.table("prompts", ("class", "prompts"),
                    [(n, "; ".join(p)) for n, p in zip(names, prompts)])
