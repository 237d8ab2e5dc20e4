"""Files: one atomic writer (``dpmjax._files``) behind save_ems and save_timesteps.

A file is replaced atomically with the permissions the umask gives new files; a set of
files (DPM-Solver-v3's statistics) is replaced as one unit, so a crash mid-save leaves the
old set whole and loadable, and ``load_ems`` refuses a set mixed from two computations.
Needs only the sampler's dependencies.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import dpmjax
from dpmjax import _files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ems(seed, n=5, dim=2):
    rng = np.random.default_rng(seed)
    shape, f32 = (n, dim), np.float32  # load_ems returns the default float dtype
    return dpmjax.EMS(np.linspace(-4.0, 3.0, n, dtype=f32), rng.uniform(0.5, 1.5, shape).astype(f32),
                      rng.normal(size=shape).astype(f32), rng.normal(size=shape).astype(f32))


def _same(a, b):
    return all(np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f))) for f in dpmjax.EMS._fields)


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it after."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    ems_dir = tmp_path / "ems"
    dpmjax.save_ems(ems_dir, _ems(0))
    assert os.stat(ems_dir).st_mode & 0o777 == dir_mode
    assert {n: os.stat(ems_dir / n).st_mode & 0o777 for n in os.listdir(ems_dir)} == {
        "l.npz": file_mode, "sb.npz": file_mode, "lambdas.npy": file_mode, "ems.json": file_mode}
    grid = np.array([1.0, 0.5, 1e-3])
    for name in ("grid.json", "grid.npy"):
        dpmjax.save_timesteps(tmp_path / name, grid)
        assert os.stat(tmp_path / name).st_mode & 0o777 == file_mode
    # replacing keeps following the umask (mkstemp's 0600 never leaks through)
    umask(0o022 if mask == 0o077 else 0o077)
    dpmjax.save_timesteps(tmp_path / "grid.json", grid)
    assert os.stat(tmp_path / "grid.json").st_mode & 0o777 == (0o644 if mask == 0o077 else 0o600)


def test_save_ems_replaces_the_set_and_loads_it_back(tmp_path):
    d = tmp_path / "ems"
    a, b = _ems(0), _ems(1)
    dpmjax.save_ems(d, a)
    assert _same(dpmjax.load_ems(d), a)
    dpmjax.save_ems(d, b)  # an existing set is replaced as a whole
    assert _same(dpmjax.load_ems(d), b)
    assert sorted(os.listdir(tmp_path)) == ["ems"]  # no temporary directory left beside it
    # through a symbolic link: the directory it names is replaced, the link stays
    link = tmp_path / "link"
    link.symlink_to(d)
    dpmjax.save_ems(link, a)
    assert link.is_symlink() and _same(dpmjax.load_ems(d), a)


def test_save_ems_without_an_atomic_exchange(tmp_path, monkeypatch):
    # where renameat2(RENAME_EXCHANGE) is missing, the old set is moved aside, then removed
    monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    d = tmp_path / "ems"
    dpmjax.save_ems(d, _ems(0))
    dpmjax.save_ems(d, _ems(1))
    assert _same(dpmjax.load_ems(d), _ems(1)) and sorted(os.listdir(tmp_path)) == ["ems"]


def test_save_ems_refuses_what_it_does_not_own(tmp_path):
    f = tmp_path / "file"
    f.write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        dpmjax.save_ems(f, _ems(0))
    assert f.read_text() == "mine"
    d = tmp_path / "notes"
    d.mkdir()
    (d / "README").write_text("mine")
    with pytest.raises(ValueError, match=r"holds other entries \(README\)"):
        dpmjax.save_ems(d, _ems(0))
    assert os.listdir(d) == ["README"] and sorted(os.listdir(tmp_path)) == ["file", "notes"]
    with pytest.raises(TypeError, match="directory must be a str or os.PathLike"):
        dpmjax.save_ems(3, _ems(0))


def test_a_failure_mid_save_leaves_the_old_set(tmp_path, monkeypatch):
    d = tmp_path / "ems"
    old = _ems(0)
    dpmjax.save_ems(d, old)
    write_new, written = _files._write_new, []

    def fail_after_first(path, write):
        if written:
            raise OSError(28, "No space left on device")
        write_new(path, write)
        written.append(path)

    monkeypatch.setattr(_files, "_write_new", fail_after_first)
    with pytest.raises(OSError, match="No space left on device") as e:
        dpmjax.save_ems(d, _ems(1))
    assert e.value.filename == str(d.resolve())
    assert len(written) == 1 and _same(dpmjax.load_ems(d), old)
    assert sorted(os.listdir(tmp_path)) == ["ems"]


def test_a_kill_mid_save_leaves_the_old_set(tmp_path):
    # SIGKILL after the first file of the new set: no clean-up runs, yet the old set is whole
    d = tmp_path / "ems"
    dpmjax.save_ems(d, _ems(0))
    code = (
        "import os, signal, sys, numpy as np, dpmjax\n"
        "from dpmjax import _files\n"
        "write_new = _files._write_new\n"
        "def killed(path, write):\n"
        "    write_new(path, write)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "_files._write_new = killed\n"
        "rng = np.random.default_rng(1)\n"
        "e = dpmjax.EMS(np.linspace(-4.0, 3.0, 5), rng.uniform(0.5, 1.5, (5, 2)), rng.normal(size=(5, 2)),\n"
        "               rng.normal(size=(5, 2)))  # another set than the one on disk\n"
        "dpmjax.save_ems(sys.argv[1], e)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code, str(d)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert _same(dpmjax.load_ems(d), _ems(0))
    leftovers = [n for n in os.listdir(tmp_path) if n != "ems"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ems.")  # the unfinished new set, hidden beside it
    dpmjax.save_ems(d, _ems(1))  # and the next save goes through
    assert _same(dpmjax.load_ems(d), _ems(1))


def test_load_ems_refuses_a_mixed_or_partial_set(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    dpmjax.save_ems(a, _ems(0))
    dpmjax.save_ems(b, _ems(1))
    shutil.copy(b / "sb.npz", a / "sb.npz")  # same shapes, another computation
    with pytest.raises(ValueError, match="mixes files of different EMS computations"):
        dpmjax.load_ems(a)
    os.remove(b / "sb.npz")
    with pytest.raises(ValueError, match="incomplete EMS set"):
        dpmjax.load_ems(b)
    # the authors' layout (no manifest, no grid) still loads, given the schedule
    c = tmp_path / "c"
    c.mkdir()
    e = _ems(2)
    np.savez(c / "l.npz", l=e.l)
    np.savez(c / "sb.npz", s=e.s, b=e.b)
    got = dpmjax.load_ems(c, dpmjax.VPLinear())
    assert np.allclose(np.asarray(got.l), e.l, rtol=1e-6)


def test_load_ems_names_a_bad_grid_file(tmp_path):
    d = tmp_path / "ems"
    e = _ems(0)
    d.mkdir()
    np.savez(d / "l.npz", l=e.l)
    np.savez(d / "sb.npz", s=e.s, b=e.b)
    np.save(d / "lambdas.npy", np.float64(0.5))  # 0-d
    with pytest.raises(ValueError, match=r"lambdas.npy must hold a 1-D grid .* got shape \(\)"):
        dpmjax.load_ems(d)
    np.save(d / "lambdas.npy", np.linspace(-4.0, 3.0, 4))  # one row short
    with pytest.raises(ValueError, match="holds 4 lambdas but l.npz holds 5 rows") as err:
        dpmjax.load_ems(d, dpmjax.VPLinear())
    assert "spans" not in str(err.value)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        dpmjax.load_ems(f)


def test_the_manifest_lists_each_file_digest(tmp_path):
    import hashlib

    d = tmp_path / "ems"
    dpmjax.save_ems(d, _ems(0))
    doc = json.loads((d / "ems.json").read_text())
    assert doc["sha256"] == {n: hashlib.sha256((d / n).read_bytes()).hexdigest()
                             for n in ("l.npz", "sb.npz", "lambdas.npy")}
