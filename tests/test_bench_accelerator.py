"""``scripts/bench_accelerator.py`` on 8 host devices: the batch is sharded over all of
them and the report records what it measured.

The host platform's device count is fixed when JAX starts, so the script runs in a fresh
interpreter with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, in its short
``--quick`` mode. Timings are not asserted (they depend on the machine); their
bookkeeping is.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_run_on_8_cpu_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=ROOT,
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_accelerator.py"), "--quick",
                        "--out-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["cpu-cpu.json", "cpu-cpu.md"]
    doc = json.load(open(tmp_path / "cpu-cpu.json"))
    prov = doc["provenance"]
    assert prov["device_count"] == 8 and prov["backend"] == "cpu" and prov["device_kind"] == "cpu"
    assert prov["command"].endswith(f"scripts/bench_accelerator.py --quick --out-dir {tmp_path}")
    assert prov["jax"] and len(prov["commit"].split()[0]) == 40
    speed = doc["speed"]
    assert speed["batch"] % 8 == 0
    assert [r["method"] for r in speed["rows"]] == ["DPM-Solver++(2M)", "DPM-Solver++(3M)",
                                                    "DPM-Solver-fast (singlestep 3)", "UniPC-bh2 (order 2)"]
    for row in speed["rows"]:
        assert row["shards"] == 8  # the result stays laid out over all devices
        s, lim = row["sample_ms"], row["limit_ms"]
        assert s["n"] == lim["n"] == 5 and s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
        assert math.isclose(row["ratio"], s["median"] / lim["median"], rel_tol=1e-9)
        assert math.isclose(row["samples_per_s"], speed["batch"] / s["median"] * 1e3, rel_tol=1e-9)
    rows = doc["batch_scaling"]["rows"]
    assert [r["batch"] for r in rows] == [64, 256, 1024]
    for row in rows:
        assert math.isclose(row["us_per_sample"] * row["samples_per_s"], 1e6, rel_tol=1e-9)
    md = open(tmp_path / "cpu-cpu.md").read()
    assert "8 x cpu" in md and "XLA_FLAGS=--xla_force_host_platform_device_count=8 " in md
    assert "python scripts/bench_accelerator.py --quick" in md
