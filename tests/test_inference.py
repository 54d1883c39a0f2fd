"""The prediction harness: sharded jits equal to the plain functions, rows in and out, the
exchanges between processes (one process here; tests/test_distributed.py runs two)."""

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import smoke_config
from klip import inference
from klip import predict
from klip import sharding
from klip import train_state
from klip.data.caption import DEC, SEP


@pytest.fixture(scope="module")
def config(data_dir):
  return smoke_config(data_dir)


def _harness(config, dims, devices):
  mesh = sharding.make_mesh(dict(slice=1, **dims), devices)
  graphdef, state, shardings = train_state.create(config, mesh, config.sharding_rules)
  harness = inference.Inference(graphdef, shardings, mesh, config.sharding_rules,
                                model_of=lambda merged: merged.model)
  return harness, nnx.merge(graphdef, state).model, state


def _inputs(config, n=16, variants=3):
  rng = np.random.default_rng(0)
  m = config.model
  images = rng.normal(size=(n, m.image_size, m.image_size, m.channels)).astype(np.float32)
  texts = rng.integers(5, 100, size=(n, variants, m.text.max_len)).astype(np.int32)
  texts[..., 0] = 1
  return images, texts


@pytest.mark.parametrize("dims", [dict(data=8, fsdp=1, tensor=1),
                                  dict(data=2, fsdp=2, tensor=2)])
def test_sharded_predictions_equal_the_plain_functions(config, dims):
  harness, model, state = _harness(config, dims, jax.devices())
  images, texts = _inputs(config)
  cosine, match = harness(inference.variant_scores, state, images, texts)
  want = inference.variant_scores(model, images, texts)
  assert cosine.shape == match.shape == (16, 3)
  np.testing.assert_allclose(cosine, want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(match, want[1], rtol=1e-5, atol=1e-5)
  got = harness(inference.features, state, images, all_rows=True)
  want = inference.features(model, images)
  assert len(got) == len(want) == 4  # embedding, pooled, patch tokens, CLS token
  for got, w in zip(got, want):
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)
  # one jit per (function, ranks, mode): a second call of the same shapes compiles nothing
  assert harness.jitted(inference.variant_scores, 4, 3) is \
      harness.jitted(inference.variant_scores, 4, 3)


def test_generation_through_the_harness_equals_eager_decoding(config):
  harness, model, state = _harness(config, dict(data=4, fsdp=1, tensor=1), jax.devices()[:4])
  images, _ = _inputs(config, n=8)
  tokens = harness(inference.image_tokens, state, images)
  prompt = np.zeros((8, config.model.text.max_len), np.int32)
  prompt[:, 0] = DEC
  prompt_len = np.ones(8, np.int32)
  got = harness.generator(state, tokens, max_new=4)(prompt, prompt_len)
  want = predict.continue_text(model, model.encode_image(images), prompt, prompt_len,
                               max_new=4, stop=SEP)
  np.testing.assert_array_equal(got, want)


def test_local_rows_reads_each_row_block_once_in_order():
  mesh = sharding.make_mesh(dict(slice=1, data=2, fsdp=2, tensor=2), jax.devices())
  rules = (("batch", ("slice", "data", "fsdp")),)
  x = np.arange(8 * 3).reshape(8, 3)
  put = jax.device_put(x, sharding.batch_sharding(mesh, rules, 2))
  assert len(put.addressable_shards) == 8  # each row block twice (the tensor axis)
  np.testing.assert_array_equal(inference._local_rows(put), x)  # pylint: disable=protected-access


def test_processes_of_one_process():
  p = inference.Processes()
  assert (p.index, p.count) == (0, 1)
  np.testing.assert_array_equal(p.gather(np.arange(3)), [[0, 1, 2]])
  assert p.gather_json({"rows": [1, 2], "value": "a large aircraft"}) == [
      {"rows": [1, 2], "value": "a large aircraft"}]
  assert p.any(True) and not p.any(False)
  assert p.local_rows(8) == slice(0, 8) and p.local_batch(8) == 8
