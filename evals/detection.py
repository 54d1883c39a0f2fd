"""Object detection with a linear head on frozen patch features, scored by COCO box mAP.

Head, trained here on `train_split`'s tiles with the recipe of `heads.fit`: CenterNet-like on
each tile's patch grid and linear on each patch token (`heads.linear`), it gives one logit per
category (class-aware, independent sigmoids, initial score PRIOR) and one class-agnostic box
per cell: the box centre's offset inside the cell (sigmoid) and its log width and height in
patches. A ground-truth box is assigned to every tile holding its centre and, there, to the
cell holding its centre: the cell's target is 1 for the box's category, and its box target is
the largest box centred in it. Loss: sigmoid focal loss over every cell and category plus L1 on
the boxes of assigned cells, each divided by the number of assigned cells.

Decoding: every (cell, category) scoring at least SCORE_THRESHOLD is a detection; boxes are
shifted from their tile to the image, clipped to it, merged across overlapping tiles by
per-category NMS at NMS_IOU, and the MAX_DETECTIONS best of each image are kept.

Metrics (COCO bbox, area "all", at most MAX_DETECTIONS per image): `map50` (AP at IoU 0.5) and
`map` (AP averaged over IoU 0.5:0.95), means over the categories with ground truth in `split`,
with 95 % bootstrap intervals over images (`stats.with_ci`; a split of one scene, such as the
HRSID samples' test split, gets a zero-width interval). pycocotools matches detections to
ground truth once per image (`COCOeval.evaluate`); precision is accumulated from those matches
here, vectorised and equal to `COCOeval.accumulate`, so a bootstrap resample reweights images
instead of re-running COCO. Categories: those of `train_split` and `split`, sorted.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib import patches as mpatches
from matplotlib.figure import Figure
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from evals import heads
from evals import stats
from evals import tiling
from klip.data import schema

PRIOR = 0.01        # initial score of every (cell, category)
SCORE_THRESHOLD = 0.05
NMS_IOU = 0.5
MAX_DETECTIONS = 100
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
FIGURE_IMAGES = 4    # test images in the overlay figure (the first ones with boxes)
FIGURE_SCORE = 0.3   # predicted boxes drawn in the figure


class Boxes(NamedTuple):
  """Boxes of one image: [K, 4] (x0, y0, x1, y1) px, category indices [K], scores [K]."""
  boxes: np.ndarray
  labels: np.ndarray
  scores: np.ndarray


def ground_truth(record, categories: Sequence[str]) -> Boxes:
  labels = np.array([categories.index(schema.text_of(c))
                     for c in record["instance_categories"]], np.int64)
  boxes = np.asarray(record["instance_boxes"], np.float32).reshape(-1, 4)
  return Boxes(boxes, labels, np.ones(len(labels), np.float32))


# ----- the head ---------------------------------------------------------------------------------
def init(seed: int, width: int, num_classes: int) -> dict:
  """The linear head; category biases start at the log-odds of PRIOR (as RetinaNet)."""
  bias = np.zeros(num_classes + 4, np.float32)
  bias[:num_classes] = -np.log((1.0 - PRIOR) / PRIOR)
  return heads.linear_params(seed, width, num_classes + 4, bias)


def apply(params: dict, x: jax.Array) -> jax.Array:
  """[B, g, g, W] standardised patches -> [B, g, g, categories + 4] logits and box values."""
  return heads.linear(params, x)


def targets(gt: Boxes, origin, grid: int, patch: int, num_classes: int):
  """The training targets of one tile at origin (y, x) of its image: category targets
  [g, g, K], box targets [g, g, 4] and the assigned cells [g, g]."""
  cls = np.zeros((grid, grid, num_classes), np.float32)
  box = np.zeros((grid, grid, 4), np.float32)
  assigned = np.zeros((grid, grid), np.float32)
  boxes = tiling.shift_boxes(gt.boxes, (-origin[0], -origin[1]))
  size = np.maximum(boxes[:, 2:] - boxes[:, :2], 0.5)
  for k in np.argsort(np.prod(size, axis=1), kind="stable"):  # larger boxes written last
    cx, cy = (boxes[k, :2] + boxes[k, 2:]) / 2.0 / patch
    i, j = int(np.floor(cy)), int(np.floor(cx))
    if 0 <= i < grid and 0 <= j < grid:
      cls[i, j, gt.labels[k]] = 1.0
      box[i, j] = (cx - j, cy - i, *np.log(size[k] / patch))
      assigned[i, j] = 1.0
  return cls, box, assigned


def loss_fn(params, x, cls, box, assigned):
  out = apply(params, x)
  k = cls.shape[-1]
  n = jnp.maximum(assigned.sum(), 1.0)
  focal = optax.sigmoid_focal_loss(out[..., :k], cls, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA)
  pred = jnp.concatenate([jax.nn.sigmoid(out[..., k:k + 2]), out[..., k + 2:]], axis=-1)
  l1 = jnp.abs(pred - box).sum(-1) * assigned
  return (focal.sum() + l1.sum()) / n


def decode(out: np.ndarray, origin, patch: int) -> Boxes:
  """The detections of one tile's head output [g, g, K + 4], in image coordinates."""
  k = out.shape[-1] - 4
  scores = 1.0 / (1.0 + np.exp(-out[..., :k]))
  i, j, c = np.nonzero(scores >= SCORE_THRESHOLD)
  offset = 1.0 / (1.0 + np.exp(-out[i, j, k:k + 2]))
  size = np.exp(np.minimum(out[i, j, k + 2:], 10.0)) * patch
  centre = (np.stack([j, i], axis=-1) + offset) * patch
  boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=-1)
  return Boxes(tiling.shift_boxes(boxes, origin), c.astype(np.int64),
               scores[i, j, c].astype(np.float32))


