r"""KLIP pretraining configs. Pick a variant after the colon; override any field on the line.

  # build the embedded corpus once (prints the dataset name), then train:
  python -m klip.data.prepare --dataset=synthetic --data_dir=data --num_chips=4000
  python -m klip.train --config=configs/pretrain.py:tiny --workdir=workdirs/tiny

  # small: the synthetic corpus mixed with MSTAR's training split (prepare MSTAR first):
  python -m klip.data.prepare --dataset=mstar --source=../shared/data/mstar/train --data_dir=data
  python -m klip.train --config=configs/pretrain.py:small --workdir=workdirs/small

  # smoke (< 1 min on 2 cores; what the tests run):
  python -m klip.data.prepare --dataset=synthetic --data_dir=data --num_chips=160 --image_size=32
  python -m klip.train --config=configs/pretrain.py:smoke --workdir=workdirs/smoke

  # continue an existing run to step N:
  python -m klip.train --config=configs/pretrain.py:tiny --workdir=workdirs/tiny \
      --config.total_steps=N

Variants: smoke, tiny (the demo), small (about an hour on 2 cores), base (ViT-B/16 at 224 px
with a BERT-base-sized text tower: BLIP-base scale), large (ViT-L/16).
"""

import ml_collections

VARIANTS = ("smoke", "tiny", "small", "base", "large")


