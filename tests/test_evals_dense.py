"""Dense evaluators: tiling and stitching, NMS, COCO mAP and mIoU by hand, head training
determinism, and detection / segmentation end to end on the smoke checkpoint (chips, and
mosaics of chips that must be tiled)."""

import dataclasses
import io
import os

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools.cocoeval import COCOeval

from evals import artifacts as artifacts_lib
from evals import detection
from evals import heads
from evals import segmentation
from evals import tiling
from klip.data import schema

EPOCHS = 5  # enough to exercise training; the quality of the smoke model is not under test


# ----- tiling ------------------------------------------------------------------------------------
def test_tile_starts_step_by_stride_and_end_flush():
  assert tiling.starts(100, 32, 24) == [0, 24, 48, 68]
  assert tiling.starts(32, 32, 24) == [0]
  assert tiling.starts(20, 32, 24) == [0]   # smaller than a tile: one padded tile
  assert tiling.starts(56, 32, 24) == [0, 24]
  assert tiling.default_stride(64) == 48
  with pytest.raises(ValueError):
    tiling.starts(100, 32, 40)  # a stride above the tile size would leave gaps


@pytest.mark.parametrize("shape", [(100, 90, 2), (32, 32, 1), (20, 50, 3), (45, 33)])
def test_tile_then_stitch_reconstructs_the_scene_exactly(shape):
  scene = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  t = tiling.Tiling.of(shape, 32)
  tiles = t.tiles(scene, fill=np.nan)
  assert tiles.shape == (len(t), 32, 32) + shape[2:]
  for (y, x), tile in zip(t.origins, tiles):
    np.testing.assert_array_equal(tile[:shape[0] - y, :shape[1] - x],
                                  scene[y:y + 32, x:x + 32])
  assert np.isnan(tiles).any() == (shape[0] < 32 or shape[1] < 32)  # the fill pads only
  np.testing.assert_array_equal(t.stitch(tiles), scene)
  assert len(tiling.Tiling.of((32, 32), 32)) == 1


def test_stitch_averages_overlapping_tiles():
  t = tiling.Tiling(height=6, width=4, size=4, stride=2)  # rows 0-3 and 2-5 overlap on 2-3
  out = t.stitch(np.stack([np.full((4, 4), 1.0), np.full((4, 4), 3.0)]))
  np.testing.assert_array_equal(out[:, 0], [1, 1, 2, 2, 3, 3])


def test_boxes_shift_to_scene_coordinates_and_clip():
  boxes = np.array([[1, 2, 5, 6]], np.float32)
  np.testing.assert_array_equal(tiling.shift_boxes(boxes, (10, 20)), [[21, 12, 25, 16]])
  np.testing.assert_array_equal(tiling.clip_boxes(np.array([[-3, 2, 50, 70]], np.float32),
                                                  60, 40), [[0, 2, 40, 60]])


def test_box_iou_and_nms_by_hand():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 5]],
                   np.float32)
  iou = tiling.box_iou(boxes, boxes)
  assert iou[0, 1] == pytest.approx(81 / 119) and iou[0, 2] == 0 and iou[0, 3] == 0.5
  scores = np.array([0.9, 0.8, 0.7, 0.95])
  # box 3 (0.95) keeps box 0 (IoU 0.5 is not above 0.5), box 0 suppresses box 1
  np.testing.assert_array_equal(tiling.nms(boxes, scores, 0.5), [3, 0, 2])
  np.testing.assert_array_equal(tiling.nms(boxes, scores, 0.4), [3, 1, 2])
  np.testing.assert_array_equal(tiling.nms(boxes, scores, 0.9), [3, 0, 1, 2])
  # per label: boxes 0 and 1 no longer compete
  labels = np.array([0, 1, 0, 0])
  np.testing.assert_array_equal(tiling.batched_nms(boxes, scores, labels, 0.5), [3, 0, 1, 2])
  assert tiling.batched_nms(boxes[:0], scores[:0], labels[:0], 0.5).size == 0


# ----- detection: head targets and decoding -----------------------------------------------------
def _ideal_output(gt, origin, grid, patch, k):
  """The head output that decodes to exactly the assigned boxes of a tile."""
  cls, box, _ = detection.targets(gt, origin, grid, patch, k)
  offset = np.clip(box[..., :2], 1e-6, 1 - 1e-6)
  return np.concatenate([np.where(cls > 0, 10.0, -10.0), np.log(offset / (1 - offset)),
                         box[..., 2:]], axis=-1)


