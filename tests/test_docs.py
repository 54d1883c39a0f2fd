"""docs/architecture.md names real files and real definitions in them."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "architecture.md")


def _references():
  """(path, name or None) for every backticked `path` or `path:name` of the page."""
  with open(DOC) as f:
    text = f.read()
  refs = re.findall(r"`((?:klip|evals|configs|launch|bench|tests)/[\w/.]*)(?::([\w.]+))?`", text)
  assert len(refs) > 30, refs
  return refs


def test_every_file_and_definition_the_architecture_page_names_exists():
  missing = []
  for path, name in _references():
    full = os.path.join(ROOT, path)
    if not os.path.exists(full):
      missing.append(path)
      continue
    if name:
      with open(full) as f:
        source = f.read()
      for part in name.split("."):  # Class.method: both defined in the file
        if not re.search(rf"^\s*(def|class) {re.escape(part)}\b|^{re.escape(part)} = ", source,
                         flags=re.M):
          missing.append(f"{path}:{name}")
  assert not missing, missing
