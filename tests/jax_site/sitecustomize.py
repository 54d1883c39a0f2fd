"""Imported at start by the Python processes the tests start (tests/conftest.py puts this folder
on their PYTHONPATH): lets every process of a multi-process CPU run write the persistent
compilation cache, not only process 0.

JAX writes cache entries from process 0 alone (jax/_src/compiler.py `_cache_write`, against
write contention on shared file systems), and its cache key holds the process's own view of the
device topology, so process 1 of the 2-process tests (tests/test_distributed.py) never finds an
entry and compiles every program afresh at each launch while process 0 waits for it at the
first barrier. The tests' cache is a local folder; with this, each process's entries are
written once and found by the later launches of the session. What is compiled and run is
unchanged.
"""

import importlib.abc
import importlib.machinery
import sys

_MODULE = "jax._src.compiler"


def _patch(compiler):
  write = compiler._cache_write  # pylint: disable=protected-access

  def cache_write(*args, **kwargs):
    state = compiler.distributed.global_state
    process_id = state.process_id
    if not process_id:
      return write(*args, **kwargs)
    state.process_id = 0  # read by `_cache_write` alone, on this thread
    try:
      return write(*args, **kwargs)
    finally:
      state.process_id = process_id

  compiler._cache_write = cache_write  # pylint: disable=protected-access


class _Finder(importlib.abc.MetaPathFinder):
  """Patches jax._src.compiler right after it is first imported."""

  def find_spec(self, name, path, target=None):
    if name != _MODULE:
      return None
    sys.meta_path.remove(self)
    spec = importlib.machinery.PathFinder.find_spec(name, path, target)
    if spec is None or spec.loader is None:
      return spec
    exec_module = spec.loader.exec_module

    def exec_and_patch(module):
      exec_module(module)
      _patch(module)

    spec.loader.exec_module = exec_and_patch
    return spec


if _MODULE not in sys.modules:
  sys.meta_path.insert(0, _Finder())