def image_detections(tile_boxes: Sequence[Boxes], height: int, width: int) -> Boxes:
  """One image's detections from its tiles' decodings: clipped, merged by per-category NMS,
  the MAX_DETECTIONS best."""
  boxes = tiling.clip_boxes(np.concatenate([b.boxes for b in tile_boxes]), height, width)
  labels = np.concatenate([b.labels for b in tile_boxes])
  scores = np.concatenate([b.scores for b in tile_boxes])
  valid = np.flatnonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
  keep = valid[tiling.batched_nms(boxes[valid], scores[valid], labels[valid], NMS_IOU)]
  keep = keep[:MAX_DETECTIONS]
  return Boxes(boxes[keep], labels[keep], scores[keep])


# ----- COCO mAP ---------------------------------------------------------------------------------
class Matches(NamedTuple):
  """COCO's per-image matching of one category, detections in decreasing score order."""
  image: np.ndarray     # [D] image of each detection
  tp: np.ndarray        # [T, D] matched (true positive) at each IoU threshold
  fp: np.ndarray        # [T, D] unmatched
  gt_count: np.ndarray  # [N] ground-truth boxes of the category per image


def _coco(images: list[dict], categories: list[dict], boxes: Sequence[Boxes],
          with_scores: bool) -> COCO:
  """An in-memory COCO dataset of boxes (detections too: `COCO.loadRes` fails on none)."""
  annotations = []
  for image, b in zip(images, boxes):
    for box, label, score in zip(b.boxes, b.labels, b.scores):
      x0, y0, x1, y1 = (float(v) for v in box)
      ann = {"id": len(annotations) + 1, "image_id": image["id"],  # ids from 1: 0 = unmatched
             "category_id": int(label) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
             "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
      if with_scores:
        ann["score"] = float(score)
      annotations.append(ann)
  coco = COCO()
  coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
  coco.createIndex()
  return coco


def coco_matches(gt: Sequence[Boxes], detections: Sequence[Boxes], num_classes: int
                 ) -> tuple[list[Matches], np.ndarray, np.ndarray]:
  """pycocotools' per-image matching (bbox, area "all", MAX_DETECTIONS per image) of each
  category; returns (matches, IoU thresholds [T], recall thresholds [R])."""
  images = [{"id": i + 1} for i in range(len(gt))]
  categories = [{"id": k + 1, "name": str(k)} for k in range(num_classes)]
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
    evaluation = COCOeval(_coco(images, categories, gt, False),
                          _coco(images, categories, detections, True), "bbox")
    p = evaluation.params
    p.areaRng, p.areaRngLbl, p.maxDets = [[0, 1e10]], ["all"], [MAX_DETECTIONS]
    evaluation.evaluate()
  n, t = len(gt), len(p.iouThrs)
  out = []
  for k in range(num_classes):
    per_image = evaluation.evalImgs[k * n:(k + 1) * n]  # one area range: [category][image]
    found = [(i, e) for i, e in enumerate(per_image) if e is not None]
    image = np.concatenate([np.full(len(e["dtScores"]), i) for i, e in found] + [[]])
    score = np.concatenate([e["dtScores"] for _, e in found] + [[]])
    dtm = np.concatenate([e["dtMatches"] for _, e in found] + [np.zeros((t, 0))], axis=1)
    ignored = np.concatenate([e["dtIgnore"] for _, e in found] + [np.zeros((t, 0))], axis=1)
    order = np.argsort(-score, kind="mergesort")  # as COCOeval.accumulate
    gt_count = np.zeros(n)
    for i, e in found:
      gt_count[i] = np.count_nonzero(e["gtIgnore"] == 0)
    matched, ignored = dtm[:, order] > 0, ignored[:, order] > 0
    out.append(Matches(image[order].astype(np.int64), matched & ~ignored,
                       ~matched & ~ignored, gt_count))
  return out, np.asarray(p.iouThrs), np.asarray(p.recThrs)


def precision(matches: Matches, weights: np.ndarray, recall_thresholds: np.ndarray
              ) -> np.ndarray | None:
  """Interpolated precision [T, R] of one category with images weighted (1 each: COCO's
  `accumulate`; bootstrap counts: a resample), or None without ground truth."""
  positives = float(weights @ matches.gt_count)
  if positives == 0:
    return None
  w = weights[matches.image]
  tp = np.cumsum(matches.tp * w, axis=1)
  fp = np.cumsum(matches.fp * w, axis=1)
  recall = tp / positives
  prec = tp / (tp + fp + np.spacing(1))
  prec = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]  # the precision envelope
  out = np.zeros((tp.shape[0], len(recall_thresholds)))
  for t in range(tp.shape[0]):
    idx = np.searchsorted(recall[t], recall_thresholds, side="left")
    ok = idx < tp.shape[1]
    out[t, ok] = prec[t, idx[ok]]
  return out


