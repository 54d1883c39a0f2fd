"""The learning benchmark's model references (bench/learning.py): the run's model at its
random initialisation, and the supervised ceiling trained from it on the tasks' labels."""

from __future__ import annotations

import copy
import dataclasses
import resource
import time

from bench import common  # noqa: F401  # before jax: the CPU platform unless JAX_PLATFORMS is set

import jax  # pylint: disable=g-import-not-at-top,wrong-import-order
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-order
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-order
import optax  # pylint: disable=g-import-not-at-top,wrong-import-order
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-order
from flax.core import spmd as core_spmd  # pylint: disable=g-import-not-at-top,wrong-import-order

from bench.learning_tasks import TaskData, accuracy, log  # pylint: disable=g-import-not-at-top
from evals.predictor import Predictor  # pylint: disable=g-import-not-at-top
from klip import optim  # pylint: disable=g-import-not-at-top
from klip import sharding  # pylint: disable=g-import-not-at-top
from klip import train_state  # pylint: disable=g-import-not-at-top
from klip.data import pipeline  # pylint: disable=g-import-not-at-top
from klip.data import schema  # pylint: disable=g-import-not-at-top

TIMING_STEPS = 3    # ceiling steps timed to plan its schedule


# ---------------------------------------------------------------------------------------------
# Models: the random initialisation and the supervised ceiling.
# ---------------------------------------------------------------------------------------------
def initial_model(run, mesh, rules):
  """The run's model as the trainer initialises it (klip.train_state.create), on the mesh."""
  graphdef, state, _ = train_state.create(run, mesh, rules)
  return nnx.merge(graphdef, state).model


def predictor_of(model, like: Predictor) -> Predictor:
  return Predictor(model=model, tokenizer=like.tokenizer, config=like.config, mesh=like.mesh,
                   rules=like.rules, step=0, batch_size=like.batch_size)


@dataclasses.dataclass
class CeilingResult:
  accuracy: dict            # task name -> test accuracy
  steps: int = 0
  planned_steps: int = 0
  seconds: float = 0.0
  compile_seconds: float = 0.0
  examples: int = 0
  sources: str = ""


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def _ceiling_config(run, steps: int):
  """The run's config with total_steps = steps and the warmup the same fraction of them."""
  config = copy.deepcopy(run)
  total = max(int(run.total_steps), 1)
  config.total_steps = steps
  config.optim.warmup_steps = int(round(run.optim.warmup_steps * steps / total))
  return config


