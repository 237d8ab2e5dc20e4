"""The command line: ``dpmjax demo | train | sample | fit-steps`` through ``dpmjax.cli.main``."""

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import dpmjax

from dpmjax.cli import main
from dpmjax.train import read_losses

TINY = ["--width", "16", "--depth", "1", "--batch-size", "32", "--no-progress"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err  # one line, no usage dump or traceback
    return lines[0]


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cli") / "moons")
    assert main(["train", "--data", "moons", "--steps", "30", "--checkpoint-every", "10", "--out", d, *TINY]) == 0
    return d


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "mnist"], "invalid choice: 'mnist'"),
    (["train", "--data", "moons", "--steps", "0"], "positive integer"),
    (["train", "--data", "moons", "--steps", "ten"], "positive integer, got 'ten'"),
    (["train", "--data", "moons", "--lr", "nan"], "finite number"),
    (["train", "--data", "moons", "--channels", "8"], "--channels applies to the unet model"),
    (["train", "--out", "/nonexistent/run"], "--data is required"),
    (["sample"], "--checkpoint"),
    (["sample", "--checkpoint", "x", "--order", "4"], "invalid choice: 4"),
    (["sample", "--checkpoint", "x", "--guidance-scale", "inf"], "finite number"),
    (["demo", "--train-steps", "-3"], "positive integer"),
    (["demo", "--fit-trajectories", "0"], "positive integer"),
    (["demo", "--fit-refine-iters", "-1"], "integer >= 0"),
    (["bench"], "invalid choice: 'bench'"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in error_line(err)


def test_missing_checkpoint(capsys, tmp_path):
    missing = str(tmp_path / "nothing-here")
    code, _, err = run(capsys, "sample", "--checkpoint", missing, "--out", str(tmp_path / "s.png"))
    assert code == 2 and missing in error_line(err)
    os.makedirs(missing)
    code, _, err = run(capsys, "sample", "--checkpoint", missing)
    assert code == 2 and "no config.json" in error_line(err)


def test_train_writes_config_checkpoints_and_losses(moons_run):
    with open(os.path.join(moons_run, "config.json")) as f:
        config = json.load(f)
    assert config["data"] == "moons" and config["steps"] == 30 and config["model"]["width"] == 16
    assert sorted(os.listdir(os.path.join(moons_run, "checkpoints"))) == ["10", "20", "30"]
    assert sorted(read_losses(moons_run)) == list(range(30))


def test_train_again_resumes_or_refuses(capsys, moons_run):
    code, out, err = run(capsys, "train", "--data", "moons", "--steps", "30", "--out", moons_run,
                         *[a for a in TINY if a != "--no-progress"])
    assert code == 0 and "already trained (30 of 30 steps); nothing to do" in out
    assert "nan" not in out and err == ""  # no loss summary of zero steps, no progress bar
    code, _, err = run(capsys, "train", "--out", moons_run, "--seed", "4", "--no-progress")
    assert code == 2 and re.search(r"holds a different run \(seed: 0 != 4\)", error_line(err))
    code, _, err = run(capsys, "train", "--data", "swissroll", "--out", moons_run, "--no-progress")
    assert code == 2 and "data='moons'" in error_line(err)


def test_sample_2d(capsys, moons_run, tmp_path):
    png = str(tmp_path / "moons.png")
    code, out, _ = run(capsys, "sample", "--checkpoint", moons_run, "--method", "multistep", "--order", "2",
                       "--steps", "5", "--num", "300", "--out", png)
    assert code == 0 and os.path.getsize(png) > 1000
    swd = float(re.search(r"sliced Wasserstein distance to the data ([0-9.eE+-]+|nan|inf)", out).group(1))
    assert math.isfinite(swd) and swd > 0  # 30 steps: far from the data, but finite
    # steps < order for multistep is the sampler's ValueError, reported in one line
    code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--order", "3", "--steps", "2", "--out", png)
    assert code == 2 and "steps must be >= order" in error_line(err)
    code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--class", "1", "--out", png)
    assert code == 2 and "class-conditional" in error_line(err)


@pytest.mark.slow
def test_fit_steps_then_sample_with_the_grid(capsys, moons_run, tmp_path):
    grid = str(tmp_path / "grid.json")
    # fitted for UniPC here (the demo test covers the multistep default)
    code, out, _ = run(capsys, "fit-steps", "--checkpoint", moons_run, "--steps", "4", "--trajectories", "32",
                       "--candidates", "12", "--refine-iters", "5", "--method", "unipc", "--out", grid)
    assert code == 0, out
    ts = dpmjax.load_timesteps(grid)
    assert ts.timesteps.shape == (5,) and np.all(np.diff(ts.timesteps) < 0)
    assert ts.model_timesteps.shape == (4,)  # network times fitted too (the default)
    # measured on noise the fit never saw: UniPC on the fitted grid lands closer to a fine
    # solution of the trained model than UniPC on the logSNR grid
    from dpmjax.train.trainer import load_trained

    trainer, state = load_trained(moons_run)
    trainer.close()
    xT = jax.random.normal(jax.random.key(123), (256,) + trainer.dataset.shape)
    kw = dict(schedule=trainer.schedule, noise=xT, order=2)

    def solve(**k):
        return np.asarray(dpmjax.sample(trainer.model_fn, state.ema_params, None, xT.shape, **kw, **k))

    fine = solve(method="multistep", steps=200, skip_type="logSNR")
    err = {name: float(np.sqrt(np.mean((solve(method="unipc", steps=4, **g) - fine) ** 2)))
           for name, g in (("fitted", dict(timesteps=ts)), ("logSNR", dict(skip_type="logSNR")))}
    assert err["fitted"] < 0.5 * err["logSNR"], err  # measured 3.3 vs 16.5
    png = str(tmp_path / "fitted.png")
    assert "unipc order 2" in out and json.load(open(grid))["method"] == "unipc"
    code, out, _ = run(capsys, "sample", "--checkpoint", moons_run, "--timesteps", grid, "--method", "unipc",
                       "--num", "200", "--out", png)
    assert code == 0 and "4 NFE, grid grid.json" in out and os.path.getsize(png) > 1000
    code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--timesteps", str(tmp_path / "nope.json"),
                       "--out", png)
    assert code == 2 and "does not exist" in error_line(err)


