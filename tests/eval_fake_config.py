"""The smoke eval config with one fake evaluator (tests/eval_fakes.py): for job tests that
run `python -m evals.run` in a subprocess and only care about the job's behaviour."""

from configs import eval as eval_lib


def get_config(arg=None):
  del arg
  c = eval_lib.get_config("smoke")
  c.unlock()
  c.evals = {"fake": {"type": "tests.eval_fakes"}}
  c.lock()
  return c
