"""What the SCIO tests share: the config, the preprocessing and pair table of the session's
smoke dataset (its corpus and tokenizer: the `source` and `tok` fixtures of conftest.py), and
a reader of a run's saved tables."""

from conftest import smoke_config
from klip import checkpoint as checkpoint_lib
from klip.data import pipeline
from klip.scio import table as table_lib

SCIO = dict(enabled=True, every_steps=4, slice_size=32, batch_size=16, warmup_fraction=0.2,
            reconstruct_from_fraction=0.5, false_flag_rate=0.02, calibration_min_rows=16,
            margin_cosine=0.0, margin_match=0.0, weight_floor=0.5, max_span=6,
            fill_candidates=0, initial_table="", screen="leave_one_out", screen_candidates=8)


def preprocess(tok, config, **kw):
  """The evaluation preprocessing of `config`'s model (what the rescoring pass reads)."""
  m = config.model
  return pipeline.Preprocess(tokenizer_path=tok.path, image_size=m.image_size,
                             channels=m.channels, max_len=m.text.max_len,
                             db_min=config.data.db_min, db_max=config.data.db_max,
                             train=False, **kw)


def initial_table(source, data_dir):
  """The clean pair table of the smoke dataset's training split."""
  return table_lib.PairTable.initial(smoke_config(data_dir).data.dataset + ":train",
                                     table_lib.read_id_hashes(source))


def saved_tables(workdir, step=None) -> dict:
  """The SCIO tables of a run's checkpoint step (default the latest) as one JSON-like dict, for
  comparing runs."""
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=3, async_save=False)
  tables = table_lib.Tables.from_parts(*ckpt.restore_table(step or ckpt.latest_step()))
  ckpt.close()
  return {"active": tables.active.to_json(), "pending_from": tables.pending_from,
          "pending": None if tables.pending is None else tables.pending.to_json()}