@pytest.mark.parametrize("damage", ["config", "arrays"])
def test_sample_a_corrupt_checkpoint(capsys, moons_run, tmp_path, damage):
    d = str(tmp_path / "corrupt")
    shutil.copytree(moons_run, d)
    if damage == "config":
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write('{"data": "moons", "model": ')
    else:
        for root, _, files in os.walk(os.path.join(d, "checkpoints", "30", "state")):
            for name in files:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"\0garbage")
    code, _, err = run(capsys, "sample", "--checkpoint", d, "--out", str(tmp_path / "s.png"))
    line = error_line(err)
    assert code == 2 and d in line and ("corrupt run config" in line or "cannot restore" in line)


@pytest.mark.slow
def test_digits_train_and_guided_class_grid(capsys, tmp_path):
    d = str(tmp_path / "digits")
    code, out, _ = run(capsys, "train", "--data", "digits", "--steps", "30", "--channels", "4",
                       "--batch-size", "16", "--lr", "0.01", "--out", d, "--no-progress")
    assert code == 0
    losses = read_losses(d)
    assert sorted(losses) == list(range(30))
    assert sum(losses[k] for k in range(20, 30)) < 0.8 * sum(losses[k] for k in range(10))
    png = str(tmp_path / "grid.png")
    code, out, _ = run(capsys, "sample", "--checkpoint", d, "--steps", "4", "--num", "2", "--guidance-scale", "3",
                       "--out", png)
    assert code == 0 and os.path.getsize(png) > 500 and "20 images" in out and "guidance scale 3" in out
    code, out, _ = run(capsys, "sample", "--checkpoint", d, "--steps", "4", "--num", "20", "--class", "7",
                       "--out", png)  # same shape, no new compile
    assert code == 0 and "20 images" in out
    code, _, err = run(capsys, "sample", "--checkpoint", d, "--class", "10", "--out", png)
    assert code == 2 and "--class must be in 0..9" in error_line(err)


def _table(out):
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(\S.*?)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", line)
        if m and not line.startswith("method"):
            rows[m.group(1)] = {"nfe": int(m.group(2)), "swd": float(m.group(3)), "ref_err": float(m.group(4)),
                                "seconds": float(m.group(5))}
    return rows


