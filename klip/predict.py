"""The named predictions of a KLIP model: one definition of each score and of generation.

The SCIO rescoring pass and the evaluators both call these. The functions of (model, arrays)
are pure and jittable (`klip.inference` jits and shards them); the image side (`embed_images`)
is computed once per image and its outputs are passed to the text-side functions. `fill_span`
and `caption` are host-side helpers (numpy in and out) around a `Generate`, the jitted
`continue_text` of a batch of images.

Generation never emits [PAD], [ENC], [DEC] or [MASK] (their log-probabilities are -inf).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klip.data import caption as caption_lib
from klip.data import text as text_lib
from klip.data.caption import DEC, ENC, MASK, PAD, SEP, TEMPLATE
from klip.model.two_tower import POSITIVE, Model

BANNED = (PAD, ENC, DEC, MASK)

# (prompt [B, L], prompt_len [B]) -> generated tokens [B, max_new]: `continue_text` of a fixed
# batch of images, up to [SEP] (host numpy in and out).
Generate = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Scores(NamedTuple):
  """The calibrated scores of image-text pairs, each [B] float32."""
  cosine: jax.Array  # zimg . ztxt
  match: jax.Array   # ITM probability of "match"


def embed_images(model: Model, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(zimg [B, E] unit float32, image tokens [B, 1 + N, W]) of images [B, H, W, C]."""
  image_tokens = model.encode_image(images)
  return model.image_embedding(image_tokens), image_tokens


def embed_texts(model: Model, tokens: jax.Array) -> jax.Array:
  """Unit float32 text embeddings [B, E] of [ENC]-first tokens [B, L]."""
  return model.embed_texts(tokens)


def patch_features(model: Model, images: jax.Array) -> jax.Array:
  """Patch tokens [B, N, W] (no CLS), row-major over the patch grid, for dense evaluators."""
  return model.encode_image(images)[:, 1:]


