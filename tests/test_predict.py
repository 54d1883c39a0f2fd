"""The named predict functions: scores, greedy and beam decoding, span filling, captioning."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from klip import inference
from klip import predict
from klip import sharding
from klip.data import caption as caption_lib
from klip.data import text as text_lib
from klip.data import tokenizer as tokenizer_lib
from klip.data.caption import DEC, PAD, SEP
from klip.model.two_tower import POSITIVE, Model

WORDS = ("three ships", "a large aircraft", "bright corner reflectors", "small", "vehicles",
         "clustered", "the north-east harbour", "open water", "coastal plain", "port",
         "a regular grid", "sharp", "dense low-rise", "a ring road", "a wide river")
MAX_LEN = 128
RULES = (("batch", ("slice", "data", "fsdp")),)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  rng = np.random.default_rng(0)
  captions = [text_lib.compose(family, rng.choice(WORDS, len(names))).caption
              for family, names in caption_lib.FAMILIES.items() for _ in range(100)]
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
  return tokenizer_lib.train(captions, path, 800)


@pytest.fixture(scope="module")
def model(tok):
  config = ml_collections.ConfigDict(dict(
      image_size=16, patch_size=8, channels=2,
      vit=dict(width=16, depth=1, heads=2, mlp_dim=32),
      text=dict(vocab_size=tok.vocab_size, max_len=MAX_LEN, width=16, depth=1, heads=2,
                mlp_dim=32, pad_id=PAD, fusion_layers=1),
      decoder=dict(depth=1, context="clause"), stem="patch", pool="cls", posemb="learned",
      match_cosine=False,
      attention="auto", embed_dim=8, temperature_init=0.07, dtype="float32",
      scan_layers=True, remat_policy="none"))
  return Model(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def images():
  return jax.random.normal(jax.random.key(0), (3, 16, 16, 2))


def captions(tok, n=3):
  rng = np.random.default_rng(1)
  rows = [tok.encode_caption(text_lib.compose("target", rng.choice(WORDS, 8)), MAX_LEN)
          for _ in range(n)]
  return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


@nnx.jit
def masked_logprobs(model, image_tokens, buf):
  """Log-probabilities [B, L, V] of the token after each position, BANNED at -inf."""
  logits = model.decode_logits(image_tokens, buf)
  return jax.nn.log_softmax(logits.at[..., jnp.asarray(predict.BANNED)].set(-jnp.inf), axis=-1)


def reference_greedy(model, image_tokens, prompt, prompt_len, max_new, stop):
  out = np.full((prompt.shape[0], max_new), PAD, np.int32)
  for row in range(prompt.shape[0]):
    buf, pos = np.array(prompt[row:row + 1]), int(prompt_len[row])
    for i in range(min(max_new, prompt.shape[1] - pos)):
      logp = masked_logprobs(model, image_tokens[row:row + 1], jnp.asarray(buf))
      token = int(np.argmax(logp[0, pos - 1]))
      out[row, i], buf[0, pos] = token, token
      pos += 1
      if token == stop:
        break
  return out


def reference_beam(model, image_tokens, prompt, prompt_len, max_new, stop, k):
  """Beam search as `continue_text` documents it, the decoder recomputed over each buffer."""
  out = np.full((prompt.shape[0], max_new), PAD, np.int32)
  for row in range(prompt.shape[0]):
    start, width = int(prompt_len[row]), prompt.shape[1]
    beams = [([], 0.0, False)]  # (tokens, summed log-prob, finished)
    for i in range(min(max_new, width - start)):
      cands = []
      for tokens, total, done in beams:
        if done:
          cands.append((tokens + [PAD], total, True))
          continue
        buf = np.array(prompt[row:row + 1])
        buf[0, start:start + len(tokens)] = tokens
        logp = np.asarray(masked_logprobs(model, image_tokens[row:row + 1],
                                          jnp.asarray(buf)))[0, start + i - 1]
        cands += [(tokens + [t], total + logp[t], t == stop) for t in np.argsort(-logp)[:k]]
      length = lambda c: sum(t != PAD for t in c[0])  # noqa: E731
      beams = sorted(cands, key=lambda c: -c[1] / length(c))[:k]
      if all(done for _, _, done in beams):
        break
    best = beams[0][0]
    out[row, :len(best)] = best
  return out


def sequence_score(model, image_tokens, prompt, prompt_len, generated):
  """Length-normalised log-prob of each row's generated tokens (up to PAD), teacher-forced."""
  buf = np.array(prompt)
  lengths = np.sum(np.cumprod(generated != PAD, axis=1), axis=1)
  for row in range(buf.shape[0]):
    start = int(prompt_len[row])
    buf[row, start:start + lengths[row]] = generated[row, :lengths[row]]
  logp = np.asarray(masked_logprobs(model, image_tokens, jnp.asarray(buf)))
  return np.asarray([sum(logp[row, int(prompt_len[row]) + i - 1, generated[row, i]]
                         for i in range(lengths[row])) / lengths[row]
                     for row in range(buf.shape[0])])