@pytest.mark.slow
def test_demo_dpm_solver_pp_beats_ddim_at_10_nfe(capsys, tmp_path, monkeypatch):
    # a briefly trained moons model: at 10 model evaluations DPM-Solver++(2M) lands closer to the data
    # (sliced Wasserstein distance, the demo's metric) and to the 200-NFE solution than DDIM does;
    # at 6 evaluations the grid fitted to the model (on noise of its own; a small fit here) lands closer
    # to the 200-NFE solution than the logSNR grid -- what the fit optimises
    from dpmjax.train import plots

    titles, draw = [], plots.scatter_panels
    monkeypatch.setattr(plots, "scatter_panels", lambda *a, **kw: (titles.append(kw["suptitle"]), draw(*a, **kw)))
    out_dir = str(tmp_path / "demo")
    code, out, _ = run(capsys, "demo", "--out", out_dir, "--train-steps", "800", "--width", "32",
                       "--samples", "2000", "--fit-trajectories", "256", "--fit-refine-iters", "10", "--no-progress")
    assert code == 0
    rows = _table(out)
    assert list(rows) == ["DPM-Solver++(2M)", "DPM-Solver-fast", "DDIM", "DPM-Solver++(2M) logSNR",
                          "DPM-Solver++(2M) fitted", "DPM-Solver-v3 logSNR", "DPM-Solver++ reference"], out
    assert all(math.isfinite(r["swd"]) and math.isfinite(r["ref_err"]) for r in rows.values())
    assert [r["nfe"] for r in rows.values()] == [10, 10, 10, 6, 6, 6, 200]
    pp, ddim, ref = rows["DPM-Solver++(2M)"], rows["DDIM"], rows["DPM-Solver++ reference"]
    assert pp["swd"] < 0.8 * ddim["swd"], out
    assert pp["ref_err"] < 0.6 * ddim["ref_err"], out
    assert ref["ref_err"] == 0.0 and ref["swd"] < ddim["swd"]
    # v3 at 6 NFE with statistics of this (barely trained) model: a finite row (its accuracy is
    # tests/test_v3.py's subject)
    assert re.search(r"computed DPM-Solver-v3's statistics in [0-9.]+s", out), out
    log6, fit6 = rows["DPM-Solver++(2M) logSNR"], rows["DPM-Solver++(2M) fitted"]
    assert fit6["ref_err"] < 0.8 * log6["ref_err"], out
    assert re.search(r"fitted a 6-step grid in [0-9.]+s", out), out
    ts = dpmjax.load_timesteps(os.path.join(out_dir, "grid-6.json"))
    assert ts.timesteps.shape == (7,) and np.all(np.diff(ts.timesteps) < 0) and ts.model_timesteps.shape == (6,)
    assert os.path.getsize(os.path.join(out_dir, "demo.png")) > 10_000
    assert len(titles) == 1 and "lower is better" in titles[0]
    # everything the demo writes: the training run, the fitted grid and the figure
    assert sorted(os.listdir(out_dir)) == ["demo.png", "grid-6.json", "run-moons-800"]
    assert sorted(os.listdir(os.path.join(out_dir, "run-moons-800"))) == ["checkpoints", "config.json", "losses.jsonl"]

    # run again: the finished run and the grid fitted to it are reused, and the demo says so
    from dpmjax.train.trainer import Trainer

    grid_bytes = open(os.path.join(out_dir, "grid-6.json"), "rb").read()

    def never(*a, **kw):
        raise AssertionError("trained or fitted again")

    monkeypatch.setattr(Trainer, "train", never)
    monkeypatch.setattr(dpmjax, "fit_timesteps", never)
    code, out2, _ = run(capsys, "demo", "--out", out_dir, "--train-steps", "800", "--width", "32",
                        "--samples", "2000", "--fit-trajectories", "256", "--fit-refine-iters", "10", "--no-progress")
    assert code == 0
    assert re.search(r"reusing the 32-wide, 3-block MLP trained on moons for 800 steps in \S*run-moons-800", out2), out2
    assert "reusing the 6-step grid in" in out2 and "trained a" not in out2 and "fitted a" not in out2, out2
    assert open(os.path.join(out_dir, "grid-6.json"), "rb").read() == grid_bytes
    rows2 = _table(out2)
    assert {k: r["swd"] for k, r in rows2.items()} == {k: r["swd"] for k, r in rows.items()}
    # other fitting settings: the grid is fitted again, and the log says why
    monkeypatch.undo()
    code, out3, _ = run(capsys, "demo", "--out", out_dir, "--train-steps", "800", "--width", "32",
                        "--samples", "2000", "--fit-trajectories", "128", "--fit-refine-iters", "10", "--no-progress")
    assert code == 0 and "fitting a new 6-step grid: " in out3 and "(trajectories)" in out3, out3
    assert re.search(r"fitted a 6-step grid in [0-9.]+s", out3), out3