def match_prob(model: Model, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
  """ITM probability [B] float32 that `tokens` describe the image of `image_tokens`."""
  return _match_prob(model, image_tokens, model.text_states(tokens))


def _match_prob(model: Model, image_tokens: jax.Array, states, cosine=None) -> jax.Array:
  logits = model.match_logits_states(image_tokens, states, cosine)
  return jax.nn.softmax(logits, axis=-1)[:, POSITIVE]


def score(model: Model, zimg: jax.Array, image_tokens: jax.Array, tokens: jax.Array) -> Scores:
  """Cosine similarity and match probability of each (image, text) pair of a batch (the text
  tower's text-only blocks run once for both)."""
  states = model.text_states(tokens)
  cosine = jnp.sum(zimg * model.embed_text_states(states), axis=-1)
  return Scores(cosine=cosine, match=_match_prob(model, image_tokens, states, cosine))


def text_logprob(model: Model, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
  """Decoder log-likelihood [B] float32 of each text given its image: the sum over positions
  t >= 1 of log p(tokens[:, t] | tokens[:, :t]), PAD positions not counted. `tokens` [B, L]
  start with [DEC] (closed-set answers ranked by the decoder, as BLIP ranks VQA answers)."""
  logits = model.decode_logits(image_tokens, tokens)[:, :-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target = tokens[:, 1:]
  picked = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(target != PAD, picked, 0.0), axis=-1)


def _masked_logprobs(model: Model, states: jax.Array) -> jax.Array:
  """Next-token log-probabilities [B, V] float32 from decoder states [B, width]; BANNED -inf."""
  logits = model.token_logits(states).at[:, jnp.asarray(BANNED)].set(-jnp.inf)
  return jax.nn.log_softmax(logits, axis=-1)


def continue_text(model: Model, image_tokens: jax.Array, prompt: jax.Array,
                  prompt_len: jax.Array, *, max_new: int, stop: int = SEP,
                  beam_size: int = 1) -> jax.Array:
  """Continues each prompt with up to `max_new` tokens [B, max_new] int32.

  `prompt` [B, L] is the decoding buffer: prompt[:, 0] is [DEC], positions < prompt_len [B] are
  the prompt and later ones are free (a row also ends when the buffer is full). A row stops
  after emitting `stop` (included); later outputs are PAD.

  Beam search keeps `beam_size` hypotheses per row ranked by length-normalised log-probability
  (sum of token log-probs / tokens generated, `stop` counted); a finished hypothesis stays in the
  beam with its score unchanged, and the best-ranked hypothesis is returned. beam_size 1 is
  greedy decoding. The decoder runs once over the prompts (`Model.decode_prefill`), then one
  token per step on its key/value caches (`Model.decode_extend`), which follow each beam's
  parent; the loop ends once every hypothesis has finished.
  """
  if beam_size < 1 or max_new < 1:
    raise ValueError(f"beam_size and max_new must be >= 1, got {beam_size} and {max_new}")
  batch, width = prompt.shape
  k = beam_size
  vocab = model.text.embed.num_embeddings
  image_tokens = jnp.repeat(image_tokens, k, axis=0)
  prompt_len = prompt_len.astype(jnp.int32)
  pad_only = jnp.where(jnp.arange(vocab) == PAD, 0.0, -jnp.inf)
  buf = jnp.repeat(prompt.astype(jnp.int32), k, axis=0)  # [B * k, L]
  states, caches = model.decode_prefill(image_tokens, buf)
  last = jnp.repeat(jnp.clip(prompt_len - 1, 0, width - 1), k)
  logp = _masked_logprobs(model, jnp.take_along_axis(states, last[:, None, None], axis=1)[:, 0])
  graphdef, params = nnx.split(model)  # carried through the loop, merged at its trace level
  # the batch axis of a cache's arrays [(layers,) B * k, L, H, head_dim]
  reorder = lambda x, rows: jnp.take(x, rows, axis=x.ndim - 4)  # noqa: E731

  def finished(i, done):
    return done | (prompt_len + i >= width)[:, None]

  def cond(state):
    i, _, _, _, done, _, _, _, _ = state
    return (i < max_new) & ~jnp.all(finished(i, done))

  def body(state):
    i, buf, total, length, done, out, logp, caches, params = state
    pos = prompt_len + i
    active = ~finished(i, done)
    cand = total[..., None] + jnp.where(active[..., None], logp.reshape(batch, k, vocab),
                                        pad_only)
    cand_len = length + active
    ranked = cand / jnp.maximum(cand_len, 1)[..., None]
    _, flat = jax.lax.top_k(ranked.reshape(batch, k * vocab), k)
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    was_active = jnp.take_along_axis(active, parent, axis=1)
    total = jnp.take_along_axis(cand.reshape(batch, k * vocab), flat, axis=1)
    length = jnp.take_along_axis(cand_len, parent, axis=1)
    done = jnp.take_along_axis(done, parent, axis=1) | (was_active & (token == stop))
    out = jnp.take_along_axis(out, parent[..., None], axis=1)
    out = out.at[:, :, i].set(jnp.where(was_active, token, PAD))
    if k > 1:  # each hypothesis continues its parent's buffer and caches
      rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)
      buf = buf[rows]
      caches = jax.tree.map(lambda x: reorder(x, rows), caches)
    at = jnp.repeat(jnp.minimum(pos, width - 1), k)
    write = was_active.reshape(-1)[:, None] & (jnp.arange(width) == at[:, None])
    buf = jnp.where(write, token.reshape(-1)[:, None], buf)
    step_model = nnx.merge(graphdef, params)
    states, caches = step_model.decode_extend(buf, at, caches)
    logp = _masked_logprobs(step_model, states)
    return i + 1, buf, total, length, done, out, logp, caches, params

  state = (jnp.asarray(0, jnp.int32), buf,
           jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (batch, k)),
           jnp.zeros((batch, k), jnp.int32),
           jnp.zeros((batch, k), bool),
           jnp.full((batch, k, max_new), PAD, jnp.int32),
           logp, caches, params)
  _, _, total, length, _, out, _, _, _ = jax.lax.while_loop(cond, body, state)
  best = jnp.argmax(total / jnp.maximum(length, 1), axis=1)
  return jnp.take_along_axis(out, best[:, None, None], axis=1)[:, 0]


def check_vocab(model: Model, tokenizer) -> None:
  """Raises ValueError if the tokenizer has more pieces than the model's vocabulary."""
  if tokenizer.vocab_size > model.text.embed.num_embeddings:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary "
                     f"is {model.text.embed.num_embeddings}")