def average_precision(matches: Sequence[Matches], weights: np.ndarray,
                      recall_thresholds: np.ndarray) -> np.ndarray:
  """[K, T] AP of each category at each IoU threshold (NaN: no ground truth)."""
  out = []
  for m in matches:
    p = precision(m, weights, recall_thresholds)
    out.append(np.full(len(m.tp), np.nan) if p is None else p.mean(axis=1))
  return np.array(out)


def mean_ap(ap: np.ndarray) -> tuple[float, float]:
  """(mAP at IoU 0.5, mAP over IoU 0.5:0.95) of [K, T] AP, over categories with ground truth."""
  present = ~np.isnan(ap[:, 0])
  if not present.any():
    return float("nan"), float("nan")
  return float(ap[present, 0].mean()), float(ap[present].mean())


# ----- the evaluator ----------------------------------------------------------------------------
class Evaluator:
  """Detection of `split` of dataset `data` by a head trained on `train_split` for `epochs`."""

  def __init__(self, predictor, datasets, *, data: str, train_split: str, split: str,
               epochs: int, seed: int, max_examples: int | None = None):
    self.predictor = predictor
    self.datasets = datasets
    self.data, self.train_split, self.split = data, train_split, split
    self.epochs, self.seed = epochs, seed
    self.max_examples = max_examples

  def run(self, artifacts) -> Iterator[tuple[str, float]]:
    train = self.datasets.split(self.data, self.train_split, max_examples=self.max_examples)
    test = self.datasets.split(self.data, self.split, max_examples=self.max_examples)
    categories = sorted({schema.text_of(c) for s in (train, test) for r in s.records
                         for c in r["instance_categories"]})
    if not categories:
      raise ValueError(f"{self.data}: no boxes in {self.train_split} or {self.split}")
    k = len(categories)
    grid = self.predictor.patch_grid
    patch = self.predictor.image_size // grid

    train_tiles = heads.tiled_features(self.predictor, train)
    standardise = heads.Standardise.fit(train_tiles.patches)
    train_gt = [ground_truth(r, categories) for r in train.records]
    cls, box, assigned = (np.stack(a) for a in zip(*(
        targets(train_gt[r], o, grid, patch, k)
        for r, o in zip(train_tiles.record, train_tiles.origins))))
    params, loss = heads.fit(loss_fn, init(self.seed, train_tiles.patches.shape[-1], k),
                             (standardise(train_tiles.patches), cls, box, assigned),
                             epochs=self.epochs, seed=self.seed)

    tiles = heads.tiled_features(self.predictor, test)
    out = heads.predict(apply, params, standardise(tiles.patches))
    origins = tiles.origins
    detections = []
    for i, im in enumerate(tiles.images):
      rows = tiles.rows(i)
      detections.append(image_detections(
          [decode(o, origin, patch) for o, origin in zip(out[rows], origins[rows])],
          im.shape[0], im.shape[1]))
    gt = [ground_truth(r, categories) for r in test.records]
    matches, _, recall_thresholds = coco_matches(gt, detections, k)

    @functools.lru_cache(maxsize=None)
    def resampled(key: bytes) -> tuple[float, float]:
      weights = np.bincount(np.frombuffer(key, np.int64), minlength=len(gt)).astype(float)
      return mean_ap(average_precision(matches, weights, recall_thresholds))

    rows = np.arange(len(gt), dtype=np.int64)
    yield from stats.with_ci("map50", rows, lambda r: resampled(r.tobytes())[0])
    yield from stats.with_ci("map", rows, lambda r: resampled(r.tobytes())[1])
    yield "num_images", float(len(gt))
    yield "num_boxes", float(sum(len(g.labels) for g in gt))
    yield "head_loss", loss

    ap = average_precision(matches, np.ones(len(gt)), recall_thresholds)
    artifacts.table("AP per category", ("category", "AP@0.5", "AP@[.5:.95]", "boxes",
                                        "detections"),
                    [(c, float(ap[j, 0]), float(ap[j].mean()),
                      int(sum((g.labels == j).sum() for g in gt)),
                      int(sum((d.labels == j).sum() for d in detections)))
                     for j, c in enumerate(categories)])
    shown = [i for i, g in enumerate(gt) if len(g.labels)][:FIGURE_IMAGES]
    if shown:
      artifacts.figure("ground truth and detections",
                       overlay([tiles.images[i] for i in shown], [gt[i] for i in shown],
                               [detections[i] for i in shown], categories))