def test_targets_decode_and_stitch_recover_scene_boxes():
  # five boxes, centres at least 2 cells apart, in a 100 x 90 scene cut into 32 px tiles
  gt = detection.Boxes(np.array([[3, 4, 9, 7], [40, 10, 52, 30], [70, 60, 74, 62],
                                 [10, 75, 30, 99], [60, 25, 63, 31]], np.float32),
                       np.array([0, 1, 0, 2, 1]), np.ones(5, np.float32))
  t = tiling.Tiling.of((100, 90), 32)
  tile_boxes = [detection.decode(_ideal_output(gt, o, 4, 8, 3), o, 8) for o in t.origins]
  assert sum(len(b.labels) for b in tile_boxes) > 5  # boxes seen by several tiles ...
  out = detection.image_detections(tile_boxes, 100, 90)  # ... are merged by NMS
  order = np.argsort(out.boxes[:, 0])
  np.testing.assert_allclose(out.boxes[order], gt.boxes[np.argsort(gt.boxes[:, 0])],
                             atol=1e-3)
  np.testing.assert_array_equal(out.labels[order], gt.labels[np.argsort(gt.boxes[:, 0])])


def test_larger_box_wins_a_shared_cell():
  gt = detection.Boxes(np.array([[1, 1, 3, 3], [0, 0, 6, 6]], np.float32), np.array([0, 1]),
                       np.ones(2, np.float32))
  cls, box, assigned = detection.targets(gt, (0, 0), 4, 8, 2)
  assert assigned.sum() == 1 and cls[0, 0].tolist() == [1, 1]
  np.testing.assert_allclose(box[0, 0], [3 / 8, 3 / 8, np.log(6 / 8), np.log(6 / 8)])


# ----- COCO mAP ---------------------------------------------------------------------------------
def _boxes(boxes, labels, scores=None):
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  return detection.Boxes(boxes, np.asarray(labels, np.int64),
                         np.ones(len(boxes), np.float32) if scores is None
                         else np.asarray(scores, np.float32))


def _map(gt, dets, k):
  matches, _, recall_thresholds = detection.coco_matches(gt, dets, k)
  return detection.mean_ap(detection.average_precision(matches, np.ones(len(gt)),
                                                       recall_thresholds))


def test_identical_predictions_have_map_one():
  gt = [_boxes([[0, 0, 10, 10], [20, 20, 24, 28]], [0, 1]), _boxes([], []),
        _boxes([[5, 5, 15, 9]], [1])]
  dets = [g._replace(scores=np.linspace(0.9, 0.5, len(g.labels))) for g in gt]
  assert _map(gt, dets, 2) == (1.0, 1.0)
  assert _map(gt, [_boxes([], [])] * 3, 2) == (0.0, 0.0)


def test_half_matched_map_by_hand():
  gt = [_boxes([[0, 0, 10, 10], [30, 30, 40, 40]], [0, 0])]
  exact, wrong = [0, 0, 10, 10], [60, 60, 70, 70]
  # one of two boxes found, ranked first: precision 1 up to recall 0.5 (51 of 101 points)
  assert _map(gt, [_boxes([exact, wrong], [0, 0], [0.9, 0.8])], 1) == pytest.approx(
      (51 / 101, 51 / 101))
  # ranked after a false positive: precision 1/2 up to recall 0.5
  assert _map(gt, [_boxes([exact, wrong], [0, 0], [0.8, 0.9])], 1) == pytest.approx(
      (0.5 * 51 / 101, 0.5 * 51 / 101))
  # IoU 0.6: a match at thresholds 0.5, 0.55 and 0.6 only (3 of 10)
  shifted = [_boxes([[0, 0, 10, 16]], [0], [0.9])]
  assert _map([_boxes([[0, 0, 10, 10]], [0])], shifted, 1) == pytest.approx((1.0, 0.3))
  # a category without ground truth does not count; a missed one counts as 0
  assert _map(gt + [_boxes([], [])], [_boxes([exact], [0]), _boxes([exact], [1])], 3) == (
      pytest.approx((51 / 101, 51 / 101)))
  assert _map([_boxes([exact], [0]), _boxes([exact], [1])], [_boxes([exact], [0])] * 2, 2) == (
      pytest.approx((0.5, 0.5)))