# -- user errors: one line, exit status 2, nothing damaged --------------------------------


def _subcommand_parsers():
    from dpmjax.cli import _build_parser

    parser = _build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_help_states_every_default():
    for name, parser in _subcommand_parsers().items():
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
                continue
            flag = action.option_strings[0]
            helped = parser._get_formatter()._expand_help(action) if action.help else ""
            assert "default" in helped or action.required, f"{name} {flag}: {helped!r}"
            assert flag in text
    sample_help = " ".join(_subcommand_parsers()["sample"].format_help().split())
    assert "logSNR" in sample_help and "time_uniform" in sample_help  # the CLI's vs the Python default


@pytest.mark.parametrize("argv, message", [
    (["sample", "--checkpoint", "x", "--seed", "99999999999999999999"], "expected a seed in 0..4294967295"),
    (["train", "--data", "moons", "--seed", "-1"], "integer >= 0"),
    (["sample", "--checkpoint", "x", "--out", "/dev/null"], "is not a regular file"),
    (["sample", "--checkpoint", "x", "--out", "/nonexistent-dir/s.png"], "/nonexistent-dir does not exist"),
    (["sample", "--checkpoint", "x", "--out", "s.jpq"], "cannot write .jpq images"),
    (["train", "--data", "moons", "--out", "/dev/null"], "--out /dev/null is not a directory"),
    (["fit-steps", "--checkpoint", "x", "--out", "g.npy"], "a .npy file holds the grid alone"),
])
def test_bad_paths_exit_2_with_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in error_line(err)


