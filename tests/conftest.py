"""Test setup: 8 fake CPU devices, a persistent compilation cache, shared session fixtures.

The corpus, tokenizer and a `smoke` training run are built once per test session and shared.
"""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The persistent compilation cache, also for the training and evaluation processes the tests
# start (jax reads these variables): a kill-and-resume test's second and third runs reuse the
# first one's compiled programs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.environ.get("KLIP_TEST_CACHE", os.path.join(_ROOT, ".cache", "jax")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

SMOKE_CHIPS, SMOKE_SIZE = 160, 32


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the groups
def pytest_collection_modifyitems(config, items):
  """For `make test`'s parallel run (pytest-xdist, --dist loadgroup): the tests that share a
  module-scoped fixture of their file go to one worker, which builds it once (an explicit
  xdist_group mark wins). On a worker the slow end-to-end tests come first, so that the long
  ones start early and the short ones fill the gaps at the end; without xdist the order is
  the files' own."""
  for item in items:
    if item.get_closest_marker("xdist_group"):
      continue
    defs = getattr(item, "_fixtureinfo", None)
    scopes = {d[-1].scope for d in defs.name2fixturedefs.values() if d} if defs else set()
    if scopes & {"module", "class", "package"}:
      item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    return
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # alike on every worker
  if config.getvalue("loadgroup"):
    # xdist 3.8 groups by a "@group" suffix of the node id, which it sets through
    # `item._nodeid`; pytest 9 keeps the id in `item._id`, so it is set here.
    from _pytest.nodeid import coerce_node_id  # pylint: disable=g-import-not-at-top
    for item in items:
      names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                      for m in item.iter_markers("xdist_group")})
      if names and "@" not in item.nodeid:
        item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")  # pylint: disable=protected-access


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The smoke corpus (synthetic, 160 chips of 32 px), built once."""
  from klip.data import prepare  # pylint: disable=g-import-not-at-top
  root = str(tmp_path_factory.mktemp("data"))
  prepare.prepare("synthetic", root, generator=prepare.make_generator("rules", root),
                  num_chips=SMOKE_CHIPS, image_size=SMOKE_SIZE, channels=2, seed=0, workers=2)
  return root


def _override(c, overrides):
  """Sets dotted keys of an unlocked ConfigDict, then locks it."""
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.lock()
  return c


def smoke_config(data_dir, **overrides):
  """The `smoke` config pointed at the session corpus, with dotted-key overrides."""
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  c = pretrain.get_config("smoke")
  c.unlock()
  c.data.data_dir = data_dir
  return _override(c, overrides)


@pytest.fixture(scope="session")
def smoke_run(data_dir, tmp_path_factory):
  """A finished `smoke` run (10 steps): (workdir, summary)."""
  from klip import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("smoke_run"))
  summary = train.train(smoke_config(data_dir), workdir)
  return workdir, summary


@pytest.fixture(scope="session")
def source(data_dir):
  """The smoke dataset's training split (a test module may define its own `source`)."""
  from klip.data import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  return dataset_lib.source(data_dir, smoke_config(data_dir).data.dataset, "train")


@pytest.fixture(scope="session")
def tok(source, tmp_path_factory):
  """A 400-piece tokenizer of `source`'s captions (a test module may define its own `tok`)."""
  from klip.data import schema  # pylint: disable=g-import-not-at-top
  from klip.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  captions = [schema.structured_text(source[i]).caption for i in range(len(source))]
  return tokenizer_lib.train(captions, str(tmp_path_factory.mktemp("tok") / "tokenizer.model"),
                             400)


SHARED_DATA = os.path.join(os.path.dirname(_ROOT), "shared", "data")


def eval_config(data_dir, **overrides):
  """The `smoke` eval config reading the session corpus and ../shared/data, with overrides."""
  from configs import eval as eval_lib  # pylint: disable=g-import-not-at-top
  c = eval_lib.get_config("smoke")
  c.unlock()
  c.data_dir = data_dir
  c.source_root = SHARED_DATA
  return _override(c, overrides)


@pytest.fixture(scope="session")
def smoke_predictor(smoke_run):
  """The Predictor of the smoke run's last checkpoint on all 8 fake devices."""
  from evals.predictor import Predictor  # pylint: disable=g-import-not-at-top
  from klip import sharding  # pylint: disable=g-import-not-at-top
  workdir, summary = smoke_run
  mesh = sharding.make_mesh(dict(slice=1, data=-1, fsdp=1, tensor=1))
  return Predictor.restore(workdir, summary["steps"], mesh=mesh, batch_size=16)


@pytest.fixture(scope="session")
def eval_datasets(smoke_predictor, data_dir):
  """Datasets of the smoke eval config (real archives are prepared on first use)."""
  from evals.data import Datasets  # pylint: disable=g-import-not-at-top
  c = eval_config(data_dir)
  return Datasets(c.datasets, data_dir=c.data_dir, source_root=c.source_root,
                  pretrain=smoke_predictor.config.data, max_examples=c.max_examples,
                  prepare_workers=2)


# The tests that prepare real archives of ../shared/data into the session corpus dir (on first
# use, a minute for MSTAR): in a parallel run one worker prepares each archive once.
real_archives = pytest.mark.xdist_group("real_archives")


def needs_shared_data(path=""):
  """Skips (with the reason printed) a test that reads ../shared/data when it is absent."""
  where = os.path.join(SHARED_DATA, path)
  return pytest.mark.skipif(not os.path.exists(where),
                            reason=f"real SAR data not found at {where}")