def _random_case(seed, images=8, k=2):
  rng = np.random.default_rng(seed)
  gt, dets = [], []
  for _ in range(images):
    n = rng.integers(0, 5)
    xy = rng.uniform(0, 50, (n, 2))
    g = np.concatenate([xy, xy + rng.uniform(3, 15, (n, 2))], 1)
    m = rng.integers(0, 6)
    fp = rng.uniform(0, 50, (m, 2))
    d = np.concatenate([g + rng.normal(0, 1.5, g.shape),
                        np.concatenate([fp, fp + rng.uniform(3, 15, (m, 2))], 1)])
    gt.append(_boxes(g, rng.integers(0, k, n)))
    dets.append(_boxes(d, rng.integers(0, k, n + m), rng.uniform(0, 1, n + m)))
  return gt, dets


def test_accumulated_precision_equals_pycocotools():
  gt, dets = _random_case(0)
  matches, _, recall_thresholds = detection.coco_matches(gt, dets, 2)
  images = [{"id": i + 1} for i in range(len(gt))]
  categories = [{"id": 1, "name": "0"}, {"id": 2, "name": "1"}]
  reference = COCOeval(detection._coco(images, categories, gt, False),
                       detection._coco(images, categories, dets, True), "bbox")
  reference.params.areaRng, reference.params.maxDets = [[0, 1e10]], [100]
  reference.evaluate()
  reference.accumulate()
  for k, m in enumerate(matches):
    np.testing.assert_allclose(detection.precision(m, np.ones(len(gt)), recall_thresholds),
                               reference.eval["precision"][:, :, k, 0, 0])


def test_bootstrap_weights_equal_duplicated_images():
  gt, dets = _random_case(1)
  rows = np.array([0, 0, 3, 5, 5, 5, 6, 7])
  matches, _, recall_thresholds = detection.coco_matches(gt, dets, 2)
  weights = np.bincount(rows, minlength=len(gt)).astype(float)
  weighted = detection.average_precision(matches, weights, recall_thresholds)
  duplicated = _map([gt[i] for i in rows], [dets[i] for i in rows], 2)
  assert detection.mean_ap(weighted) == pytest.approx(duplicated)


# ----- segmentation metrics and loss ------------------------------------------------------------
def test_miou_and_pixel_accuracy_by_hand():
  target = np.array([[0, 0, 1, 255], [2, 2, 1, 255]], np.uint8)
  pred = np.array([[0, 1, 1, 0], [2, 0, 0, 2]])
  conf = segmentation.confusion(pred, target, 4)
  assert conf.sum() == 6 and conf[0, 0] == 1 and conf[0, 1] == 1 and conf[1, 0] == 1
  iou = segmentation.class_iou(conf)
  # class 0: 1 hit / (2 true + 3 predicted - 1); class 1: 1 / (2 + 2 - 1); class 2: 1 / 2
  np.testing.assert_allclose(iou[:3], [1 / 4, 1 / 3, 1 / 2])
  assert np.isnan(iou[3])  # absent from the ground truth: not in the mean
  assert segmentation.miou(conf) == pytest.approx((1 / 4 + 1 / 3 + 1 / 2) / 3)
  assert segmentation.pixel_accuracy(conf) == pytest.approx(3 / 6)
  cells = segmentation.cell_confusions(pred, target, 3, 4)
  assert cells.shape == (2, 4, 4)  # columns 0-2 and 3
  np.testing.assert_array_equal(cells.sum(0), conf)


def test_segmentation_loss_ignores_unlabelled_pixels():
  params = heads.linear_params(0, 6, 3)
  x = np.random.default_rng(0).normal(size=(2, 2, 2, 6)).astype(np.float32)
  labels = np.random.default_rng(1).integers(0, 3, (2, 8, 8)).astype(np.uint8)
  labels[0, :4] = segmentation.IGNORE
  logp = jax.nn.log_softmax(segmentation.apply(params, x, patch=4))
  valid = labels != segmentation.IGNORE
  expected = -np.take_along_axis(np.asarray(logp), labels[..., None].astype(int) % 255,
                                 axis=-1)[..., 0][valid].mean()
  assert float(segmentation.loss_fn(params, x, labels, patch=4)) == pytest.approx(expected,
                                                                                   rel=1e-5)
  assert float(segmentation.loss_fn(params, x, np.full_like(labels, 255), patch=4)) == 0.0


