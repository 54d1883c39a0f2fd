"""bench/learning_tasks.py: which splits the learning benchmark's probes fit and score on."""

import pytest

from tests.conftest import smoke_config


def _tasks(data_dir, fit):
  from bench import learning_tasks  # pylint: disable=g-import-not-at-top
  from configs import eval as eval_configs  # pylint: disable=g-import-not-at-top
  from evals import data as data_lib  # pylint: disable=g-import-not-at-top
  run = smoke_config(data_dir)
  specs = eval_configs.get_config("smoke").datasets
  specs.synthetic.name = run.data.dataset
  datasets = data_lib.Datasets(specs, data_dir=data_dir, source_root="/nonexistent",
                               pretrain=run.data)
  out = learning_tasks.task_data(datasets, specs, run, data_dir, max_examples=0,
                                 ceiling=True, fit=fit)
  return {td.task.name: td for td in out if td.task.data == "synthetic"}


def test_probes_fit_on_val_or_on_the_pretraining_train_split(data_dir):
  held_out, train = _tasks(data_dir, "held_out"), _tasks(data_dir, "train")
  assert held_out.keys() == train.keys() and held_out
  for name, td in train.items():
    assert not td.skipped and not held_out[name].skipped, (name, td.skipped)
    assert held_out[name].fit.full.split == "val"
    assert td.fit.full.split == "train"  # the pretraining split, read past the held-out check
    assert td.test.full.split == held_out[name].test.full.split == "test"
    assert not set(td.fit.split.ids) & set(td.test.split.ids)
    assert len(td.fit.sets) > len(held_out[name].fit.sets)
    # the ceiling trains on the pretraining data's train split either way
    assert td.ceiling_train.split.ids == held_out[name].ceiling_train.split.ids
    assert td.ceiling_train.full.split == "train"


def test_an_unknown_fit_is_refused(data_dir):
  with pytest.raises(ValueError, match="fit must be one of"):
    _tasks(data_dir, "everything")
