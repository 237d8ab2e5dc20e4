"""Batch sharding: ``sample`` keeps a ``NamedSharding`` over the batch axis and
gives the same numbers as the unsharded run.

The host platform's device count is fixed when JAX starts, so the check runs in a fresh
interpreter with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (8 CPU devices)
and reports its findings as one JSON line, which this test asserts on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import dpmjax

    out = {"n_devices": len(jax.devices())}
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    sh = NamedSharding(mesh, P("batch"))
    s = dpmjax.VPLinear()
    gm = dpmjax.GaussianMixture.isotropic(jnp.array([[-2.0, 0.5], [1.5, -1.0]]), 0.4)
    mf = gm.model_fn(s)
    shape = (16, 2)  # 2 rows per device
    kw = dict(schedule=s, order=2, steps=8, skip_type="logSNR")

    noise = jax.random.normal(jax.random.key(0), shape)
    ref = dpmjax.sample(mf, gm, None, shape, noise=noise, **kw)
    noise_sh = jax.device_put(noise, sh)
    x = dpmjax.sample(mf, gm, None, shape, noise=noise_sh, **kw)
    out["noise_sharding_equal"] = x.sharding.is_equivalent_to(sh, len(shape))
    out["noise_n_shards"] = len({d.id for d in x.sharding.device_set})
    out["noise_shard_rows"] = sorted({int(a.data.shape[0]) for a in x.addressable_shards})
    out["noise_max_diff"] = float(np.max(np.abs(np.asarray(x) - np.asarray(ref))))
    out["ref_size"] = float(np.max(np.abs(np.asarray(ref))))

    key = jax.random.key(1)
    ref_k = dpmjax.sample(mf, gm, key, shape, **kw)
    xk = dpmjax.sample(mf, gm, key, shape, sharding=sh, **kw)
    out["key_sharding_equal"] = xk.sharding.is_equivalent_to(sh, len(shape))
    out["key_shard_rows"] = sorted({int(a.data.shape[0]) for a in xk.addressable_shards})
    out["key_max_diff"] = float(np.max(np.abs(np.asarray(xk) - np.asarray(ref_k))))
    out["key_vs_noise_diff"] = float(np.max(np.abs(np.asarray(ref_k) - np.asarray(ref))))
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_batch_sharding_on_8_cpu_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["n_devices"] == 8
    # sample(noise=sharded): the result keeps the batch sharding, 2 rows on each device
    assert r["noise_sharding_equal"], r
    assert r["noise_n_shards"] == 8 and r["noise_shard_rows"] == [2], r
    assert r["ref_size"] > 0.5  # a real sample, not zeros
    assert r["noise_max_diff"] < 1e-5, r
    # sample(key=..., sharding=sh): same sharding, same numbers as the unsharded key run
    assert r["key_sharding_equal"] and r["key_shard_rows"] == [2], r
    assert r["key_max_diff"] < 1e-5, r
    assert r["key_vs_noise_diff"] > 0.1  # the key run is a different sample