def _value(generated: np.ndarray) -> np.ndarray:
  """The generated tokens before the first [SEP] (or PAD)."""
  end = np.flatnonzero((generated == SEP) | (generated == PAD))
  return generated[:end[0]] if end.size else generated


def fill_span(generate: Generate, ids: np.ndarray, clause: np.ndarray,
              k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Re-generates the value span of clause k[b] of each caption row b.

  ids, clause [B, L] as from `tokenizer.encode_caption`; k [B] (-1: row unchanged). The
  decoder (`generate`, of the rows' images) continues [DEC] + the tokens before the span; the
  tokens from the span's end on (its [SEP] and the later clauses) are appended back and the row
  is re-padded or truncated to L. Returns (ids, clause) with the new span marked as clause
  k[b]. A row whose generated span is empty is returned unchanged. Raises ValueError if clause
  k[b] has no value span in row b (e.g. cut off by truncation). `generate` runs even when no
  row is to be filled: in a multi-process pass every process must call it.
  """
  ids, clause = np.asarray(ids, np.int32), np.asarray(clause, np.int32)
  k = np.asarray(k, np.int32)
  batch, length = ids.shape
  spans = {}
  prompt = np.full((batch, length), PAD, np.int32)
  prompt[:, 0] = DEC
  prompt_len = np.ones(batch, np.int32)
  for row in np.flatnonzero(k >= 0):
    positions = np.flatnonzero(clause[row] == k[row])
    if not positions.size or positions[-1] - positions[0] + 1 != positions.size:
      raise ValueError(f"row {row}: clause {k[row]} has no contiguous value span")
    start, end = int(positions[0]), int(positions[-1]) + 1
    spans[row] = (start, end)
    prompt[row, 1:start] = ids[row, 1:start]
    prompt_len[row] = start
  generated = generate(prompt, prompt_len)
  new_ids, new_clause = ids.copy(), clause.copy()
  for row, (start, end) in spans.items():
    value = _value(generated[row])
    if not value.size:
      continue
    row_ids = np.concatenate([ids[row, :start], value, ids[row, end:]])[:length]
    row_clause = np.concatenate([clause[row, :start], np.full(value.size, k[row], np.int32),
                                 clause[row, end:]])[:length]
    new_ids[row] = np.pad(row_ids, (0, length - row_ids.size), constant_values=PAD)
    new_clause[row] = np.pad(row_clause, (0, length - row_clause.size),
                             constant_values=TEMPLATE)
  return new_ids, new_clause


def prefix_tokens(tokenizer, family: str) -> list[list[int]]:
  """The template tokens before each value span of a `family` caption ([SEP] included after
  the first clause), taken from `tokenizer.encode_caption` itself."""
  names = caption_lib.FAMILIES[family]
  st = text_lib.compose(family, ["x"] * len(names))
  ids, clause = tokenizer.encode_caption(st, max_len=8 * len(st.caption) + 2 * len(names))
  prefixes, cursor = [], 1
  for i in range(len(names)):
    positions = np.flatnonzero(clause == i)
    prefixes.append(ids[cursor:positions[0]].tolist())
    cursor = int(positions[-1]) + 1
  return prefixes


def caption(generate: Generate, tokenizer, batch: int, width: int, family: str) -> list[str]:
  """Writes one `family` caption for each of the `batch` images of `generate`: each field's
  template prefix is forced and its value generated up to [SEP], clause by clause.

  Captions are joined as `text.compose` joins them. Decoding uses a buffer of `width` tokens
  (the model's max_len); values that no longer fit are empty.
  """
  names = caption_lib.FAMILIES[family]
  buf = np.full((batch, width), PAD, np.int32)
  buf[:, 0] = DEC
  used = np.ones(batch, np.int32)
  values = [[] for _ in range(batch)]
  for prefix in prefix_tokens(tokenizer, family):
    for row in range(batch):
      n = min(len(prefix), width - used[row])
      buf[row, used[row]:used[row] + n] = prefix[:n]
      used[row] += n
    generated = generate(buf, used)
    for row in range(batch):
      value = _value(generated[row])
      buf[row, used[row]:used[row] + value.size] = value
      used[row] += value.size
      values[row].append(tokenizer.decode(value).strip())
  return [caption_lib.SEPARATOR.join(caption_lib.PREFIXES[name] + value
                                  for name, value in zip(names, row_values))
          for row_values in values]
