"""Multi-process sampling: two processes joined by ``jax.distributed`` sample one batch
laid out over the devices of both, and the result is the one a single process gives.

Every process runs in a fresh interpreter on the CPU backend with 4 forced host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``); the two connect through a
coordinator on 127.0.0.1 (a free port) and their cross-process collectives go through
Gloo (``jax_cpu_collectives_implementation="gloo"``, JAX's default for CPU in recent
versions, set explicitly for the older ones). The mesh spans all 8 devices, so each
process owns half of the batch. The reference is one process with 8 forced devices
running the same program, and a plain unsharded run.

The script of ``scripts/bench_accelerator.py --distributed`` is run the same way, with
its coordinator flags.

Each process is bounded by a timeout and all of them are killed when one fails (a process
whose peer died would otherwise wait for it).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds, for each group of processes

#: No CPU collectives across processes in this jax: the worker's exit status for it.
NO_COLLECTIVES = 3
#: XLA's CPU client without cross-process collectives refuses a multi-process program with this.
NO_COLLECTIVES_MESSAGE = "aren't implemented on the CPU backend"

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax

    n_processes, process_id, coordinator = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if n_processes > 1:
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception as e:  # no such option: this jax has no CPU collectives across processes
            print(f"no CPU collectives: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(%(no_collectives)d)
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=n_processes,
                                   process_id=process_id, initialization_timeout=60)

    import numpy as np, jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import dpmjax

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    sharding = NamedSharding(mesh, P("batch"))
    schedule = dpmjax.VPLinear()
    gm = dpmjax.GaussianMixture.isotropic(jnp.array([[-2.0, 0.5], [1.5, -1.0]]), 0.4)
    model_fn = gm.model_fn(schedule)
    shape = (16, 2)  # 2 rows per device
    kw = dict(schedule=schedule, method=dpmjax.DPMSolverPP(order=2), grid=dpmjax.Grid(steps=8, skip_type="logSNR"))

    # the same noise in every process, from a fixed key; each process fills only its own devices
    full = np.asarray(jax.random.normal(jax.random.key(0), shape, jnp.float32))
    noise = jax.make_array_from_callback(shape, sharding, lambda index: full[index])
    x = dpmjax.sample(model_fn, gm, None, shape, noise=noise, sharding=sharding, **kw)
    # x_T drawn from a key directly in the global layout
    xk = dpmjax.sample(model_fn, gm, jax.random.key(1), shape, sharding=sharding, **kw)

    out = {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "mesh_devices": [d.id for d in mesh.devices.flat], "local_devices": [d.id for d in jax.local_devices()],
        "sharding_kept": x.sharding.is_equivalent_to(sharding, len(shape)) and
                         xk.sharding.is_equivalent_to(sharding, len(shape)),
        "fully_addressable": x.is_fully_addressable,
        "shards": [{"device": s.device.id, "start": s.index[0].start, "stop": s.index[0].stop,
                    "data": np.asarray(s.data).tolist()} for s in x.addressable_shards],
        "noise": full.tolist(),
        "gathered": np.asarray(multihost_utils.process_allgather(x, tiled=True)).tolist(),
        "gathered_key": np.asarray(multihost_utils.process_allgather(xk, tiled=True)).tolist(),
    }
    if n_processes == 1:  # the same batch without any sharding, on one device
        out["plain"] = np.asarray(dpmjax.sample(model_fn, gm, None, shape, noise=jnp.asarray(full), **kw)).tolist()
        out["plain_key"] = np.asarray(dpmjax.sample(model_fn, gm, jax.random.key(1), shape, **kw)).tolist()
    print("RESULT " + json.dumps(out), flush=True)
    """
) % {"no_collectives": NO_COLLECTIVES}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return env


def _run_together(commands, timeout=TIMEOUT):
    """Start ``(argv, env)`` processes at once; their ``(returncode, stdout, stderr)``.

    All are killed when one fails or the time runs out (then the test fails, naming it).
    Their output goes to files, so a chatty process never blocks on a full pipe.
    """
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]
    procs = [subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=err, text=True)
             for (argv, env), (out, err) in zip(commands, files)]
    deadline, killed = time.monotonic() + timeout, set()
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
                killed.add(i)
            p.wait()
    outputs = []
    for p, (out, err) in zip(procs, files):
        out.seek(0), err.seek(0)
        outputs.append((p.returncode, out.read(), err.read()))
        out.close(), err.close()
    for rc, _, err in outputs:
        if rc == NO_COLLECTIVES or NO_COLLECTIVES_MESSAGE in err:
            pytest.skip("this jax has no CPU collectives across processes: " + err.strip().splitlines()[-1])
    failed = [i for i, (rc, _, _) in enumerate(outputs) if rc != 0 and i not in killed]
    if failed:
        rc, out, err = outputs[failed[0]]
        raise AssertionError(f"process {failed[0]} exited with {rc}:\n{_tail(err)}\n{_tail(out)}")
    if killed:
        raise AssertionError(f"processes {sorted(killed)} did not finish in {timeout} s; stderr:\n"
                             + "\n---\n".join(_tail(err) for _, _, err in outputs))
    return outputs


def _tail(text: str, n: int = 3000) -> str:
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith("[Gloo]"))[-n:]