@pytest.mark.slow
def test_output_files_are_checked_before_any_work(capsys, moons_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    code, _, err = run(capsys, "train", "--data", "moons", "--out", str(a_file), "--no-progress")
    assert code == 2 and "is not a directory" in error_line(err) and a_file.read_text() == "mine"
    code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--out", str(tmp_path))
    assert code == 2 and "is a directory" in error_line(err)
    # a read-only file is not replaced
    ro = tmp_path / "ro.png"
    ro.write_bytes(b"old")
    ro.chmod(0o444)
    code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--out", str(ro))
    assert code == 2 and "read-only" in error_line(err) and ro.read_bytes() == b"old"
    # a default name that exists is not replaced; the same name given with --out is
    (tmp_path / "samples.png").write_bytes(b"old")
    code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--steps", "3", "--num", "50")
    assert code == 2 and "already exists; pass --out samples.png" in error_line(err)
    assert (tmp_path / "samples.png").read_bytes() == b"old"
    code, _, _ = run(capsys, "sample", "--checkpoint", moons_run, "--steps", "3", "--num", "50", "--out",
                     "samples.png")
    assert code == 0 and (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["a-file", "ro.png", "samples.png"]  # no temporary files left
    # the run's own files are never outputs
    config = open(os.path.join(moons_run, "config.json")).read()
    for cmd in ("fit-steps", "sample"):
        code, _, err = run(capsys, cmd, "--checkpoint", moons_run, "--out", os.path.join(moons_run, "config.json"))
        assert code == 2 and "inside the run directory" in error_line(err)
    assert open(os.path.join(moons_run, "config.json")).read() == config


def test_timesteps_that_is_not_a_file(capsys, moons_run, tmp_path):
    code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--timesteps", str(tmp_path),
                       "--out", str(tmp_path / "s.png"))
    assert code == 2 and "is not a file" in error_line(err)


def test_checkpoints_that_is_a_file(capsys, tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "checkpoints").write_text("not a directory")
    code, _, err = run(capsys, "train", "--data", "moons", "--out", str(d), *TINY)
    assert code == 2 and "checkpoints is not a directory" in error_line(err)
    code, _, err = run(capsys, "sample", "--checkpoint", str(d), "--out", str(tmp_path / "s.png"))
    assert code == 2 and error_line(err).startswith("dpmjax: error:")


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_unreadable_config_and_unwritable_directory(capsys, moons_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(moons_run, d)
    os.chmod(d / "config.json", 0)
    code, _, err = run(capsys, "sample", "--checkpoint", str(d), "--out", str(tmp_path / "s.png"))
    assert code == 2 and "cannot read the run config" in error_line(err)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--out", str(locked / "s.png"))
    assert code == 2 and "not writable" in error_line(err)
    code, _, err = run(capsys, "train", "--data", "moons", "--out", str(locked / "run"), *TINY)
    assert code == 2 and "not writable" in error_line(err)


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    from dpmjax._files import write_file

    target = tmp_path / "out.json"
    target.write_text("old")

    def half_then_fail(f):
        f.write(b"new, half written")
        f.flush()
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device") as e:
        write_file(str(target), half_then_fail)
    assert e.value.filename == str(target)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]
    write_file(str(target), lambda f: f.write(b"new"))
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]
    assert (target.stat().st_mode & 0o777) == (0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cli_subprocess(argv, fsize=None, cwd=None):
    """Run ``python -m dpmjax argv`` (optionally under a file-size limit); (returncode, stderr lines)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import resource, runpy, sys\n"
            f"if {fsize!r}: resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize!r}, {fsize!r}))\n"
            "sys.argv = ['dpmjax'] + sys.argv[1:]\n"
            "runpy.run_module('dpmjax', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=cwd,
                       timeout=300)
    return r.returncode, [l for l in r.stderr.splitlines() if l.strip()]


@pytest.mark.slow
def test_failed_reads_and_writes_print_one_line(moons_run, tmp_path):
    # (subprocesses: orbax's leftover coroutines report at interpreter exit)
    # a damaged array chunk of a checkpoint
    d = tmp_path / "damaged"
    shutil.copytree(moons_run, d)
    for root, _, files in os.walk(d / "checkpoints" / "30" / "state" / "ocdbt.process_0" / "d"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\0garbage")
    code, lines = _cli_subprocess(["sample", "--checkpoint", str(d), "--out", str(tmp_path / "s.png")])
    assert code == 2 and len(lines) == 1 and "cannot restore checkpoint" in lines[0], lines
    # a full disk (a file-size limit) while saving a checkpoint
    run_dir = tmp_path / "full"
    code, lines = _cli_subprocess(["train", "--data", "moons", "--steps", "10", "--out", str(run_dir), *TINY],
                                  fsize=3000)
    assert code == 2 and len(lines) == 1 and "cannot save checkpoint 10" in lines[0], lines
    # ... and while writing the figure over an existing one: the old file stays whole
    keep = tmp_path / "keep.png"
    keep.write_bytes(b"an earlier figure")
    code, lines = _cli_subprocess(["sample", "--checkpoint", moons_run, "--steps", "3", "--num", "500",
                                   "--out", str(keep)], fsize=3000)
    assert code == 2 and len(lines) == 1 and "File too large" in lines[0] and str(keep) in lines[0], lines
    assert keep.read_bytes() == b"an earlier figure"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".keep.png")]


# -- adaptive, grids fitted for a solver, progress, loading from Python -------------------


@pytest.mark.slow
def test_adaptive_reports_its_real_nfe_and_fails_when_unfinished(capsys, moons_run, tmp_path):
    import jax

    from dpmjax.train import load_trained

    png = str(tmp_path / "a.png")
    code, out, _ = run(capsys, "sample", "--checkpoint", moons_run, "--method", "adaptive", "--num", "100",
                       "--seed", "3", "--out", png)
    assert code == 0, out
    trainer, state = load_trained(moons_run)
    trainer.close()
    _, info = dpmjax.sample(trainer.model_fn, state.ema_params, jax.random.key(3), (100, 2),
                            schedule=trainer.schedule, method="adaptive", order=2, return_info=True)
    assert f", {int(info['nfe'])} NFE," in out and not bool(info["hit_max_nfe"])
    code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--method", "adaptive", "--max-nfe", "4",
                       "--num", "100", "--out", str(tmp_path / "b.png"))
    assert code == 2 and "stopped after" in error_line(err) and "--max-nfe 4" in error_line(err)
    assert not os.path.exists(tmp_path / "b.png")


@pytest.mark.slow
def test_grid_fitted_for_another_solver_is_refused(capsys, moons_run, tmp_path):
    grid = str(tmp_path / "grid.json")
    dpmjax.save_timesteps(grid, np.linspace(1.0, 1e-3, 5), algorithm="dpmsolver++", method="unipc", order=2)
    png = str(tmp_path / "g.png")
    code, out, _ = run(capsys, "sample", "--checkpoint", moons_run, "--timesteps", grid, "--num", "50", "--out", png)
    assert code == 0 and "dpmsolver++ unipc order 2, 4 NFE" in out  # the grid's solver by default
    code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--timesteps", grid, "--method", "multistep",
                       "--out", png)
    assert code == 2 and "--method multistep (fitted for unipc)" in error_line(err)
    code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--timesteps", grid, "--order", "3",
                       "--out", png)
    assert code == 2 and "--order 3 (fitted for 2)" in error_line(err)


@pytest.mark.slow
def test_fit_steps_without_refinement_reports_the_dynamic_program(capsys, moons_run, tmp_path):
    grid = str(tmp_path / "dp.json")
    code, out, _ = run(capsys, "fit-steps", "--checkpoint", moons_run, "--steps", "3", "--trajectories", "16",
                       "--candidates", "8", "--refine-iters", "0", "--no-progress", "--out", grid)
    assert code == 0 and "nan" not in out
    cost = float(re.search(r"accumulated one-step error ([0-9.eE+-]+)", out).group(1))
    assert math.isfinite(cost) and cost > 0
    # the grid is measured end to end like the fixed grids it is reported beside
    err = float(re.search(r"grid \(no refinement\): error ([0-9.eE+-]+)", out).group(1))
    fixed = dict((k, float(v)) for k, v in re.findall(r"(logSNR|time_uniform|karras) ([0-9.]+)", out))
    assert math.isfinite(err) and err > 0 and set(fixed) == {"logSNR", "time_uniform", "karras"}
    doc = json.load(open(grid))
    assert (doc["method"], doc["order"], doc["refine_iters"], doc["model_times"]) == ("multistep", 2, 0, True)


@pytest.mark.parametrize("flag, expected", [([], True), (["--no-progress"], False)])
def test_fit_steps_passes_progress_when_the_library_takes_it(capsys, moons_run, tmp_path, monkeypatch, flag,
                                                              expected):
    original, seen = dpmjax.fit_timesteps, []

    def fit_with_progress(*args, progress=False, **kwargs):
        seen.append(progress)
        return original(*args, **kwargs)

    monkeypatch.setattr(dpmjax, "fit_timesteps", fit_with_progress)
    code, _, _ = run(capsys, "fit-steps", "--checkpoint", moons_run, "--steps", "3", "--trajectories", "16",
                     "--candidates", "8", "--refine-iters", "0", "--out", str(tmp_path / "g.json"), *flag)
    assert code == 0 and seen == [expected]


def test_loading_a_run_from_python_is_quiet(moons_run, caplog):
    from dpmjax.train import load_trained

    with caplog.at_level(logging.WARNING, logger="absl"):
        trainer, state = load_trained(moons_run)
        trainer.close()
    assert int(state.step) == 30
    assert not [r for r in caplog.records if "read only" in r.getMessage()], caplog.text

@pytest.mark.slow
def test_compute_ems_then_sample_with_v3(capsys, moons_run, tmp_path):
    """compute-ems writes finite statistics in the authors' layout (l.npz, sb.npz, plus the
    grid); sample --method v3 --ems samples with them; v3 and --ems need each other."""
    ems_dir = str(tmp_path / "ems")
    code, out, err = run(capsys, "compute-ems", "--checkpoint", moons_run, "--lambdas", "41", "--samples", "64",
                         "--no-progress", "--out", ems_dir)
    assert code == 0, err
    assert sorted(os.listdir(ems_dir)) == ["ems.json", "l.npz", "lambdas.npy", "sb.npz"]
    ems = dpmjax.load_ems(ems_dir)
    assert ems.l.shape == ems.s.shape == ems.b.shape == (41, 2)
    assert np.all(np.isfinite(ems.l)) and np.all(np.isfinite(ems.s)) and np.all(np.isfinite(ems.b))
    png = str(tmp_path / "v3.png")
    code, out, err = run(capsys, "sample", "--checkpoint", moons_run, "--method", "v3", "--ems", ems_dir, "--steps",
                         "6", "--num", "64", "--out", png)
    assert code == 0, err
    assert os.path.getsize(png) > 0 and "v3" in out
    # v3 needs its statistics, and only v3 takes them
    code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--method", "v3", "--out", png)
    assert code == 2 and "--ems" in error_line(err)
    code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--ems", ems_dir, "--out", png)
    assert code == 2 and "--ems" in error_line(err)
    # the default directory is not overwritten; a directory inside the run is refused
    code, _, err = run(capsys, "compute-ems", "--checkpoint", moons_run, "--out", os.path.join(moons_run, "ems"))
    assert code == 2 and "inside the run directory" in error_line(err)


# -- options that do not apply, bad grid files, outputs checked first ---------------------


def test_adaptive_options_with_a_fixed_step_method_are_refused(capsys, moons_run, tmp_path):
    png = str(tmp_path / "s.png")
    for flags in (["--rtol", "0.1"], ["--atol", "0.01", "--max-nfe", "50"]):
        code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--method", "unipc", *flags, "--out", png)
        line = error_line(err)
        assert code == 2 and "only apply to --method adaptive" in line and flags[0] in line, line
    assert not os.path.exists(png)


@pytest.mark.parametrize("field, value", [("order", 2.7), ("order", True), ("order", "2"), ("method", "rk4"),
                                          ("algorithm", "ddim")])
def test_a_grid_file_with_a_bad_solver_field_is_refused(capsys, moons_run, tmp_path, field, value):
    grid = tmp_path / "grid.json"
    dpmjax.save_timesteps(grid, np.linspace(1.0, 1e-3, 5), **{field: value})
    code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--timesteps", str(grid),
                       "--out", str(tmp_path / "s.png"))
    line = error_line(err)
    assert code == 2 and f'"{field}" must be one of' in line and repr(value) in line, line


def test_empty_out_is_refused(capsys, moons_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "train", "--data", "moons", "--out", "", *TINY)
    assert code == 2 and "--out must name a directory" in error_line(err)
    code, _, err = run(capsys, "sample", "--checkpoint", moons_run, "--out", "")
    assert code == 2 and "--out must name a file" in error_line(err)
    code, _, err = run(capsys, "compute-ems", "--checkpoint", moons_run, "--out", "")
    assert code == 2 and "--out must name a directory" in error_line(err)
    assert os.listdir(tmp_path) == []


def test_compute_ems_checks_out_before_any_work(capsys, moons_run, tmp_path, monkeypatch):
    import dpmjax.train.trainer as trainer_module

    def never(*a, **kw):
        raise AssertionError("the run was loaded before --out was checked")

    monkeypatch.setattr(trainer_module, "load_trained", never)
    # a symbolic link into the run directory is the run directory (realpath, like sample and fit-steps)
    link = tmp_path / "link"
    link.symlink_to(moons_run)
    code, _, err = run(capsys, "compute-ems", "--checkpoint", moons_run, "--out", str(link / "ems"))
    assert code == 2 and "inside the run directory" in error_line(err)
    code, _, err = run(capsys, "compute-ems", "--checkpoint", moons_run, "--out", str(link))
    assert code == 2 and "inside the run directory" in error_line(err)
    # a file, a directory of other files, a missing parent that cannot be made
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "compute-ems", "--checkpoint", moons_run, "--out", str(tmp_path / "file"))
    assert code == 2 and "not a directory" in error_line(err)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    code, _, err = run(capsys, "compute-ems", "--checkpoint", moons_run, "--out", str(tmp_path / "mine"))
    assert code == 2 and "holds other files (notes.txt)" in error_line(err)
    code, _, err = run(capsys, "compute-ems", "--checkpoint", moons_run, "--out", str(tmp_path / "file" / "ems"))
    assert code == 2 and "not a directory" in error_line(err)
    # the moving-average width is a flag of its own, checked against --lambdas
    code, _, err = run(capsys, "compute-ems", "--checkpoint", moons_run, "--lambdas", "5",
                       "--out", str(tmp_path / "ems"))
    line = error_line(err)
    assert code == 2 and "--smooth-dl (5) must be smaller than --lambdas (5)" in line and "smooth_dl" not in line
    assert (tmp_path / "file").read_text() == "x" and os.listdir(tmp_path / "mine") == ["notes.txt"]


@pytest.mark.slow
def test_compute_ems_replaces_a_set_of_statistics(capsys, moons_run, tmp_path):
    out = tmp_path / "ems"
    argv = ["compute-ems", "--checkpoint", moons_run, "--lambdas", "9", "--samples", "16", "--smooth-dl", "1",
            "--no-progress"]
    assert run(capsys, *argv, "--seed", "1", "--out", str(out))[0] == 0
    first = dpmjax.load_ems(out)
    code, _, err = run(capsys, *argv, "--seed", "2", "--out", str(out))  # named with --out: replaced
    assert code == 0, err
    second = dpmjax.load_ems(out)
    assert not np.array_equal(np.asarray(first.l), np.asarray(second.l))
    assert sorted(os.listdir(tmp_path)) == ["ems"]


def test_an_interrupt_before_the_first_checkpoint_says_nothing_was_saved(capsys, tmp_path, monkeypatch):
    from dpmjax.train.trainer import Trainer

    def interrupted(self, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", interrupted)
    code, _, err = run(capsys, "train", "--data", "moons", "--out", str(tmp_path / "run"), *TINY)
    line = error_line(err)
    assert code == 130 and "before the first checkpoint" in line and "None" not in line, line


_BLOCK_EXTRAS = """
import importlib.abc, sys
BLOCKED = ("flax", "orbax", "matplotlib", "sklearn", "tqdm")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def _without_extras(code, *argv):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", _BLOCK_EXTRAS + code, *argv], capture_output=True, text=True, env=env,
                       timeout=300)
    return r.returncode, r.stdout, [l for l in r.stderr.splitlines() if l.strip()]