# ----- head training ------------------------------------------------------------------------------
def test_head_training_is_deterministic_and_learns():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(80, 4, 4, 8)).astype(np.float32)
  sign = rng.choice([-1.0, 1.0], 80)
  x[..., 0] = sign[:, None, None] * (1.0 + np.abs(x[..., 0]))  # channel 0 gives the class
  labels = np.broadcast_to((sign > 0)[:, None, None], (80, 8, 8)).astype(np.uint8)
  loss = lambda p, x, y: segmentation.loss_fn(p, x, y, patch=2)
  init = lambda seed: heads.linear_params(seed, 8, 2)
  a, loss_a = heads.fit(loss, init(0), (x, labels), epochs=40, seed=0)
  b, loss_b = heads.fit(loss, init(0), (x, labels), epochs=40, seed=0)
  c, _ = heads.fit(loss, init(1), (x, labels), epochs=40, seed=1)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert loss_a == loss_b
  assert not np.array_equal(a["kernel"], c["kernel"])
  assert loss_a < 0.2 * float(loss(init(0), x, labels))
  with pytest.raises(ValueError):
    heads.fit(loss, init(0), (x[:0], labels[:0]), epochs=1, seed=0)


# ----- end to end on the smoke checkpoint -------------------------------------------------------
def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _grid(parts):
  """Four arrays [s, s, ...] as one [2s, 2s, ...] (row-major)."""
  return np.concatenate([np.concatenate(parts[:2], 1), np.concatenate(parts[2:], 1)], 0)


