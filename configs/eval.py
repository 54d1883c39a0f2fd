r"""KLIP evaluation configs: which downstream tasks run on which data. The model, its tokenizer
and data normalisation come from the training workdir.

  # evaluate every finished checkpoint of a run as it appears (runs beside training):
  python -m evals.run --config=configs/eval.py:tiny --workdir=workdirs/tiny
  # one pass over what is there now, or one step:
  python -m evals.run --config=configs/eval.py:tiny --workdir=workdirs/tiny --once
  python -m evals.run --config=configs/eval.py:tiny --workdir=workdirs/tiny --once --step=400
  # other real SAR data in the layout of ../shared/data (prepared on first use):
  python -m evals.run --config=configs/eval.py:tiny --workdir=workdirs/tiny --once \
      --config.source_root=/data/my_sar --config.data_dir=/data/my_sar_prepared

Variants: smoke (the tests; small subsets), tiny, small (match the pretraining variants: the
synthetic evaluation data is the held-out test split of the same corpus).

Each `evals.<name>` runs `evals.<type>.Evaluator(predictor, datasets, **kwargs)` where kwargs
are the entry's fields other than `type` (a dotted `type` names a module elsewhere). `data`
names a dataset in `datasets`; heads and probes are trained on `train_split` (never the
pretraining split: the job checks example ids) with a fixed recipe and seed, and scored on
`split`.

MSTAR SOC (`mstar_soc`, evals/soc.py): probe and k-NN fitted on the 17 deg collection
(`datasets.mstar`: all its splits, or val+test for `small`, which pretrains on its train split),
zero-shot, probe and k-NN scored on the whole 15 deg collection (`datasets.mstar15`, source
`mstar/test` under source_root, prepared with depression_deg=15); skipped when that folder is
absent. Another copy of the benchmark:
  python -m evals.run --config=configs/eval.py:tiny --workdir=workdirs/tiny --once \
      --only=mstar_soc --config.datasets.mstar.source=/data/my_mstar/17deg \
      --config.datasets.mstar15.source=/data/my_mstar/15deg
"""

import ml_collections

VARIANTS = ("smoke", "tiny", "small")
_CORPUS = {"smoke": "synthetic/n160_s32_c2_seed0", "tiny": "synthetic/n4000_s64_c2_seed0",
           "small": "synthetic/n8000_s64_c2_seed0"}


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.data_dir = "data"                # prepared datasets (archives under <builder>-<hash>/)
  c.source_root = "../shared/data"   # real archives, in the layout of ../shared/data
  c.batch_size = 64                  # examples per jitted prediction call
  c.max_examples = 0                 # cap on every split (0: all); smoke sets it
  c.poll_seconds = 60                # how often the watching job looks for new checkpoints
  c.mesh = dict(slice=1, data=-1, fsdp=1, tensor=1)  # the eval job's own mesh
  c.datasets = dict(
      synthetic=dict(name=_CORPUS[variant], source=""),
      mstar=dict(name="mstar/depression17", source="mstar/train"),
      # MSTAR's 15 deg collection (the SOC test set), prepared with the builder's options
      mstar15=dict(name="mstar/depression15", source="mstar/test",
                   options=dict(depression_deg=15.0)),
      opensarship=dict(name="opensarship/default", source="opensarship"),
      hrsid=dict(name="hrsid/default", source="hrsid_samples"),
      polsf=dict(name="polsf/default", source="polsf"),
  )
  classify = dict(prompts="ensemble")  # class names inside the clause templates
  probe = dict(train_split="train", split="test", l2=1e-3, epochs=200)  # L-BFGS: no seed
  knn = dict(train_split="train", split="test", k=10)
  c.evals = dict(
      # zero-shot classification (prompt ensembles), linear probe and k-NN on frozen features
      zeroshot_mstar=dict(type="zeroshot", data="mstar", split="test", label="subtype",
                          **classify),
      zeroshot_opensarship=dict(type="zeroshot", data="opensarship", split="test",
                                label="subtype", **classify),
      zeroshot_category=dict(type="zeroshot", data="synthetic", split="test", label="category",
                             **classify),
      probe_mstar=dict(type="linear_probe", data="mstar", label="subtype", **probe),
      probe_opensarship=dict(type="linear_probe", data="opensarship", label="subtype", **probe),
      probe_category=dict(type="linear_probe", data="synthetic", label="category",
                          **dict(probe, train_split="val")),
      knn_mstar=dict(type="knn", data="mstar", label="subtype", **knn),
      knn_opensarship=dict(type="knn", data="opensarship", label="subtype", **knn),
      knn_category=dict(type="knn", data="synthetic", label="category",
                        **dict(knn, train_split="val")),
      # MSTAR SOC: probe and k-NN fitted on the 17 deg collection, all three scored on the
      # whole 15 deg one (skipped when its source folder is absent)
      mstar_soc=dict(type="soc", train_data="mstar", train_split="all", data="mstar15",
                     split="all", label="subtype", l2=probe["l2"], epochs=probe["epochs"],
                     k=knn["k"], **classify),
      # land-cover / scene classification
      zeroshot_scene=dict(type="zeroshot", data="synthetic", split="test",
                          label="region_function", **classify),
      probe_landcover=dict(type="linear_probe", data="synthetic", label="dominant_landcover",
                           **dict(probe, train_split="val")),
      # image-text retrieval both ways, ITM re-ranking of the top rerank_k
      retrieval=dict(type="retrieval", data="synthetic", split="test", rerank_k=16),
      captioning=dict(type="captioning", data="synthetic", split="test", beam_size=1,
                      max_span=40, max_examples=32),
      # closed-set answers ranked by the match head ("match") or decoder likelihood ("decoder")
      vqa=dict(type="vqa", data="synthetic", split="test", answers_split="val", scorer="match"),
      counting=dict(type="counting", data="synthetic", split="test", answers_split="val",
                    scorer="match"),
      detection_synthetic=dict(type="detection", data="synthetic", train_split="val",
                               split="test", epochs=60, seed=0),
      detection_hrsid=dict(type="detection", data="hrsid", train_split="train", split="test",
                           epochs=60, seed=0),
      segmentation_synthetic=dict(type="segmentation", data="synthetic", train_split="val",
                                  split="test", epochs=60, seed=0),
      segmentation_polsf=dict(type="segmentation", data="polsf", train_split="train",
                              split="test", epochs=60, seed=0),
  )
  if variant == "small":  # small pretrains on MSTAR's train split: probes learn on its val split
    c.evals.probe_mstar.train_split = c.evals.knn_mstar.train_split = "val"
    c.evals.mstar_soc.train_split = "val+test"  # the 17 deg chips the run did not see
  if variant == "smoke":
    c.max_examples = 48
    c.batch_size = 16
    c.poll_seconds = 5
  c.lock()
  return c