@pytest.mark.slow
def test_the_sampler_and_the_command_line_without_the_extras(tmp_path):
    # a core install (no flax, orbax, matplotlib, scikit-learn, tqdm): sampling works, and each
    # command that needs an extra says, in one line, which one to install
    code, out, err = _without_extras(
        "import jax, jax.numpy as jnp, dpmjax, dpmjax.train.config, dpmjax.train.data\n"
        "data = dpmjax.GaussianMixture.isotropic(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), 0.3)\n"
        "s = dpmjax.VPLinear()\n"
        "x = dpmjax.sample(data.model_fn(s), data, jax.random.key(0), (2000, 2), schedule=s, steps=10)\n"
        "print(float(jnp.mean(x[:, 0] > 0)))\n"
        "print([m for m in sys.modules if m.split('.')[0] in BLOCKED])\n"
        "try:\n"
        "    import dpmjax.nets\n"
        "except ImportError as e:\n"
        "    print(e)\n"
        "try:\n"
        "    from dpmjax.train import Trainer\n"
        "except ImportError as e:\n"
        "    print(e)\n")
    assert code == 0, err
    frac, loaded, nets_error, train_error = out.splitlines()
    assert abs(float(frac) - 0.5) < 0.05 and loaded == "[]"
    assert "dpmjax.nets needs flax: pip install 'dpmjax[train]'" in nets_error
    assert "dpmjax.train.Trainer needs flax: pip install 'dpmjax[train]'" in train_error
    cli = "from dpmjax.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    cases = [(["train", "--data", "moons", "--out", str(tmp_path / "r")], "dpmjax[train]", "flax"),
             (["train", "--data", "digits", "--out", str(tmp_path / "r")], "dpmjax[demo]", "scikit-learn"),
             (["sample", "--checkpoint", str(tmp_path)], "dpmjax[demo]", "matplotlib"),
             (["fit-steps", "--checkpoint", str(tmp_path)], "dpmjax[train]", "orbax-checkpoint"),
             (["compute-ems", "--checkpoint", str(tmp_path)], "dpmjax[train]", "tqdm"),
             (["demo", "--out", str(tmp_path / "d")], "dpmjax[demo]", "matplotlib")]
    for argv, extra, module in cases:
        code, _, lines = _without_extras(cli, *argv)
        assert code == 2 and len(lines) == 1, (argv, lines)
        assert f"pip install '{extra}'" in lines[0] and module in lines[0], (argv, lines)
    code, out, lines = _without_extras(cli, "--help")
    assert code == 0 and "compute-ems" in out
    assert os.listdir(tmp_path) == []


def test_a_missing_extra_found_late_is_still_one_line(capsys, monkeypatch, tmp_path):
    # e.g. resuming a digits run without --data (scikit-learn is imported when the data are drawn)
    import dpmjax.cli as cli

    def needs_sklearn(args):
        raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")

    monkeypatch.setattr(cli, "_cmd_train", needs_sklearn)
    code, _, err = run(capsys, "train", "--out", str(tmp_path / "run"))
    assert code == 2 and error_line(err) == "dpmjax: error: needs sklearn, which the sampler does not: " \
                                           "pip install 'dpmjax[demo]'"