def overlay(images: Sequence[np.ndarray], gt: Sequence[Boxes], detections: Sequence[Boxes],
            categories: Sequence[str]) -> Figure:
  """Images (first channel, dB) with ground-truth (green) and predicted boxes scoring at least
  FIGURE_SCORE (red, with category and score)."""
  side = min(8.0, max(3.2, max(images[0].shape[:2]) / 100))  # inches; scenes drawn larger
  fig = Figure(figsize=(side * len(images), side + 0.2))
  for n, (im, g, d) in enumerate(zip(images, gt, detections)):
    ax = fig.add_subplot(1, len(images), n + 1)
    ax.imshow(im[..., 0], cmap="gray")
    for box in g.boxes:
      ax.add_patch(mpatches.Rectangle(box[:2] - 0.5, *(box[2:] - box[:2]), fill=False,
                                      edgecolor="lime", linewidth=1.0))
    for box, label, score in zip(d.boxes, d.labels, d.scores):
      if score >= FIGURE_SCORE:
        ax.add_patch(mpatches.Rectangle(box[:2] - 0.5, *(box[2:] - box[:2]), fill=False,
                                        edgecolor="red", linewidth=1.0))
        ax.text(box[0] - 0.5, box[1] - 1.0, f"{categories[label]} {score:.2f}", color="red",
                fontsize=5)
    ax.set_axis_off()
  fig.suptitle("green: ground truth, red: detections", fontsize=8)
  return fig