def _model(image_size, patch, vit, text, vocab, max_len, embed_dim=256, channels=2,
           fusion_layers=None, decoder_depth=None):
  """Model fields. text.fusion_layers: the top blocks of the text tower, with cross-attention to
  the image tokens, that the matching path runs per (image, text) pair (default all; 0: no
  fusion path); decoder.depth: blocks of the causal decoder (default the text tower's depth;
  width, heads and MLP are the text tower's); decoder.context: what the decoder reads before a
  value, "clause" (its field's template prefix: the value must come from the image) or
  "caption" (the whole caption before it; klip/model/text.py); stem: "patch" (linear patch
  embedding) or "conv" (stride-2 convolutions down to the patch grid, klip/model/vit.py); pool:
  the image vector of the contrast and the probes, "cls" or "gap" (mean of the patch tokens);
  posemb: "learned" or "sincos2d" (fixed); match_cosine: the pair's contrastive cosine, scaled,
  added to the match logit (klip/model/two_tower.py); attention: "auto" (cuDNN's fused
  attention on NVIDIA GPUs in bfloat16/float16, else XLA's), "xla" or "cudnn"
  (klip/model/layers.py)."""
  width, depth, heads = vit
  t_width, t_depth, t_heads = text
  return ml_collections.ConfigDict(dict(
      image_size=image_size, patch_size=patch, channels=channels,
      vit=dict(width=width, depth=depth, heads=heads, mlp_dim=4 * width),
      text=dict(vocab_size=vocab, max_len=max_len, width=t_width, depth=t_depth, heads=t_heads,
                mlp_dim=4 * t_width, pad_id=0,
                fusion_layers=t_depth if fusion_layers is None else fusion_layers),
      decoder=dict(depth=t_depth if decoder_depth is None else decoder_depth, context="clause"),
      stem="patch", pool="gap", posemb="sincos2d", match_cosine=True, embed_dim=embed_dim,
      temperature_init=0.07, dtype="float32",
      scan_layers=False, remat_policy="none", attention="auto"))


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0

  # Data: a dataset prepared by `python -m klip.data.prepare` ("builder/config" under data_dir).
  # Augmentation (klip/data/pipeline.py Preprocess): gain_db calibration jitter, max_shift
  # bounds training crops of larger chips to that many pixels from the centre crop (-1:
  # anywhere; real chips are centred on their target, which a crop from anywhere cuts off),
  # flip_p mirrors image and position words top to bottom.
  c.data = dict(dataset="synthetic/n4000_s64_c2_seed0", data_dir="data", split="train",
                num_workers=0, num_threads=2, db_min=-30.0, db_max=10.0, gain_db=1.0,
                max_shift=8, flip_p=0.0)
  # Tokenizer: trained on the training split's captions unless `path` names one.
  c.tokenizer = dict(path="", max_sentences=200_000)  # vocabulary: model.text.vocab_size

  c.batch_size = 64       # global batch, across all processes and devices
  c.grad_accum_steps = 1  # micro-batches per step (batch_size must divide by it)
  c.total_steps = 400
  # The steps the learning-rate schedule and SCIO's stages span. 0: total_steps at the run's
  # start. Fixed when a run starts and recorded in its checkpoints: a resume with a larger
  # total_steps extends the run past the schedule's end at its final learning rate.
  c.schedule_steps = 0
  c.optim = dict(lr=2e-3, warmup_steps=50, end_lr_fraction=0.01, b1=0.9, b2=0.98, eps=1e-6,
                 weight_decay=0.05, clip_norm=1.0)
  # Objectives and their weights (0 turns one off). contrast_type: "softmax" or "sigmoid";
  # momentum distillation with a feature queue replaces either when enabled. clause_negatives:
  # matching also ranks each caption above itself with one observable value swapped
  # (klip/data/negatives.py), for SCIO's screening; it costs one more text pass.
  # clause_contrast_weight: contrast of each image with one of its observable clauses alone
  # ("the targets are classified as ...", the form of a zero-shot prompt; images whose drawn
  # clause reads the same are positives too), clause_max_len tokens long; clause_rivals: that
  # clause also ranked above itself with up to this many other values of its field, drawn
  # from the training captions (klip/data/negatives.py; 0: off), under the same weight.
  # reconstruct_mask_p / reconstruct_random_p: the shares of the decoder's input value tokens
  # replaced by [MASK] / a random piece. The method's 0.5 / 0.1 trains the decoder on inputs
  # that generation, which feeds back its own clean tokens, never shows it; 0 / 0 (teacher
  # forcing, BLIP's captioner) wrote fields right where 0.5 / 0.1 looped (bench/README.md).
  c.loss = dict(contrast_weight=1.0, match_weight=1.0, reconstruct_weight=1.0,
                reconstruct_mask_p=0.0, reconstruct_random_p=0.0,
                clause_contrast_weight=1.0, clause_max_len=48, clause_rivals=0,
                contrast_type="softmax", label_smoothing=0.1, clause_negatives=False,
                momentum=dict(enabled=False, decay=0.995, queue_size=4096, alpha=0.4))
  # SCIO (method.md §3-4): after the warm-up (full captions), every `every_steps` steps a
  # jitted rescoring pass over `slice_size` pairs of the table (a rotating slice; 0: all), in
  # chunks of `batch_size`, screens each caption's clauses (margins on the rise of cosine and
  # match probability, per field, calibrated on the pass's rows, assumed mostly clean, so that
  # about false_flag_rate of a field's clean pairs are flagged; never below margin_cosine /
  # margin_match, which a field with fewer than calibration_min_rows rows in the pass uses
  # alone: klip/scio/rescore.py), proofreads (drops the flagged clause, weight = weight_floor +
  # (1 - weight_floor) * match probability) and, from reconstruct_from_fraction of total_steps
  # on, with the leave-one-out screen, refills the flagged value span (at most max_span tokens;
  # with fill_candidates = N > 0 the field's N most frequent other values compete with the
  # fill, ranked by the decoder's log-likelihood of the caption: klip/data/values.py). A new
  # table takes effect at the next epoch boundary. initial_table: a JSON pair table to start
  # from instead of the clean one. screen: what the rises above are, "leave_one_out" (the
  # method: the caption without each clause against the whole) or "clause" (each observable
  # clause alone, `loss.clause_max_len` tokens as the clause contrast trains it, against the
  # same clause with each of its field's screen_candidates most frequent other values; the
  # flagged clause's best rival is its rewrite, no decoder fill: klip/scio/clauses.py).
  c.scio = dict(enabled=variant != "smoke", every_steps=50, slice_size=64, batch_size=64,
                warmup_fraction=1 / 3, reconstruct_from_fraction=2 / 3, false_flag_rate=0.02,
                calibration_min_rows=16, margin_cosine=0.01, margin_match=0.02,
                weight_floor=0.5, max_span=40, fill_candidates=0, initial_table="",
                screen="clause", screen_candidates=8)
  c.max_nonfinite_updates = 0  # skipped non-finite updates tolerated before the run stops

  # Sharding: mesh axis sizes (-1: all remaining devices) and logical-axis rules.
  c.mesh = dict(slice=1, data=-1, fsdp=1, tensor=1)
  c.sharding_rules = (
      ("batch", ("slice", "data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("vocab", "tensor"),
  )

  # keep: the newest steps; keep_period: steps divisible by it survive rotation, so an eval job
  # that falls behind still finds them (it records the others it could not reach as missed).
  c.checkpoint = dict(every_steps=100, keep=3, keep_period=200, async_save=True)
  c.init = dict(checkpoint="")  # a workdir or step dir to initialise from (partial restore)
  c.log_every = 10

  if variant == "smoke":
    c.data.dataset = "synthetic/n160_s32_c2_seed0"
    c.model = _model(32, 8, (32, 2, 2), (32, 2, 2), vocab=400, max_len=64, embed_dim=32)
    c.batch_size, c.total_steps = 8, 10
    c.optim.warmup_steps = 2
    c.checkpoint.every_steps = 5
    c.log_every = 1
  elif variant == "tiny":  # the demo: about 12 minutes on 2 cores (bench/README.md, Learning)
    c.model = _model(64, 8, (128, 4, 4), (128, 2, 4), vocab=2000, max_len=160, embed_dim=128,
                     fusion_layers=1)
    c.batch_size, c.total_steps = 64, 250
  elif variant == "small":  # about an hour on 2 cores; synthetic chips + MSTAR's train split
    c.data.dataset = "synthetic/n8000_s64_c2_seed0+mstar/depression17"
    c.model = _model(64, 8, (192, 4, 3), (192, 2, 3), vocab=3000, max_len=176, embed_dim=128,
                     fusion_layers=1)
    c.batch_size, c.total_steps = 64, 600
    c.optim.update(warmup_steps=60)
    c.checkpoint.update(every_steps=100, keep=10)
    c.log_every = 20
  else:  # base / large: pod scale
    vit = (768, 12, 12) if variant == "base" else (1024, 24, 16)
    c.data.dataset = "synthetic/n1000000_s224_c2_seed0"
    c.data.num_workers = 16
    # Matching runs the text tower's top 3 blocks per (image, text) pair on the shared lower
    # states, and the decoder has 2 blocks: the three objectives cost about 2.1x the contrastive
    # step's FLOPs (bench/b2_full.py), where BLIP's full-depth fusion and decoder cost 5x.
    c.model = _model(224, 16, vit, (768, 12, 12), vocab=32000, max_len=160, fusion_layers=3,
                     decoder_depth=2)
    # base unrolls its 12 layers (a scan copies each layer's saved activations into stacked
    # buffers) and lets attention "auto" pick cuDNN's fused kernel on GPUs: both faster on an
    # H200 (bench/README.md, GPU). large keeps the scan for its 24 layers' compile time.
    c.model.update(dtype="bfloat16", scan_layers=variant == "large",
                   remat_policy="dots_saveable")
    c.batch_size, c.total_steps = 2048, 200_000
    c.optim.update(lr=3e-4, warmup_steps=5000)
    c.checkpoint.update(every_steps=2000, keep_period=10_000)
    c.log_every = 100
    c.mesh.update(data=-1, fsdp=8 if variant == "large" else 1)
  c.lock()
  return c
