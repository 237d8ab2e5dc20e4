"""The command line: ``dpmjax demo | train | sample`` through ``dpmjax.cli.main``."""

import json
import math
import os
import re
import shutil

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
    code, out, err = run(capsys, "train", "--data", "moons", "--steps", "30", "--out", moons_run, *TINY)
    assert code == 0 and "resuming" in err and "to step 30" in out  # nothing left to do
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


def test_fit_steps_then_sample_with_the_grid(capsys, moons_run, tmp_path):
    grid = str(tmp_path / "grid.json")
    # fitted for UniPC here (the demo test covers the multistep default)
    code, out, _ = run(capsys, "fit-steps", "--checkpoint", moons_run, "--steps", "4", "--trajectories", "32",
                       "--candidates", "12", "--refine-iters", "5", "--method", "unipc", "--out", grid)
    assert code == 0, out
    ts = dpmjax.load_timesteps(grid)
    assert ts.timesteps.shape == (5,) and np.all(np.diff(ts.timesteps) < 0)
    assert ts.model_timesteps.shape == (4,)  # network times fitted too (the default)
    # the fitted error is at most the best starting grid's (the fit keeps only improvements)
    fitted = float(re.search(r"fitted error ([0-9.]+)", out).group(1))
    starts = [float(v) for v in re.findall(r"(?:dp|logSNR|time_uniform|time_quadratic|karras|edm) ([0-9.]+)", out)]
    assert starts and fitted <= min(starts) + 1e-4
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


def test_demo_dpm_solver_pp_beats_ddim_at_10_nfe(capsys, tmp_path):
    # a briefly trained moons model: at 10 model evaluations DPM-Solver++(2M) lands closer to the data
    # (sliced Wasserstein distance, the demo's metric) and to the 200-NFE solution than DDIM does;
    # at 6 evaluations the grid fitted to the model (on noise of its own; a small fit here) lands closer
    # to the 200-NFE solution than the logSNR grid -- what the fit optimises
    out_dir = str(tmp_path / "demo")
    code, out, _ = run(capsys, "demo", "--out", out_dir, "--train-steps", "800", "--width", "32",
                       "--samples", "2000", "--fit-trajectories", "256", "--fit-refine-iters", "10", "--no-progress")
    assert code == 0
    rows = _table(out)
    assert list(rows) == ["DPM-Solver++(2M)", "DPM-Solver-fast", "DDIM", "DPM-Solver++(2M) logSNR",
                          "DPM-Solver++(2M) fitted", "DPM-Solver++ reference"], out
    assert all(math.isfinite(r["swd"]) and math.isfinite(r["ref_err"]) for r in rows.values())
    assert [r["nfe"] for r in rows.values()] == [10, 10, 10, 6, 6, 200]
    pp, ddim, ref = rows["DPM-Solver++(2M)"], rows["DDIM"], rows["DPM-Solver++ reference"]
    assert pp["swd"] < 0.8 * ddim["swd"], out
    assert pp["ref_err"] < 0.6 * ddim["ref_err"], out
    assert ref["ref_err"] == 0.0 and ref["swd"] < ddim["swd"]
    log6, fit6 = rows["DPM-Solver++(2M) logSNR"], rows["DPM-Solver++(2M) fitted"]
    assert fit6["ref_err"] < 0.8 * log6["ref_err"], out
    assert re.search(r"fitted a 6-step grid in [0-9.]+s", out), out
    ts = dpmjax.load_timesteps(os.path.join(out_dir, "grid-6.json"))
    assert ts.timesteps.shape == (7,) and np.all(np.diff(ts.timesteps) < 0) and ts.model_timesteps.shape == (6,)
    assert os.path.getsize(os.path.join(out_dir, "demo.png")) > 10_000