def train_ceiling(run, mesh, rules, tasks: list[TaskData], budget_s: float,
                  like: Predictor) -> CeilingResult:
  """The supervised ceiling (module docstring): trains, then scores every task's test split."""
  active = [td for td in tasks if td.ceiling_train is not None]
  if not active:
    return CeilingResult({})
  # ----- the training pool: every ceiling-training chip once, with one target row per task
  by_id, records, targets = {}, [], {}
  classes = {td.task.name: sorted(frozenset().union(*td.ceiling_train.sets)) for td in active}
  for td in active:
    for record in td.ceiling_train.split.records:
      key = (td.ceiling_train.full.name, schema.text_of(record["id"]))
      if key not in by_id:
        by_id[key] = len(records)
        records.append(record)
  n = len(records)
  for td in active:
    c = classes[td.task.name]
    index = {v: i for i, v in enumerate(c)}
    t = np.zeros((n, len(c)), np.float32)
    for record, answers in zip(td.ceiling_train.split.records, td.ceiling_train.sets):
      row = by_id[(td.ceiling_train.full.name, schema.text_of(record["id"]))]
      for a in answers:
        t[row, index[a]] = 1.0 / len(answers)
    targets[td.task.name] = t
  images_db = [schema.decode_image(r) for r in records]
  d, m = run.data, run.model
  pre = pipeline.Preprocess(tokenizer_path=like.tokenizer.path, image_size=m.image_size,
                            channels=m.channels, max_len=m.text.max_len, db_min=d.db_min,
                            db_max=d.db_max, train=True, gain_db=d.gain_db,
                            max_shift=d.max_shift)  # no flip: it would move position labels
  shards = int(np.prod([mesh.shape[a] for a in ("slice", "data", "fsdp") if a in mesh.shape]))
  batch = max(shards, int(run.batch_size) // shards * shards)
  rng = np.random.default_rng(int(run.seed))

  def next_batch():
    rows = rng.integers(0, n, batch)
    x = np.stack([pre.image(images_db[i], rng) for i in rows])
    return x, {k: v[rows] for k, v in targets.items()}

  # ----- the model: the trainer's initial image tower and zero-initialised heads
  model = initial_model(run, mesh, rules)
  vit_graph, vit_params, vit_rest = nnx.split(model.image, nnx.Param, ...)
  width = int(m.vit.width)
  initial = {"vit": vit_params,
             "heads": {k: {"w": jnp.zeros((width, len(c)), jnp.float32),
                           "b": jnp.zeros((len(c),), jnp.float32)} for k, c in classes.items()}}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  initial["heads"] = jax.device_put(initial["heads"], replicated)

  def loss_fn(params, images, tgt):
    vit = nnx.merge(vit_graph, params["vit"], vit_rest)
    pooled = vit.pool(vit(images)).astype(jnp.float32)
    total = 0.0
    for k, t in tgt.items():
      head = params["heads"][k]
      logp = jax.nn.log_softmax(pooled @ head["w"] + head["b"])
      total = total + -jnp.sum(t * logp) / jnp.maximum(jnp.sum(t), 1.0)
    return total

  def build(steps: int):
    tx = optim.make(_ceiling_config(run, steps))

    def step(params, opt_state, images, tgt):
      loss, grads = jax.value_and_grad(loss_fn)(params, images, tgt)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    with jax.set_mesh(mesh), core_spmd.logical_axis_rules(rules):
      return tx, jax.jit(step)

  def put(x):
    return jax.device_put(x, sharding.batch_sharding(mesh, rules, x.ndim))

  def run_steps(fn, params, opt_state, count, deadline=None):
    done, loss = 0, float("nan")
    with jax.set_mesh(mesh), core_spmd.logical_axis_rules(rules):
      while done < count and (deadline is None or time.perf_counter() < deadline):
        x, tgt = next_batch()
        params, opt_state, loss = fn(params, opt_state, put(x),
                                     {k: put(v) for k, v in tgt.items()})
        loss.block_until_ready()  # each step finished before the clock is read again
        done += 1
      jax.block_until_ready(params)
    return params, opt_state, done, float(loss)

  # ----- plan the steps from a few timed ones on a provisional schedule, then train afresh
  # (two throwaway steps compile it: for the initial arrays' shardings and the outputs')
  t0 = time.perf_counter()
  tx, fn = build(int(run.total_steps))
  params, opt_state, _, _ = run_steps(fn, initial, tx.init(initial), 2)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  run_steps(fn, params, opt_state, TIMING_STEPS)
  step_s = (time.perf_counter() - t0) / TIMING_STEPS
  planned = max(1, int(budget_s / step_s))
  log(f"ceiling: {n} chips, batch {batch}, {step_s:.3f} s per step: {planned} steps planned "
      f"for {budget_s:.0f} s (compiled in {compile_s:.1f} s)")
  t0 = time.perf_counter()
  tx, fn = build(planned)
  run_steps(fn, initial, tx.init(initial), 2)  # compiles the planned schedule's step
  compile_s += time.perf_counter() - t0
  start = time.perf_counter()
  params, opt_state, steps, loss, last_log = initial, tx.init(initial), 0, float("nan"), start
  deadline = start + budget_s
  while steps < planned and time.perf_counter() < deadline:
    chunk = max(1, min(planned - steps, 50))
    params, opt_state, done, loss = run_steps(fn, params, opt_state, chunk, deadline)
    steps += done
    if time.perf_counter() - last_log > 30 or steps >= planned:
      last_log = time.perf_counter()
      log(f"ceiling: step {steps}/{planned}, loss {loss:.4f}, "
          f"{last_log - start:.0f}/{budget_s:.0f} s, peak RSS {_peak_rss_gib():.1f} GiB")
  seconds = time.perf_counter() - start
  # ----- score: the trained tower's pooled features through the Predictor, then each head
  nnx.update(model.image, params["vit"])
  predictor = predictor_of(model, like)
  heads = jax.device_get(params["heads"])
  result = {}
  for td in active:
    pooled = td.test.pooled(predictor)
    head = heads[td.task.name]
    pred = np.argmax(pooled @ np.asarray(head["w"]) + np.asarray(head["b"]), axis=-1)
    result[td.task.name] = accuracy([classes[td.task.name][i] for i in pred], td.test.sets)
  sources = ", ".join(sorted({td.ceiling_source for td in active}))
  log("ceiling: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
  return CeilingResult(result, steps=steps, planned_steps=planned, seconds=seconds,
                       compile_seconds=compile_s, examples=n, sources=sources)
