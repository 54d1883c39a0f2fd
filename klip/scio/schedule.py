"""SCIO in the trainer: the stage schedule, the active and pending tables, the epoch switch.

The input pipeline reads the *active* table. A pass rescores the newest table (pending if one
is waiting, else active) and leaves its result *pending* until the first batch that starts at
or after the next epoch boundary (stream position a multiple of the split size; a newer pending
table replaces a waiting one and keeps its boundary); then the trainer rebuilds its iterator at
the same position with the new table. A run starts from `scio.initial_table` (a JSON pair
table, e.g. the SCIO benchmark's planted errors) if set, else from the clean table. Active table, pending
table and the switch position are saved in the model's checkpoint step (`payload`), so a resumed
run makes the same switch at the same step.

No process reads the whole split: each reads the example ids of its share of the records (for
the initial table) and counts the values of its share (the value pool of the clause screen and
of reconstruct's candidates), and the processes exchange the results.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time

import jax
import numpy as np

from klip import inference as inference_lib
from klip import optim
from klip.data import values as values_lib
from klip.scio import clauses
from klip.scio import rescore
from klip.scio import table as table_lib


def read_id_hashes(source, processes: inference_lib.Processes) -> np.ndarray:
  """uint32 [N]: the id hash of every record of `source`, each process reading its share."""
  n = len(source)
  return processes.concat(table_lib.read_id_hashes(source, processes.share(n)), n)


def value_pool(source, processes: inference_lib.Processes) -> values_lib.ValuePool:
  """The value counts of every caption of `source`, each process counting its share."""
  local = values_lib.ValuePool.from_source(source, processes.share(len(source)))
  return values_lib.ValuePool.from_rows(
      itertools.chain.from_iterable(processes.gather_json(local.to_rows())))


def stage_at(step: int, schedule_steps: int, cfg) -> rescore.Stage:
  """The SCIO stage of `step`: warm-up, then proofread, then reconstruct (fractions of the
  run's schedule, `optim.schedule_steps`)."""
  if step < cfg.warmup_fraction * schedule_steps:
    return rescore.Stage.WARMUP
  if step < cfg.reconstruct_from_fraction * schedule_steps:
    return rescore.Stage.PROOFREAD
  return rescore.Stage.RECONSTRUCT


class Controller:
  """The trainer's SCIO state. Inert (no table, no pass) when `scio.enabled` is false."""

  def __init__(self, config, source, tokenizer, preprocess,
               saved: table_lib.Tables | None):
    """saved: the tables of the checkpoint step resumed from (`payload()` of the run being
    resumed) or None."""
    self._cfg = config.scio
    self._schedule_steps = optim.schedule_steps(config)
    self._max_len = config.model.text.max_len
    self._clause_len = config.loss.clause_max_len
    self._source = source
    self._tokenizer = tokenizer
    self._preprocess = dataclasses.replace(preprocess, train=False, table=None, swap=False,
                                           rivals=0, pool=None, clause_len=0)
    self.enabled = bool(self._cfg.enabled)
    if self.enabled:
      clauses.check_config(config)
    self.pass_seconds = 0.0
    self._pool = None  # values.ValuePool, counted at the first pass that needs it
    self.active = self.pending = None
    self.pending_from = 0
    if not self.enabled:
      return
    dataset = f"{config.data.dataset}:{config.data.split}"
    if saved is None and self._cfg.initial_table:
      with open(self._cfg.initial_table) as f:
        self.active = table_lib.PairTable.from_json(json.load(f))
      self.active.check(dataset, source)
      return
    if saved is None:
      self.active = table_lib.PairTable.initial(
          dataset, read_id_hashes(source, inference_lib.Processes()))
      return
    self.active, self.pending, self.pending_from = saved.active, saved.pending, saved.pending_from
    for table in (self.active, self.pending):
      if table is not None:
        table.check(dataset, source)

  def view(self) -> table_lib.TableView | None:
    return self.active.view() if self.enabled else None

  def payload(self) -> table_lib.Tables | None:
    """What the checkpoint saves: active and pending tables, and where the pending one
    starts."""
    if not self.enabled:
      return None
    return table_lib.Tables(self.active, self.pending, self.pending_from)

  def switch(self, examples_seen: int) -> bool:
    """Activates the pending table once the stream reaches its epoch boundary."""
    if self.pending is None or examples_seen < self.pending_from:
      return False
    self.active, self.pending = self.pending, None
    return True

  def due(self, step: int) -> bool:
    return (self.enabled and step % self._cfg.every_steps == 0
            and stage_at(step, self._schedule_steps, self._cfg) > rescore.Stage.WARMUP)

  def rescore(self, inference, state, step: int, examples_seen: int, wall_start: float,
              after_chunk=None) -> dict[str, float]:
    """Runs the pass of `step` on the newest table with the predictions of train state
    `state` (`inference.Inference` of the train state); returns its metrics (wall share: of
    the wall time since `wall_start`, this invocation's start). Every process calls it."""
    base = self.pending if self.pending is not None else self.active
    stage = stage_at(step, self._schedule_steps, self._cfg)
    # The train steps dispatched before the pass may still be running (dispatch is
    # asynchronous); their time is training's, not the pass's.
    jax.block_until_ready(state)
    start = time.time()
    needs_pool = self._cfg.screen == "clause" or (stage == rescore.Stage.RECONSTRUCT
                                                  and self._cfg.fill_candidates)
    if needs_pool and self._pool is None:
      self._pool = value_pool(self._source, inference.processes)
    scorer = rescore.ModelScorer(inference, state, max_span=self._cfg.max_span)
    table, result = rescore.run_pass(
        base, self._source, self._preprocess, self._tokenizer, scorer.score, scorer.fill,
        stage=stage, cfg=self._cfg, max_len=self._max_len, rank=scorer.rank, pool=self._pool,
        clause_len=self._clause_len, after_chunk=after_chunk, processes=scorer.processes)
    result = dataclasses.replace(result, seconds=time.time() - start)  # the pool counted in
    if self.pending is None:  # the next epoch boundary (or this one); a newer pending table
      self.pending_from = -(-examples_seen // len(table)) * len(table)  # keeps the old one's
    self.pending = table
    self.pass_seconds += result.seconds
    metrics = result.metrics()
    metrics.update({"scio/table_version": float(table.version),
                    "scio/wall_share": self.pass_seconds / max(time.time() - wall_start, 1e-9)})
    return metrics
