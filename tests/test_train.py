"""Data, loss, training loop, checkpoints and exact resumption (``dpmjax.train``)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.train import (CheckpointError, DATASETS, SCHEDULES, TrainConfig, Trainer, diffusion_loss,
                          get_dataset, make_schedule, read_losses, sliced_wasserstein)
from dpmjax.train.trainer import load_trained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The model `dpmjax train --data moons --width 16 --depth 1` builds.
TINY_MLP = {"kind": "mlp", "data_dim": 2, "width": 16, "depth": 1, "temb_dim": 64, "time_scale": 1000.0}
STEPS = 1_000_000  # runs are stopped early with stop_at (or a signal); the lr schedule is the long run's
N = 40  # steps of the reference run


def tiny(**overrides):
    kw = dict(data="moons", steps=STEPS, batch_size=32, learning_rate=0.02, checkpoint_every=10, keep_checkpoints=3,
              model=TINY_MLP)
    kw.update(overrides)
    return TrainConfig(**kw)


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def reference():
    """An uninterrupted in-memory run of the tiny config."""
    trainer = Trainer(tiny(), None)
    return trainer, trainer.train(progress=False, stop_at=N)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, reference):
    """The same run, checkpointed to a directory."""
    d = str(tmp_path_factory.mktemp("run"))
    result = Trainer(tiny(), d).train(progress=False, stop_at=N)
    return d, result


# -- data and metric -----------------------------------------------------------------------


@pytest.mark.parametrize("name", [d for d in DATASETS if d != "digits"])
def test_toy_data_sets(name):
    ds = get_dataset(name)
    x, labels = ds.sample(jax.random.key(0), 4000)
    assert labels is None and x.shape == (4000, 2) and bool(jnp.all(jnp.isfinite(x)))
    std = np.asarray(x.std(0))
    assert np.all((std > 0.6) & (std < 1.4)), std  # roughly unit scale
    assert np.all(np.abs(np.asarray(x.mean(0))) < 0.5)
    np.testing.assert_array_equal(x, ds.sample(jax.random.key(0), 4000)[0])  # a function of the key
    assert not np.allclose(x, ds.sample(jax.random.key(1), 4000)[0])


@pytest.mark.slow
def test_digits_data():
    ds = get_dataset("digits")
    x, labels = ds.sample(jax.random.key(0), 500)
    assert x.shape == (500, 8, 8, 1) and labels.shape == (500,) and ds.num_classes == 10
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert set(np.unique(labels)) == set(range(10))


def test_unknown_data_set():
    with pytest.raises(ValueError, match="unknown data set 'mnist'.*moons"):
        get_dataset("mnist")


def test_sliced_wasserstein_of_a_shift():
    # projections of a shift c onto uniform directions: E (theta . c)^2 = |c|^2 / d
    x = jax.random.normal(jax.random.key(0), (200, 2))
    key = jax.random.key(1)
    assert float(sliced_wasserstein(x, x, key)) == 0.0
    shifted = float(sliced_wasserstein(x, x + jnp.array([1.0, 0.0]), key, num_projections=2048))
    assert abs(shifted - 1 / np.sqrt(2)) < 0.02
    far = float(sliced_wasserstein(x, 3.0 * x, key, num_projections=2048))
    assert abs(far - 2.0 * float(jnp.sqrt(jnp.mean(x**2)))) < 0.1  # |3x - x| projected: 2 |x| / sqrt(d)
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein(x, x[:10], key)


@pytest.mark.slow
@pytest.mark.parametrize("schedule_name", SCHEDULES)
def test_loss_of_the_exact_noise_predictor(schedule_name):
    # Gaussian data N(0, s^2 I): E[eps | x_t] = sigma x_t / (alpha^2 s^2 + sigma^2) and its loss (a mean
    # over samples and coordinates) is E_t[alpha^2 s^2 / (alpha^2 s^2 + sigma^2)], t ~ U[t_eps, T];
    # the zero predictor's is 1. The network sees model_time(t) (t N - 1 for the discrete schedule).
    schedule, s, d, n = make_schedule(schedule_name), 0.5, 2, 200_000
    x0 = s * jax.random.normal(jax.random.key(0), (n, d))

    def exact(params, x, t_model, condition=None):
        t = schedule.solver_time(t_model)
        a, sg = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
        return sg * x / (a**2 * s**2 + sg**2)

    loss = float(diffusion_loss(exact, None, schedule, x0, None, jax.random.key(1), num_classes=0, label_dropout=0.0))
    t = jnp.linspace(schedule.t_eps, schedule.T, 100_001)
    a2 = schedule.alpha(t) ** 2
    expected = float(jnp.mean(a2 * s**2 / (a2 * s**2 + schedule.sigma(t) ** 2)))
    assert abs(loss - expected) < 0.02 * expected
    zero = float(diffusion_loss(lambda p, x, t, c=None: jnp.zeros_like(x), None, schedule, x0, None,
                                jax.random.key(1), num_classes=0, label_dropout=0.0))
    assert abs(zero - 1.0) < 0.02


# -- training ----------------------------------------------------------------------------------


def test_training_reduces_the_loss(reference):
    trainer, result = reference
    before = trainer.eval_loss(trainer.init_state().params)
    assert abs(before - 1.0) < 0.05  # the output layer starts at zero: mean eps^2 = 1
    assert trainer.eval_loss(result.state.params) < 0.8 * before
    losses = [result.losses[k] for k in range(N)]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_checkpoint_round_trip(saved_run, reference):
    d, result = saved_run
    assert leaves_equal(result.state, reference[1].state)  # checkpointing does not change the run
    with open(os.path.join(d, "config.json")) as f:
        assert TrainConfig.from_dict(json.load(f)) == tiny().resolved()
    assert sorted(int(s) for s in os.listdir(os.path.join(d, "checkpoints"))) == [20, 30, 40]  # keep 3
    trainer, state = load_trained(d)
    assert int(state.step) == N and leaves_equal(state, result.state)
    _, state20 = load_trained(d, step=20)
    assert int(state20.step) == 20
    with pytest.raises(ValueError, match="step 7"):
        load_trained(d, step=7)
    assert read_losses(d) == reference[1].losses


@pytest.mark.slow
def test_resume_after_interruption_repeats_the_losses(tmp_path, reference):
    d = str(tmp_path / "run")
    Trainer(tiny(), d).train(progress=False, stop_at=25)
    shutil.rmtree(os.path.join(d, "checkpoints", "25"))  # as if killed after the checkpoint at 20
    resumed = Trainer(tiny(), d).train(progress=False, stop_at=N)
    assert resumed.start_step == 20
    assert resumed.losses == {k: v for k, v in reference[1].losses.items() if k >= 20}
    assert leaves_equal(resumed.state, reference[1].state)
    assert read_losses(d) == reference[1].losses  # the re-run steps overwrite the logged ones


def test_a_different_run_in_the_same_directory_is_refused(saved_run):
    d, _ = saved_run
    with pytest.raises(ValueError, match=f"{d}.*seed: 0 != 3"):
        Trainer(tiny(seed=3), d)
    # bookkeeping may change
    Trainer(tiny(checkpoint_every=7, keep_checkpoints=5), d)


def test_a_checkpoint_of_another_run_is_refused(tmp_path, saved_run):
    d = str(tmp_path / "edited")
    shutil.copytree(saved_run[0], d)
    other = tiny(model={**TINY_MLP, "width": 8})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(other.to_dict(), f)  # the config says width 8; the checkpoints hold width 16
    with pytest.raises(ValueError, match=r"checkpoints[/\\]40.*different run.*width"):
        Trainer(other, d).train(progress=False, stop_at=N)


def _corrupt_arrays(step_dir):
    n = 0
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            if os.sep + "d" in root:  # ocdbt data files
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"not a checkpoint")
                n += 1
    assert n > 0


# orbax's failed read of the garbage arrays leaves an asyncio callback behind; it is not ours
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["arrays", "missing", "config"])
def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path, saved_run, damage):
    d = str(tmp_path / "corrupt")
    shutil.copytree(saved_run[0], d)
    step_dir = os.path.join(d, "checkpoints", "40")
    if damage == "arrays":
        _corrupt_arrays(step_dir)
        error, match = CheckpointError, "checkpoints[/\\\\]40: cannot restore"
    elif damage == "missing":
        shutil.rmtree(os.path.join(step_dir, "state"))
        error, match = CheckpointError, "checkpoints[/\\\\]40: cannot restore"
    else:
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write("{ truncated")
        error, match = ValueError, "config.json: corrupt run config"
    with pytest.raises(error, match=match):
        Trainer(tiny(), d).train(progress=False, stop_at=N)
    with pytest.raises(error, match=match):
        load_trained(d)
    assert issubclass(CheckpointError, RuntimeError)


# -- a real process, really interrupted --------------------------------------------------------


def _wait_for_checkpoint(run_dir, proc, at_least, timeout=120.0):
    deadline = time.monotonic() + timeout
    ckpts = os.path.join(run_dir, "checkpoints")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        if os.path.isdir(ckpts):
            steps = [int(s) for s in os.listdir(ckpts) if s.isdigit()]
            if steps and max(steps) >= at_least:
                return max(steps)
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


@pytest.mark.slow
def test_sigint_stops_after_the_step_and_saves_it(tmp_path, reference):
    d = str(tmp_path / "interrupted")
    trainer = Trainer(tiny(), d)

    def interrupt_after_first_checkpoint():
        while not trainer.checkpoints.all_steps():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt_after_first_checkpoint, daemon=True)
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        trainer.train(progress=False, stop_at=STEPS)
    thread.join()
    stopped_at = max(read_losses(d)) + 1
    assert Trainer(tiny(), d).checkpoints.latest_step() == stopped_at  # saved, though not a multiple of 10
    resumed = Trainer(tiny(), d).train(progress=False, stop_at=stopped_at + 5)
    straight = Trainer(tiny(), None).train(progress=False, stop_at=stopped_at + 5)
    assert resumed.start_step == stopped_at
    assert resumed.losses == {k: v for k, v in straight.losses.items() if k >= stopped_at}
    assert leaves_equal(resumed.state, straight.state)


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path):
    # a real `dpmjax train` process, killed with SIGKILL after its second checkpoint
    d = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "dpmjax", "train", "--data", "moons", "--steps", str(STEPS), "--width", "16",
           "--depth", "1", "--batch-size", "32", "--lr", "0.02", "--checkpoint-every", "20", "--keep-checkpoints", "2",
           "--out", d, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    ckpts = os.path.join(d, "checkpoints")
    while True:
        assert proc.poll() is None, f"training exited early: {proc.communicate()}"
        if os.path.isdir(ckpts) and any(s.isdigit() and int(s) >= 40 for s in os.listdir(ckpts)):
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint appeared in time")
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    config = TrainConfig.from_dict(json.load(open(os.path.join(d, "config.json"))))
    assert config.mismatches(tiny().resolved()) == []
    trainer = Trainer(config, d)
    last = trainer.checkpoints.latest_step()
    assert last >= 40 and last % 20 == 0
    resumed = trainer.train(progress=False, stop_at=last + 10)
    assert resumed.start_step == last
    straight = Trainer(config, None).train(progress=False, stop_at=last + 10)
    assert resumed.losses == {k: v for k, v in straight.losses.items() if k >= last}
    assert leaves_equal(resumed.state, straight.state)
    # every loss the killed process logged is that of the uninterrupted run too
    logged = read_losses(d)
    assert set(logged) >= set(range(last + 10))
    np.testing.assert_array_equal([logged[k] for k in range(last + 10)],
                                  [straight.losses[k] for k in range(last + 10)])


_KILLED_WHILE_LOGGING = """
import json, os, signal, sys
from dpmjax.train import TrainConfig, Trainer, checkpoint
append = checkpoint.append_losses
def append_then_die(run_dir, losses):  # after the checkpoint of step 20: log 20..29, half a line, die
    append(run_dir, losses)
    if max(losses) >= 20:
        with open(os.path.join(run_dir, checkpoint.LOSSES_FILE), "a") as f:
            f.write('{"step": 30, "lo')
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.append_losses = append_then_die
Trainer(TrainConfig.from_dict(json.loads(sys.argv[2])), sys.argv[1]).train(progress=False, stop_at=40)
"""


@pytest.mark.slow
def test_kill9_after_a_checkpoint_then_resume_logs_each_step_once(tmp_path, reference):
    # SIGKILL while logging the steps after the checkpoint of step 20 (they run again on resume),
    # with the last line cut short: the resumed run's losses.jsonl has one line per step, in order,
    # each the uninterrupted run's loss
    d = str(tmp_path / "killed")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _KILLED_WHILE_LOGGING, d, json.dumps(tiny().to_dict())], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    path = os.path.join(d, "losses.jsonl")
    with open(path) as f:
        text = f.read()
    assert not text.endswith("\n") and [json.loads(l)["step"] for l in text.splitlines()[:-1]] == list(range(30))
    trainer = Trainer(tiny(), d)
    assert trainer.checkpoints.latest_step() == 20
    resumed = trainer.train(progress=False, stop_at=N)
    trainer.close()
    assert resumed.start_step == 20
    with open(path) as f:
        text = f.read()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]
    assert [rec["step"] for rec in records] == list(range(N))
    assert [rec["loss"] for rec in records] == [reference[1].losses[k] for k in range(N)]


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_run_files_get_the_permissions_the_umask_gives(tmp_path, mask, mode):
    from dpmjax.train.checkpoint import truncate_losses

    old = os.umask(mask)
    try:
        d = str(tmp_path / "run")
        trainer = Trainer(tiny(), d)
        trainer.train(progress=False, stop_at=10)
        trainer.close()
        with open(os.path.join(d, "losses.jsonl"), "a") as f:
            f.write('{"step": 10')  # cut short: the next start rewrites the file
        truncate_losses(d, 10)
        assert sorted(read_losses(d)) == list(range(10))
        for name in ("config.json", "losses.jsonl"):
            assert os.stat(os.path.join(d, name)).st_mode & 0o777 == mode, name
    finally:
        os.umask(old)
