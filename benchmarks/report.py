"""Output shared by the benchmark scripts: provenance header, medians with their spread.

Every report in ``benchmarks/results/`` begins with where it came from, so a figure can
be traced to the code and the command that produced it::

    Command: `python benchmarks/batch_scaling.py --repeats 15`
    Commit: 1a2b3c4... (with uncommitted changes) · jax 0.10.2 · backend cpu, 1 x cpu · Python 3.11.7

and every timed median is printed with the spread of its repeats (interquartile range).
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _measured_root() -> str:
    """The checkout whose ``dpmjax`` this process imported (another commit's, when
    ``PYTHONPATH`` points there), else this repository."""
    module = sys.modules.get("dpmjax")
    path = getattr(module, "__file__", None)
    return os.path.dirname(os.path.dirname(os.path.abspath(path))) if path else ROOT


def git_commit() -> str:
    """``git rev-parse HEAD`` of the checkout whose ``dpmjax`` was measured, with a note if
    its tree has uncommitted changes."""
    root = _measured_root()
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" (with uncommitted changes)" if dirty else "")


#: environment variables that change what a run measures, as they were when the script started
_ENV = {k: os.environ[k]
        for k in ("PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_X64", "CUDA_VISIBLE_DEVICES")
        if os.environ.get(k)}


def command(argv=None) -> str:
    """The command line that ran this script, as the user would type it from the repository root
    (with the JAX/XLA environment variables that were set)."""
    argv = list(sys.argv if argv is None else argv)
    script = os.path.relpath(os.path.abspath(argv[0]), ROOT) if argv and argv[0].endswith(".py") else argv[0]
    env = [f"{k}={shlex.quote(v)}" for k, v in _ENV.items()]
    return " ".join(env + [shlex.join(["python", script, *argv[1:]])])


def provenance(argv=None) -> dict:
    """Command, commit, JAX version and devices of this run, as a dict (for JSON reports)."""
    import jax

    devices = jax.devices()
    return {
        "command": command(argv),
        "commit": git_commit(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def header(prov: dict) -> list[str]:
    """The provenance lines that open a markdown report."""
    return [
        f"Command: `{prov['command']}`",
        "",
        f"Commit {prov['commit']} · jax {prov['jax']} · backend {prov['backend']}, {prov['device_count']} x "
        f"{prov['device_kind']} · Python {prov['python']}, {prov['cpu_count']} CPU cores"
        + (f" · load average {prov['load_average']} at start" if prov.get("load_average") is not None else ""),
        "",
    ]


def spread(values, scale: float = 1.0) -> dict:
    """Median, quartiles and range of ``values`` (times ``scale``)."""
    v = np.asarray(values, np.float64) * scale
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(v.min()), "max": float(v.max()),
            "n": int(v.size)}


def fmt(s: dict, digits: int = 2) -> str:
    """``median [q1-q3]`` of a :func:`spread`."""
    return f"{s['median']:.{digits}f} [{s['q1']:.{digits}f}-{s['q3']:.{digits}f}]"


def write_markdown(path, lines, *, prov: dict | None = None):
    """Write ``lines`` to the markdown report ``path``, after the provenance header when given.

    The title (a first line starting with ``#``) stays first.
    """
    lines = list(lines)
    if prov is not None:
        title = lines[:2] if lines and lines[0].startswith("#") else []
        lines = title + header(prov) + lines[len(title):]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