def single_device(model) -> inference.Inference:
  """The prediction harness of `model` on a one-device mesh."""
  mesh = sharding.make_mesh(dict(slice=1, data=1, fsdp=1, tensor=1), jax.devices()[:1])
  state = nnx.state(model)
  return inference.Inference(nnx.graphdef(model), jax.tree.map(lambda x: x.sharding, state),
                             mesh, RULES)


def eager_generate(model, image_tokens, *, max_new, beam_size=1) -> predict.Generate:
  return lambda prompt, prompt_len: np.asarray(predict.continue_text(
      model, image_tokens, jnp.asarray(prompt), jnp.asarray(prompt_len), max_new=max_new,
      beam_size=beam_size))


def prompts(width=12):
  prompt = np.zeros((3, width), np.int32)
  prompt[:, 0] = DEC
  prompt[:, 1:4] = [[10, 11, 12], [40, 41, 42], [70, 71, 72]]
  return jnp.asarray(prompt), jnp.asarray([4, 2, width - 2], jnp.int32)


def test_scores_embeddings_and_patch_features(model, images, tok):
  tokens, _ = captions(tok)
  zimg, image_tokens = nnx.jit(predict.embed_images)(model, images)
  assert zimg.shape == (3, 8) and image_tokens.shape == (3, 5, 16)
  np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(zimg, model.embed_images(images), atol=1e-6)
  patches = predict.patch_features(model, images)
  np.testing.assert_allclose(patches, image_tokens[:, 1:], atol=1e-6)
  scores = nnx.jit(predict.score)(model, zimg, image_tokens, jnp.asarray(tokens))
  ztxt = predict.embed_texts(model, jnp.asarray(tokens))
  np.testing.assert_allclose(scores.cosine, np.sum(zimg * ztxt, axis=-1), atol=1e-5)
  logits = model.match_logits(image_tokens, jnp.asarray(tokens))
  np.testing.assert_allclose(scores.match, jax.nn.softmax(logits)[:, POSITIVE], atol=1e-6)
  assert scores.cosine.shape == scores.match.shape == (3,)


def test_greedy_matches_stepwise_argmax(model, images):
  image_tokens = model.encode_image(images)
  prompt, prompt_len = prompts()
  got = predict.continue_text(model, image_tokens, prompt, prompt_len, max_new=5, beam_size=1)
  want = reference_greedy(model, image_tokens, prompt, prompt_len, 5, SEP)
  np.testing.assert_array_equal(got, want)
  assert np.all(np.asarray(got)[2, 2:] == PAD)  # row 2 reaches the end of its buffer
  jitted = single_device(model).generator(nnx.state(model), np.asarray(image_tokens),
                                         max_new=5)(np.asarray(prompt), np.asarray(prompt_len))
  np.testing.assert_array_equal(jitted, got)


def test_stop_token_is_included_then_pad(model, images):
  image_tokens = model.encode_image(images)
  prompt, prompt_len = prompts()
  free = np.asarray(predict.continue_text(model, image_tokens, prompt, prompt_len, max_new=6,
                                          stop=PAD))  # PAD is never generated: no stop
  assert np.all(free[:2] != PAD)
  stop = int(free[0, 2])
  first = int(np.flatnonzero(free[0] == stop)[0])
  got = np.asarray(predict.continue_text(model, image_tokens, prompt, prompt_len, max_new=6,
                                         stop=stop))
  np.testing.assert_array_equal(got[0, :first + 1], free[0, :first + 1])
  assert np.all(got[0, first + 1:] == PAD)
  np.testing.assert_array_equal(got, reference_greedy(model, image_tokens, prompt, prompt_len,
                                                      6, stop))


def test_beam_search_is_at_least_as_likely_as_greedy(model, images):
  image_tokens = model.encode_image(images)
  prompt, prompt_len = prompts(width=16)
  greedy = np.asarray(predict.continue_text(model, image_tokens, prompt, prompt_len, max_new=4,
                                            stop=PAD))
  greedy_score = sequence_score(model, image_tokens, prompt, prompt_len, greedy)
  beam = np.asarray(predict.continue_text(model, image_tokens, prompt, prompt_len, max_new=4,
                                          stop=PAD, beam_size=4))
  beam_score = sequence_score(model, image_tokens, prompt, prompt_len, beam)
  assert np.all(beam_score >= greedy_score - 1e-5), (beam_score, greedy_score)
  stopped = np.asarray(predict.continue_text(model, image_tokens, prompt, prompt_len,
                                             max_new=4, stop=int(greedy[0, 0]), beam_size=3))
  for row in stopped:  # every row ends with stop then PAD, or runs to max_new / buffer end
    hits = np.flatnonzero(row == greedy[0, 0])
    if hits.size:
      assert np.all(row[hits[0] + 1:] == PAD)