def _mosaic(records, height=56, width=60):
  """A scene of four chips (2 x 2) cropped to height x width: image, land cover, and the boxes
  whose centre stays inside (clipped)."""
  s = schema.decode_image(records[0]).shape[0]
  image = _grid([schema.decode_image(r) for r in records])[:height, :width]
  landcover = _grid([schema.decode_landcover(r) for r in records])[:height, :width]
  boxes, categories = [], []
  for n, r in enumerate(records):
    b = np.asarray(r["instance_boxes"]).reshape(-1, 4) + s * np.array([n % 2, n // 2] * 2)
    centre = (b[:, :2] + b[:, 2:]) / 2
    inside = (centre[:, 0] < width) & (centre[:, 1] < height)
    boxes.append(tiling.clip_boxes(b[inside], height, width))
    categories += [c for c, keep in zip(r["instance_categories"], inside) if keep]
  return {"id": "mosaic-" + schema.text_of(records[0]["id"]),
          "image": schema.encode_image(image), "polarisations": records[0]["polarisations"],
          "db_offset": schema.DB_MIN, "db_scale": schema.DB_SCALE,
          "instance_boxes": np.concatenate(boxes).astype(np.float32),
          "instance_categories": categories, "landcover": _png(landcover)}


class _MosaicDatasets:
  """The smoke datasets with every four chips of a split made into one scene to be tiled."""

  def __init__(self, datasets):
    self.datasets = datasets

  def split(self, key, split, *, max_examples=None):
    s = self.datasets.split(key, split, max_examples=max_examples)
    return dataclasses.replace(s, records=[_mosaic(s.records[i:i + 4])
                                           for i in range(0, len(s) - 3, 4)])


def _check_metrics(metrics, names, num_images):
  for name in names:
    assert 0.0 <= metrics[f"{name}/ci_low"] <= metrics[name] <= metrics[f"{name}/ci_high"] <= 1
  assert metrics["num_images"] == num_images
  assert np.isfinite(metrics["head_loss"])


def _run(evaluator, tmp_path, name):
  art = artifacts_lib.Artifacts(str(tmp_path), name)
  metrics = dict(evaluator.run(art))
  return metrics, art


def test_tiled_features_of_a_scene(smoke_predictor, eval_datasets):
  split = _MosaicDatasets(eval_datasets).split("synthetic", "test")
  tiles = heads.tiled_features(smoke_predictor, split.subset([0]))
  assert [len(t) for t in tiles.tilings] == [6]  # rows [0, 24] x columns [0, 24, 28]
  image = tiles.images[0]
  assert image.shape[:2] == (56, 60)
  crop = image[24:56, 28:60]
  expected = smoke_predictor.encode_images(smoke_predictor.image(crop)[None]).patches
  np.testing.assert_allclose(tiles.patches[5:6], expected, rtol=1e-4, atol=1e-4)


def test_detection_end_to_end(smoke_predictor, eval_datasets, tmp_path):
  evaluator = detection.Evaluator(smoke_predictor, eval_datasets, data="synthetic",
                                  train_split="val", split="test", epochs=EPOCHS, seed=0)
  metrics, art = _run(evaluator, tmp_path, "detection")
  test = eval_datasets.split("synthetic", "test")
  _check_metrics(metrics, ("map50", "map"), len(test))
  assert metrics["map"] <= metrics["map50"]
  assert metrics["num_boxes"] == sum(len(r["instance_categories"]) for r in test.records)
  assert "AP per category" in art.markdown[0] and "| ship |" in art.markdown[0]
  assert os.path.exists(tmp_path / "detection_ground_truth_and_detections.png")
  # scenes: tiled, boxes stitched back, same metrics
  mosaic = _MosaicDatasets(eval_datasets)
  metrics, _ = _run(detection.Evaluator(smoke_predictor, mosaic, data="synthetic",
                                        train_split="val", split="test", epochs=EPOCHS,
                                        seed=0), tmp_path, "detection_scenes")
  scenes = mosaic.split("synthetic", "test")
  _check_metrics(metrics, ("map50", "map"), len(scenes))
  assert metrics["num_boxes"] == sum(len(r["instance_categories"]) for r in scenes.records)


def test_segmentation_end_to_end(smoke_predictor, eval_datasets, tmp_path):
  kwargs = dict(data="synthetic", train_split="val", split="test", epochs=EPOCHS, seed=0)
  metrics, art = _run(segmentation.Evaluator(smoke_predictor, eval_datasets, **kwargs),
                      tmp_path, "segmentation")
  test = eval_datasets.split("synthetic", "test")
  _check_metrics(metrics, ("miou", "pixel_accuracy"), len(test))
  masks = np.stack([schema.decode_landcover(r) for r in test.records])
  assert metrics["num_pixels"] == np.count_nonzero(masks != 255)
  # the probe beats always answering the most frequent class of the training split
  train = np.stack([schema.decode_landcover(r)
                    for r in eval_datasets.split("synthetic", "val").records])
  majority = np.bincount(train[train != 255]).argmax()
  assert metrics["pixel_accuracy"] > np.mean(masks[masks != 255] == majority)
  assert "IoU per class" in art.markdown[0]
  assert os.path.exists(tmp_path / "segmentation_image_ground_truth_and_prediction.png")
  again, _ = _run(segmentation.Evaluator(smoke_predictor, eval_datasets, **kwargs), tmp_path,
                  "segmentation_again")
  assert again == metrics  # fixed recipe and seed
  # scenes: tiled, logits stitched back
  mosaic = _MosaicDatasets(eval_datasets)
  metrics, _ = _run(segmentation.Evaluator(smoke_predictor, mosaic, **kwargs), tmp_path,
                    "segmentation_scenes")
  scenes = mosaic.split("synthetic", "test")
  _check_metrics(metrics, ("miou", "pixel_accuracy"), len(scenes))
  assert metrics["num_pixels"] == sum(
      np.count_nonzero(schema.decode_landcover(r) != 255) for r in scenes.records)


def test_bootstrap_leaves_out_resamples_where_the_statistic_is_undefined():
  """A mAP is undefined (NaN) on a resample that drew no image with ground truth: such
  resamples are left out of the interval instead of making it NaN."""
  from evals import stats  # pylint: disable=g-import-not-at-top
  has_gt = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
  value, low, high = stats.bootstrap_ci(
      has_gt, lambda x: float(x.mean()) if x.any() else float("nan"))
  assert value == pytest.approx(1 / 6) and 0.0 < low <= value <= high <= 1.0
  assert np.isnan(stats.bootstrap_ci(np.zeros(3), lambda x: float("nan"))[1])
