"""Land-cover segmentation with a linear head on frozen patch features, scored by mIoU.

Head, trained here on `train_split`'s tiles with the recipe of `heads.fit`: linear on each patch
token (`heads.linear`) to one logit per land-cover class (`chip.LANDCOVER_CLASSES`), upsampled
bilinearly from the patch grid to pixels; loss: per-pixel cross-entropy averaged over the
labelled pixels (IGNORE = 255 marks unlabelled pixels). Images larger than the model input are
tiled (`evals.tiling`) and the upsampled logits of overlapping tiles averaged before the argmax.
Records without a land-cover mask are left out of both splits.

Metrics on `split`, over labelled pixels: `miou`, the mean IoU over the classes present in the
ground truth, and `pixel_accuracy`, each with a 95 % bootstrap interval over S x S cells of the
images (S = the model input; the last cell of a row or column may be smaller). A chip of the
model's size is one cell, so on chips the interval is over images; a single-scene dataset
(PolSF) still gets one, optimistic there since cells of one scene are correlated. The report has
the per-class IoU table and image / ground truth / prediction overlays.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import patches as mpatches
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from evals import heads
from evals import stats
from klip.data import chip as chip_lib
from klip.data import schema

IGNORE = 255
CLASSES = chip_lib.LANDCOVER_CLASSES
FIGURE_IMAGES = 4  # the first test images in the overlay figure
COLOURS = ("#1f4e9c", "#d62728", "#2ca02c", "#c8a060", "#7f5f3f", "#ff7f0e", "#e0e0e0")


# ----- the head ---------------------------------------------------------------------------------
def apply(params: dict, x: jax.Array, *, patch: int) -> jax.Array:
  """[B, g, g, W] standardised patches -> class logits [B, S, S, K] at pixels (S = g * patch,
  bilinear upsampling)."""
  logits = heads.linear(params, x)
  b, g, _, k = logits.shape
  return jax.image.resize(logits, (b, g * patch, g * patch, k), "bilinear")


def loss_fn(params, x, labels, *, patch: int):
  """Mean cross-entropy over the labelled pixels of labels [B, S, S]."""
  logp = jax.nn.log_softmax(apply(params, x, patch=patch))
  valid = labels != IGNORE
  target = jnp.where(valid, labels, 0).astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * valid) / jnp.maximum(valid.sum(), 1)


# ----- metrics ----------------------------------------------------------------------------------
def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
  """[K, K] pixel counts (rows: ground truth, columns: prediction) over labelled pixels."""
  valid = target != IGNORE
  index = target[valid].astype(np.int64) * num_classes + pred[valid]
  return np.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def cell_confusions(pred: np.ndarray, target: np.ndarray, size: int, num_classes: int
                    ) -> np.ndarray:
  """[U, K, K] confusions of the size x size cells of one image (row-major)."""
  h, w = target.shape
  return np.stack([confusion(pred[y:y + size, x:x + size], target[y:y + size, x:x + size],
                             num_classes)
                   for y in range(0, h, size) for x in range(0, w, size)])


def class_iou(conf: np.ndarray) -> np.ndarray:
  """[K] IoU of each class; NaN for a class absent from the ground truth."""
  truth, predicted, hit = conf.sum(1), conf.sum(0), np.diag(conf)
  union = truth + predicted - hit
  return np.where(truth > 0, hit / np.maximum(union, 1), np.nan)


def miou(conf: np.ndarray) -> float:
  iou = class_iou(conf)
  return float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
  return float(np.trace(conf) / max(conf.sum(), 1))


# ----- the evaluator ----------------------------------------------------------------------------
def _labelled(split):
  """The records of a split with a land-cover mask, and the masks."""
  masks = [schema.decode_landcover(r) for r in split.records]
  rows = [i for i, m in enumerate(masks) if m is not None]
  return split.subset(rows), [masks[i] for i in rows]


class Evaluator:
  """Segmentation of `split` of dataset `data` by a head trained on `train_split`."""

  def __init__(self, predictor, datasets, *, data: str, train_split: str, split: str,
               epochs: int, seed: int, max_examples: int | None = None):
    self.predictor = predictor
    self.datasets = datasets
    self.data, self.train_split, self.split = data, train_split, split
    self.epochs, self.seed = epochs, seed
    self.max_examples = max_examples

  def run(self, artifacts) -> Iterator[tuple[str, float]]:
    train, train_masks = _labelled(self.datasets.split(self.data, self.train_split,
                                                       max_examples=self.max_examples))
    test, test_masks = _labelled(self.datasets.split(self.data, self.split,
                                                     max_examples=self.max_examples))
    if not len(train) or not len(test):
      raise ValueError(f"{self.data}: no land-cover masks in {self.train_split} "
                       f"({len(train)}) or {self.split} ({len(test)})")
    s, k = self.predictor.image_size, len(CLASSES)

    train_tiles = heads.tiled_features(self.predictor, train)
    standardise = heads.Standardise.fit(train_tiles.patches)
    labels = np.concatenate([t.tiles(m, IGNORE) for t, m in zip(train_tiles.tilings,
                                                                 train_masks)])
    patch = s // self.predictor.patch_grid
    params, loss = heads.fit(
        functools.partial(loss_fn, patch=patch),
        heads.linear_params(self.seed, train_tiles.patches.shape[-1], k),
        (standardise(train_tiles.patches), labels), epochs=self.epochs, seed=self.seed)

    tiles = heads.tiled_features(self.predictor, test)
    logits = heads.predict(functools.partial(apply, patch=patch), params,
                           standardise(tiles.patches))
    preds = [t.stitch(logits[tiles.rows(i)]).argmax(-1)
             for i, t in enumerate(tiles.tilings)]
    cells = np.concatenate([cell_confusions(p, m, s, k) for p, m in zip(preds, test_masks)])
    yield from stats.with_ci("miou", cells, lambda c: miou(c.sum(0)))
    yield from stats.with_ci("pixel_accuracy", cells, lambda c: pixel_accuracy(c.sum(0)))
    conf = cells.sum(0)
    yield "num_images", float(len(test))
    yield "num_pixels", float(conf.sum())
    yield "head_loss", loss

    iou = class_iou(conf)
    artifacts.table("IoU per class", ("class", "IoU", "pixels", "predicted pixels"),
                    [(c, float(iou[j]), int(conf[j].sum()), int(conf[:, j].sum()))
                     for j, c in enumerate(CLASSES)])
    shown = range(min(FIGURE_IMAGES, len(test)))
    artifacts.figure("image, ground truth and prediction",
                     overlay([tiles.images[i] for i in shown], [test_masks[i] for i in shown],
                             [preds[i] for i in shown]))


def overlay(images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
            preds: Sequence[np.ndarray]) -> Figure:
  """One row per image: the image (first channel, dB), its ground truth (unlabelled pixels
  blank) and the prediction, in one colour per class."""
  cmap = ListedColormap(COLOURS)
  classes = dict(cmap=cmap, vmin=-0.5, vmax=len(CLASSES) - 0.5, interpolation="nearest")
  fig = Figure(figsize=(7.5, 2.5 * len(images)))
  for n, (im, mask, pred) in enumerate(zip(images, masks, preds)):
    panels = ((im[..., 0], dict(cmap="gray"), "image (dB)"),
              (np.ma.masked_equal(mask, IGNORE), classes, "ground truth"),
              (pred, classes, "prediction"))
    for m, (data, kwargs, title) in enumerate(panels):
      ax = fig.add_subplot(len(images), 3, 3 * n + m + 1)
      ax.imshow(data, **kwargs)
      ax.set_axis_off()
      if n == 0:
        ax.set_title(title, fontsize=8)
  fig.subplots_adjust(wspace=0.05, hspace=0.05)
  fig.legend(handles=[mpatches.Patch(color=c, label=name) for c, name in zip(COLOURS, CLASSES)],
             loc="upper center", bbox_to_anchor=(0.5, 0.1), ncol=len(CLASSES), fontsize=6,
             frameon=False)
  return fig
