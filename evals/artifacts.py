"""What an evaluator shows in the report besides its numbers: figures, tables and text.

Each evaluator gets its own `Artifacts`; figures are written as PNG files next to the report
(DIR/eval/step_N/, local or gs://) and every item becomes Markdown in the evaluator's section, in
order. In a multi-process eval job only process 0 writes files (`write`); the others keep the
Markdown.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import matplotlib
from etils import epath

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


class Artifacts:

  def __init__(self, directory: str, name: str, *, write: bool = True):
    self.directory = directory
    self.name = name
    self.write = write
    self.markdown: list[str] = []
    if write:
      epath.Path(directory).mkdir(parents=True, exist_ok=True)

  def figure(self, title: str, fig: plt.Figure) -> str:
    """Saves a matplotlib figure (and closes it); returns its path."""
    slug = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
    filename = f"{self.name}_{slug}.png"
    path = epath.Path(self.directory) / filename
    if self.write:
      with path.open("wb") as f:  # one object write on GCS
        fig.savefig(f, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    self.markdown.append(f"**{title}**\n\n![{title}]({filename})")
    return str(path)

  def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    def cell(v):
      return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")
    lines = [f"**{title}**", "", "| " + " | ".join(map(str, header)) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    self.markdown.append("\n".join(lines))

  def text(self, markdown: str) -> None:
    self.markdown.append(markdown)
