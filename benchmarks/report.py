"""Output shared by the benchmark scripts."""

from __future__ import annotations

import os


def write_markdown(path, lines):
    """Write ``lines`` to the markdown report ``path`` (one per line), creating its directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