def _result(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_two_processes_sample_one_batch_as_one_process_does():
    address = f"127.0.0.1:{_free_port()}"
    outputs = _run_together(
        [([sys.executable, "-c", WORKER, "2", str(i), address], _env(4)) for i in range(2)]
        + [([sys.executable, "-c", WORKER, "1", "0", "-"], _env(8))])
    dist = [_result(out) for _, out, _ in outputs[:2]]
    single = _result(outputs[2][1])

    ref, ref_key = np.array(single["gathered"]), np.array(single["gathered_key"])
    assert ref.shape == (16, 2) and single["process_count"] == 1 and len(single["local_devices"]) == 8
    # the 8-device result is the unsharded one up to float32 rounding, and a real sample:
    # pulled from the noise to the mixture's modes, and another sample from the key
    np.testing.assert_allclose(ref, np.array(single["plain"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ref_key, np.array(single["plain_key"]), rtol=0, atol=1e-5)
    assert np.max(np.abs(ref - np.array(single["noise"]))) > 1.0
    assert np.max(np.abs(ref - ref_key)) > 1.0
    modes = np.array([[-2.0, 0.5], [1.5, -1.0]])
    assert np.median(np.min(np.linalg.norm(ref[:, None] - modes, axis=-1), axis=1)) < 1.0

    rows_of = {}
    for r in dist:
        p = r["process_index"]
        assert r["process_count"] == 2 and len(r["mesh_devices"]) == 8 and len(r["local_devices"]) == 4
        assert r["sharding_kept"] and not r["fully_addressable"]
        assert r["noise"] == single["noise"]  # the same noise in every process
        # (a) the gathered batch is the single process's, to float32 rounding
        np.testing.assert_allclose(np.array(r["gathered"]), ref, rtol=0, atol=1e-6, err_msg=f"process {p}")
        np.testing.assert_allclose(np.array(r["gathered_key"]), ref_key, rtol=0, atol=1e-6, err_msg=f"process {p}")
        # (b) the process holds only the rows of its own devices: 2 rows each, at the
        # device's place in the mesh, and the data there are those rows of the result
        expected = {d: (2 * pos, 2 * pos + 2) for pos, d in enumerate(r["mesh_devices"]) if d in r["local_devices"]}
        held = {s["device"]: (s["start"], s["stop"]) for s in r["shards"]}
        assert len(r["shards"]) == 4 and held == expected, (p, held, expected)
        for s in r["shards"]:
            np.testing.assert_array_equal(np.array(s["data"]), np.array(r["gathered"])[s["start"]:s["stop"]])
        rows_of[p] = sorted(i for a, b in held.values() for i in range(a, b))
    assert sorted(rows_of) == [0, 1]
    assert len(rows_of[0]) == len(rows_of[1]) == 8  # half of the batch each
    assert sorted(rows_of[0] + rows_of[1]) == list(range(16))  # disjoint halves covering the batch


@pytest.mark.slow
def test_bench_accelerator_distributed_on_two_processes(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    script = os.path.join(ROOT, "scripts", "bench_accelerator.py")
    argv = [sys.executable, script, "--quick", "--repeats", "1", "--width", "16", "--batch", "64",
            "--out-dir", str(tmp_path), "--distributed", "--coordinator", address, "--num-processes", "2"]
    outputs = _run_together([(argv + ["--process-id", str(i)], _env(4)) for i in range(2)])
    # process 0 reports; process 1 only takes part
    assert sorted(os.listdir(tmp_path)) == ["cpu-cpu.json", "cpu-cpu.md"]
    assert "written " in outputs[0][1] and "written " not in outputs[1][1]
    assert "# dpmjax on cpu (cpu x 8)" in outputs[0][1] and "(2 process(es))" in outputs[0][1]
    doc = json.load(open(tmp_path / "cpu-cpu.json"))
    prov = doc["provenance"]
    assert prov["device_count"] == 8 and prov["local_device_count"] == 4 and prov["process_count"] == 2
    assert prov["command"].endswith("--num-processes 2 --process-id 0")
    speed = doc["speed"]
    assert speed["batch"] == 64 and speed["width"] == 16
    assert [r["method"] for r in speed["rows"]] == ["DPM-Solver++(2M)", "DPM-Solver++(3M)",
                                                    "DPM-Solver-fast (singlestep 3)", "UniPC-bh2 (order 2)"]
    for row in speed["rows"]:
        assert row["shards"] == 8  # the result is laid out over the devices of both processes
        assert row["sample_ms"]["n"] == 1 and row["sample_ms"]["median"] > 0
        assert math.isclose(row["samples_per_s"], 64 / row["sample_ms"]["median"] * 1e3, rel_tol=1e-9)
        assert f"| {row['method']} |" in outputs[0][1]  # the table line is printed
    rows = doc["batch_scaling"]["rows"]
    assert [r["batch"] for r in rows] == [64, 256, 1024]
    for row in rows:
        assert math.isclose(row["us_per_sample"] * row["samples_per_s"], 1e6, rel_tol=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--coordinator", "127.0.0.1:1"], "--coordinator need --distributed"),
    (["--distributed", "--num-processes", "0"], "--num-processes must be >= 1; got 0"),
    (["--distributed", "--num-processes", "2", "--process-id", "2"], "--process-id must be in 0..1; got 2"),
    (["--distributed", "--process-id", "-1"], "--process-id must be in 0..; got -1"),
])
def test_bench_accelerator_refuses_bad_cluster_flags(args, message, tmp_path):
    # refused by the argument parser, before JAX starts or anything is written
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_accelerator.py"), "--quick",
                        "--out-dir", str(tmp_path / "out"), *args], capture_output=True, text=True,
                       env=_env(1), timeout=TIMEOUT)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()
