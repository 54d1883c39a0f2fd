"""What the shipped pretraining configs promise about the data they train on."""

import numpy as np
import pytest

from configs import pretrain
from klip.data import caption as caption_lib
from klip.data import simulator
from klip.data import tokenizer as tokenizer_lib
from klip.hcot import generator


@pytest.fixture(scope="module")
def captions():
  gen = generator.Generator(generator.make_backend("rules"))
  return [gen.generate(c).text for c in simulator.simulate(range(120), seed=0, size=64,
                                                            num_channels=2, workers=1)]


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_max_len_holds_whole_captions(variant, captions, tmp_path):
  """A caption cut by max_len hides its last fields from every objective (they are never
  contrasted, matched or reconstructed): the shipped variants keep 99 % of captions whole,
  with the variant's own vocabulary trained on the corpus as the trainer does."""
  c = pretrain.get_config(variant)
  tok = tokenizer_lib.train([st.caption for st in captions], str(tmp_path / "tok.model"),
                            c.model.text.vocab_size)
  lengths = np.array([int(np.sum(tok.encode_caption(st, 1024)[0] != caption_lib.PAD))
                      for st in captions])
  cut = float(np.mean(lengths > c.model.text.max_len))
  assert cut <= 0.01, (f"{variant}: max_len {c.model.text.max_len} cuts {cut:.0%} of captions "
                       f"(longest {lengths.max()} tokens)")


def test_a_config_json_from_before_added_fields_reads_as_todays(tmp_path):
  """Runs recorded before fusion_layers, decoder (and its context), attention, stem, pool,
  posemb, match_cosine, fill_candidates, the SCIO screen and keep_period existed read with the
  values they ran with, so model and SCIO code read every field directly (a misspelt one fails
  where it is read)."""
  import json  # pylint: disable=g-import-not-at-top
  from klip import provenance  # pylint: disable=g-import-not-at-top
  today = json.loads(pretrain.get_config("smoke").to_json())
  old = json.loads(json.dumps(today))
  del old["model"]["text"]["fusion_layers"], old["model"]["decoder"]
  del old["model"]["attention"], old["model"]["stem"]
  del old["model"]["pool"], old["model"]["posemb"], old["model"]["match_cosine"]
  del old["scio"]["fill_candidates"], old["checkpoint"]["keep_period"]
  del old["scio"]["screen"], old["scio"]["screen_candidates"]
  del old["scio"]["false_flag_rate"], old["scio"]["calibration_min_rows"]
  del old["loss"]["reconstruct_mask_p"], old["loss"]["reconstruct_random_p"]
  (tmp_path / "config.json").write_text(json.dumps({"config": old, "history": []}))
  read = provenance.read_config(str(tmp_path))
  # what those runs did: absolute margins for every field, the method's decoder corruption
  assert read.scio.calibration_min_rows > 10**9 and read.scio.false_flag_rate == 0.02
  assert (read.loss.reconstruct_mask_p, read.loss.reconstruct_random_p) == (0.5, 0.1)
  assert read.model.text.fusion_layers == read.model.decoder.depth == old["model"]["text"]["depth"]
  assert (read.model.attention, read.model.stem) == ("auto", "patch")
  # the image vector, position embeddings and match logit those runs had
  assert (read.model.pool, read.model.posemb, read.model.match_cosine) == ("cls", "learned",
                                                                           False)
  assert read.scio.fill_candidates == 0 and read.checkpoint.keep_period == 0
  assert read.model.decoder.context == "caption"  # their decoder read the whole caption
  assert read.scio.screen == "leave_one_out"  # their SCIO screened the method's way
  ran_with = dict(today["model"], pool="cls", posemb="learned", match_cosine=False,
                  decoder=dict(today["model"]["decoder"], context="caption"))
  assert json.loads(read.model.to_json()) == ran_with  # smoke's model is the defaults'
  with pytest.raises(AttributeError):
    read.model.stme  # pylint: disable=pointless-statement
  with pytest.raises(FileNotFoundError, match="not a KLIP training workdir"):
    provenance.read_config(str(tmp_path / "nothing"))