def test_beam_search_matches_a_recomputing_reference(model, images):
  """The cached decoder follows each beam's parent: the same hypotheses as recomputing it."""
  image_tokens = model.encode_image(images)
  prompt, prompt_len = prompts(width=16)
  free = np.asarray(predict.continue_text(model, image_tokens, prompt, prompt_len, max_new=5,
                                          stop=PAD))
  early = int(free[1, 1])  # a token some hypotheses emit early: beams finish at different steps
  # stop=PAD never stops: 8 steps of beams that swap parents (a cache left in the old beam
  # order fails this case)
  for k, stop, max_new in ((2, early, 5), (3, early, 5), (3, PAD, 8)):
    got = np.asarray(predict.continue_text(model, image_tokens, prompt, prompt_len,
                                           max_new=max_new, stop=stop, beam_size=k))
    np.testing.assert_array_equal(got, reference_beam(model, image_tokens, prompt, prompt_len,
                                                      max_new, stop, k))


def test_fill_span_keeps_everything_outside_the_span(model, images, tok):
  image_tokens = model.encode_image(images)
  ids, clause = captions(tok)
  k = np.asarray([2, -1, 7], np.int32)
  generate = eager_generate(model, image_tokens, max_new=3)
  new_ids, new_clause = predict.fill_span(generate, ids, clause, k)
  np.testing.assert_array_equal(new_ids[1], ids[1])
  np.testing.assert_array_equal(new_clause[1], clause[1])
  for row in (0, 2):
    old = np.flatnonzero(clause[row] == k[row])
    new = np.flatnonzero(new_clause[row] == k[row])
    assert new[0] == old[0] and 1 <= new.size <= 3
    np.testing.assert_array_equal(new, np.arange(new[0], new[0] + new.size))
    np.testing.assert_array_equal(new_ids[row, :old[0]], ids[row, :old[0]])
    tail = ids[row, old[-1] + 1:]
    shift = new.size - old.size
    np.testing.assert_array_equal(new_ids[row, new[-1] + 1:], np.concatenate(
        [tail, np.full(max(-shift, 0), PAD)])[:MAX_LEN - new[-1] - 1])
    assert np.all(new_ids[row, new] != SEP)
    assert np.sum(new_ids[row] == SEP) == np.sum(ids[row] == SEP) == 7
    other = (new_clause[row] >= 0) & (new_clause[row] != k[row])
    assert sorted(set(new_clause[row][other])) == [c for c in range(8) if c != k[row]]
  truncated_clause = np.where(clause == 7, -1, clause)
  with pytest.raises(ValueError, match="clause 7 has no contiguous value span"):
    predict.fill_span(generate, ids, truncated_clause, k)


@pytest.mark.parametrize("family", ["target", "landform"])
def test_caption_forces_every_prefix(model, images, tok, family):
  image_tokens = model.encode_image(images)
  names = caption_lib.FAMILIES[family]
  prefixes = predict.prefix_tokens(tok, family)
  assert len(prefixes) == 8 and prefixes[0][0] != SEP
  assert all(p[0] == SEP for p in prefixes[1:])
  assert [tok.decode(p) for p in prefixes] == [caption_lib.PREFIXES[n].strip() for n in names]
  out = predict.caption(eager_generate(model, image_tokens, max_new=2, beam_size=2), tok, 3,
                        MAX_LEN, family)
  assert len(out) == 3
  for text in out:
    clauses = text.split(caption_lib.SEPARATOR)
    assert len(clauses) == 8
    for name, clause in zip(names, clauses):
      assert clause.startswith(caption_lib.PREFIXES[name])


def test_text_logprob_sums_the_decoders_token_logprobs(model, images, tok):
  tokens, _ = captions(tok)
  tokens = np.array(tokens)
  tokens[:, 0] = DEC
  image_tokens = model.encode_image(images)
  got = np.asarray(predict.text_logprob(model, image_tokens, jnp.asarray(tokens)))
  logp = jax.nn.log_softmax(model.decode_logits(image_tokens, jnp.asarray(tokens)), axis=-1)
  want = [sum(float(logp[b, t - 1, tokens[b, t]]) for t in range(1, tokens.shape[1])
              if tokens[b, t] != PAD) for b in range(len(tokens))]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.all(got < 0)
