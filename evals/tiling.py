"""Tiling large scenes to the model input and stitching predictions back (pure numpy).

A scene [H, W, ...] is cut into S x S tiles (S = the model's image size) whose top-left corners
step by `stride`, default S - S // 4 (a quarter of a tile overlaps its neighbour; with S = 64
and 8 px patches, 48 px = 6 patches, so overlapping tiles share the patch grid). The last row and
column of tiles are flush with the bottom and right borders, so no tile reaches past the scene
unless the scene is smaller than S along that axis: then the one tile starts at 0 and the scene
is padded at the bottom/right with a fill value. A chip of exactly S x S is one tile.

Dense predictions are stitched by averaging over the tiles that cover each pixel; boxes are
shifted from tile to scene coordinates, clipped to the scene and merged across tiles by
non-maximum suppression (per class). Boxes are (x0, y0, x1, y1) in pixels, x1/y1 exclusive;
tile origins are (y, x).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


def default_stride(size: int) -> int:
  return size - size // 4


def starts(length: int, size: int, stride: int) -> list[int]:
  """Tile starts along an axis of `length`: every `stride`, the last flush with the end."""
  if stride <= 0 or stride > size:
    raise ValueError(f"stride must be in (0, {size}], got {stride}")
  if length <= size:
    return [0]
  out = list(range(0, length - size, stride))
  return out + [length - size]


@dataclasses.dataclass(frozen=True)
class Tiling:
  """The S x S tiles of an H x W scene."""
  height: int
  width: int
  size: int
  stride: int

  @classmethod
  def of(cls, shape: tuple[int, ...], size: int, stride: int | None = None) -> Tiling:
    """The tiling of an array whose leading axes are (H, W)."""
    return cls(int(shape[0]), int(shape[1]), size,
               default_stride(size) if stride is None else stride)

  @functools.cached_property
  def origins(self) -> np.ndarray:
    """[T, 2] (y, x) top-left corners, row-major."""
    ys = starts(self.height, self.size, self.stride)
    xs = starts(self.width, self.size, self.stride)
    return np.array([(y, x) for y in ys for x in xs], np.int64).reshape(-1, 2)

  def __len__(self) -> int:
    return len(self.origins)

  def tiles(self, array: np.ndarray, fill=0) -> np.ndarray:
    """[T, S, S, ...] tiles of `array` [H, W, ...]; outside the scene is `fill`."""
    if array.shape[:2] != (self.height, self.width):
      raise ValueError(f"array {array.shape[:2]} is not {self.height} x {self.width}")
    s = self.size
    padded = np.full((max(self.height, s), max(self.width, s)) + array.shape[2:], fill,
                     array.dtype)
    padded[:self.height, :self.width] = array
    return np.stack([padded[y:y + s, x:x + s] for y, x in self.origins])

  def stitch(self, tiles: np.ndarray) -> np.ndarray:
    """The scene [H, W, ...] of per-tile values [T, S, S, ...], averaged where tiles overlap
    (float32; summed in float64, so identical overlapping values come back exactly)."""
    s = self.size
    if tiles.shape[:3] != (len(self), s, s):
      raise ValueError(f"expected {len(self)} tiles of {s} x {s}, got {tiles.shape[:3]}")
    shape = (max(self.height, s), max(self.width, s))
    total = np.zeros(shape + tiles.shape[3:], np.float64)
    count = np.zeros(shape, np.int64)
    for (y, x), tile in zip(self.origins, tiles):
      total[y:y + s, x:x + s] += tile
      count[y:y + s, x:x + s] += 1
    count = count.reshape(shape + (1,) * (tiles.ndim - 3))
    return (total / count)[:self.height, :self.width].astype(np.float32)


def shift_boxes(boxes: np.ndarray, origin) -> np.ndarray:
  """Boxes [K, 4] in tile coordinates -> scene coordinates of the tile at origin (y, x)."""
  y, x = origin
  return np.asarray(boxes, np.float32).reshape(-1, 4) + np.array([x, y, x, y], np.float32)


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
  return np.clip(boxes, 0, np.array([width, height, width, height], np.float32))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[A, B] intersection over union of boxes a [A, 4] and b [B, 4]."""
  a, b = a[:, None], b[None]
  w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = w * h
  area = lambda z: (z[..., 2] - z[..., 0]) * (z[..., 3] - z[..., 1])
  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
  """Indices of the boxes kept by greedy non-maximum suppression, by decreasing score: a box
  is dropped when its IoU with a kept, higher-scoring box exceeds iou_threshold."""
  order = np.argsort(-scores, kind="stable")
  keep = []
  while order.size:
    i, order = order[0], order[1:]
    keep.append(i)
    order = order[box_iou(boxes[i:i + 1], boxes[order])[0] <= iou_threshold]
  return np.array(keep, np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                iou_threshold: float) -> np.ndarray:
  """`nms` within each label; the kept indices by decreasing score."""
  keep = np.concatenate([np.flatnonzero(labels == c)[nms(boxes[labels == c],
                                                         scores[labels == c], iou_threshold)]
                         for c in np.unique(labels)] + [np.zeros(0, np.int64)])
  return keep[np.argsort(-scores[keep], kind="stable")]
