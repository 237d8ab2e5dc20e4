"""Training a noise-prediction network under a dpmjax schedule.

Loss (Ho et al. 2020, "simple" loss; Kingma et al. 2021 for continuous time)::

    t ~ U[t_eps, T],  eps ~ N(0, I),  x_t = alpha(t) x_0 + sigma(t) eps,
    L = E || eps_theta(x_t, model_time(t)[, c]) - eps ||^2

with labels replaced by the null class with probability ``label_dropout`` for
classifier-free guidance. Optimiser: AdamW with linear warm-up and cosine decay, after
global-norm gradient clipping; an exponential moving average (EMA) of the parameters
is kept for sampling.

One step is one jitted pure function ``(state, schedule, key) -> (state, loss)`` of a
:class:`TrainState` pytree; the batch, times and noise of step ``k`` come from
``fold_in(key(seed), k)``, so a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..nets import as_model_fn, build_model
from . import checkpoint as ckpt
from .config import TrainConfig, make_schedule, read_config, write_config
from .data import get_dataset


class TrainState(NamedTuple):
    """Everything that changes during training."""

    step: jax.Array  # int32 scalar: number of updates applied
    params: Any  # nnx.State
    ema_params: Any  # nnx.State
    opt_state: Any


class TrainResult(NamedTuple):
    state: TrainState
    losses: dict  # {step: loss} for the steps run by this call
    start_step: int  # the step this call started (or resumed) from


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with warm-up + cosine decay to 1% of the peak rate."""
    warmup = min(int(config.warmup_steps), int(config.steps) - 1)
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=max(warmup, 0),
        decay_steps=int(config.steps), end_value=0.01 * config.learning_rate,
    )
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(lr, weight_decay=config.weight_decay),
    )


def diffusion_loss(model_fn, params, schedule, x0, labels, key, *, num_classes: int, label_dropout: float):
    """Mean squared error of the noise prediction at random times (see module docstring)."""
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    b = x0.shape[0]
    t = jax.random.uniform(k_t, (b,), minval=schedule.t_eps, maxval=schedule.T)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    bshape = (b,) + (1,) * (x0.ndim - 1)
    x_t = schedule.alpha(t).reshape(bshape) * x0 + schedule.sigma(t).reshape(bshape) * eps
    condition = None
    if labels is not None:
        drop = jax.random.bernoulli(k_drop, label_dropout, (b,))
        condition = jnp.where(drop, num_classes, labels)
    pred = model_fn(params, x_t, schedule.model_time(t), condition)
    return jnp.mean((pred - eps) ** 2)


def _make_step(config, ds, model_fn, tx):
    """The jitted ``train_step(state, schedule, key) -> (state, loss)``."""
    ema_decay = float(config.ema_decay)

    def train_step(state: TrainState, schedule, key):
        k_data, k_loss = jax.random.split(jax.random.fold_in(key, state.step))
        x0, labels = ds.sample(k_data, config.batch_size)

        def loss_fn(params):
            return diffusion_loss(model_fn, params, schedule, x0, labels, k_loss,
                                  num_classes=ds.num_classes, label_dropout=config.label_dropout)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA with the usual warm-up, decay = min(ema_decay, (1 + k) / (10 + k)).
        k = state.step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + k) / (10.0 + k))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        return TrainState(state.step + 1, params, ema, opt_state), loss

    return jax.jit(train_step)


def _config_key(config: TrainConfig) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in TrainConfig.BOOKKEEPING}
    return json.dumps(d, sort_keys=True)


@functools.lru_cache(maxsize=8)
def _build(key: str):
    """Network, initial parameters, optimiser and jitted step for a config (cached by its JSON).

    Trainers of the same run (a resumed one, or one rebuilt for sampling) share the
    compiled step and the same ``model_fn`` object, so neither training nor
    :func:`dpmjax.sample` compiles again.
    """
    config = TrainConfig.from_dict(json.loads(key))
    graphdef, params = nnx.split(build_model(config.model, seed=config.seed))
    model_fn = as_model_fn(graphdef)
    tx = make_optimizer(config)
    ds = get_dataset(config.data)
    step_fn = _make_step(config, ds, model_fn, tx)

    @functools.partial(jax.jit, static_argnames=("n",))
    def eval_fn(params, schedule, key, n):
        k_data, k_loss = jax.random.split(key)
        x0, labels = ds.sample(k_data, n)
        return diffusion_loss(model_fn, params, schedule, x0, labels, k_loss, num_classes=ds.num_classes,
                              label_dropout=0.0)

    return graphdef, params, model_fn, tx, step_fn, eval_fn


class Trainer:
    """A training run, optionally tied to a directory for checkpoints.

    Args:
      config: the run config (see :class:`TrainConfig`).
      directory: run directory, or ``None`` for an in-memory run. If it already holds a
        run, the configs must agree (bookkeeping fields aside) and training resumes from
        its latest checkpoint.

    Example::

        trainer = Trainer(TrainConfig(data="moons", steps=2000), "runs/moons")
        result = trainer.train()
        x = dpmjax.sample(trainer.model_fn, result.state.ema_params, key, (1000, 2),
                          schedule=trainer.schedule)
    """

    def __init__(self, config: TrainConfig, directory: Optional[str] = None):
        self.config = config.resolved()
        self.directory = None if directory is None else os.path.abspath(directory)
        self.dataset = get_dataset(self.config.data)
        self.schedule = make_schedule(self.config.schedule)
        self._key = jax.random.key(self.config.seed)
        built = _build(_config_key(self.config))
        self.graphdef, self._init_params, self.model_fn, self.tx, self._step_fn, self._eval_fn = built
        self._checkpoints = None
        if self.directory is not None:
            self._open_directory()

    # -- construction -----------------------------------------------------------------

    def _open_directory(self):
        config_path = os.path.join(self.directory, "config.json")
        ckpt_dir = os.path.join(self.directory, ckpt.CHECKPOINT_SUBDIR)
        if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
            raise ValueError(f"{self.directory} exists and is not a directory")
        if os.path.lexists(ckpt_dir) and not os.path.isdir(ckpt_dir):
            raise ckpt.CheckpointError(f"{ckpt_dir} is not a directory; a run keeps its checkpoints there")
        if os.path.exists(config_path):
            saved = read_config(self.directory).resolved()
            diff = saved.mismatches(self.config)
            if diff:
                raise ValueError(
                    f"{self.directory} holds a different run ({'; '.join(diff)}); "
                    "use another --out directory or the same settings"
                )
        elif os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
            raise ckpt.CheckpointError(f"{self.directory}: checkpoints without config.json; refusing to guess the run")
        write_config(self.directory, self.config)
        self._checkpoints = ckpt.RunCheckpoints(self.directory, keep=self.config.keep_checkpoints)

    def init_state(self) -> TrainState:
        params = self._init_params
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=self.tx.init(params),
        )

    def step(self, state: TrainState) -> tuple[TrainState, jax.Array]:
        """One jitted training step."""
        return self._step_fn(state, self.schedule, self._key)

    def eval_loss(self, params, *, n: int = 2048, seed: int = 12345) -> float:
        """The loss of ``params`` on a fixed batch, times and noise (a deterministic yardstick)."""
        return float(self._eval_fn(params, self.schedule, jax.random.key(seed), n))

    # -- checkpoints ------------------------------------------------------------------

    @property
    def checkpoints(self) -> Optional[ckpt.RunCheckpoints]:
        """The run's checkpoints (``None`` for an in-memory run)."""
        return self._checkpoints

    def close(self) -> None:
        """Release the checkpoint manager (its background threads)."""
        if self._checkpoints is not None:
            self._checkpoints.close()

    def abstract_state(self):
        return jax.eval_shape(self.init_state)

    def restore(self, step: Optional[int] = None) -> Optional[TrainState]:
        """The state of checkpoint ``step`` (default: latest); ``None`` if the run has none."""
        if self._checkpoints is None:
            return None
        if step is None:
            step = self._checkpoints.latest_step()
            if step is None:
                return None
        state = self._checkpoints.restore(step, self.abstract_state(), self.config)
        if int(state.step) != int(step):
            raise ckpt.CheckpointError(
                f"{self._checkpoints.directory}/{step}: holds the state of step {int(state.step)}")
        return state

    def save(self, state: TrainState) -> None:
        if self._checkpoints is not None:
            self._checkpoints.save(int(state.step), state, self.config)

    # -- the loop ---------------------------------------------------------------------

    def train(self, *, stop_at: Optional[int] = None, progress: bool = True,
              state: Optional[TrainState] = None) -> TrainResult:
        """Run (or resume) training up to ``stop_at`` (default ``config.steps``) steps.

        Saves a checkpoint every ``checkpoint_every`` steps and at the end. SIGINT (Ctrl-C)
        and SIGTERM are deferred to the end of the current step: the state is saved, then
        ``KeyboardInterrupt`` is raised. A SIGKILL loses at most the steps since the last
        checkpoint; rerunning resumes from it with the same losses, after cutting
        ``losses.jsonl`` back to it (one line per step, see :func:`checkpoint.truncate_losses`).
        """
        from tqdm.auto import tqdm

        stop = int(self.config.steps if stop_at is None else stop_at)
        if state is None:
            state = self.restore()
        if state is None:
            state = self.init_state()
        start = int(state.step)
        if self.directory is not None:  # steps logged after the checkpoint will run again
            ckpt.truncate_losses(self.directory, start)
        losses: dict[int, float] = {}
        pending: list[tuple[int, jax.Array]] = []
        last_saved = start if self._checkpoints is not None and start in self._checkpoints.all_steps() else None
        every = int(self.config.checkpoint_every)

        def flush():
            new = {k: float(v) for k, v in pending}
            pending.clear()
            losses.update(new)
            if self.directory is not None:
                ckpt.append_losses(self.directory, new)
            return new

        bar = tqdm(total=stop, initial=start, unit="step", disable=not progress or start >= stop, dynamic_ncols=True,
                   desc=f"train {self.config.data}")
        running = None
        k = start
        with _DeferredInterrupt() as interrupt:
            try:
                while k < stop and not interrupt.requested:
                    state, loss = self.step(state)
                    pending.append((k, loss))
                    k += 1
                    if len(pending) >= 50 or k == stop or k % every == 0:
                        new = flush()
                        for v in new.values():
                            running = v if running is None else 0.95 * running + 0.05 * v
                        bar.update(len(new))
                        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
                    if k % every == 0 and k != last_saved:
                        self.save(state)
                        last_saved = k
                flush()
                if self._checkpoints is not None and k != last_saved:
                    self.save(state)
            finally:
                bar.close()
        if interrupt.requested:
            raise KeyboardInterrupt(f"training interrupted at step {k}")
        return TrainResult(state, losses, start)


class _DeferredInterrupt:
    """Within the block, SIGINT and SIGTERM set ``requested`` instead of ending the program.

    Only in the main thread (where Python delivers signals); elsewhere a no-op.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False


def load_trained(directory: str, *, step: Optional[int] = None) -> tuple[Trainer, TrainState]:
    """Rebuild the run saved in ``directory`` (from its ``config.json``) and restore a checkpoint.

    Opens the checkpoints read-only. Returns ``(trainer, state)``; sample with
    ``trainer.model_fn`` and ``state.ema_params`` under ``trainer.schedule``.

    Raises:
      FileNotFoundError: ``directory`` is not a training directory or holds no checkpoint.
      ValueError / CheckpointError: the config or the checkpoint is corrupt or mismatched.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    config = read_config(directory)
    trainer = Trainer(config, None)
    trainer.directory = directory
    trainer._checkpoints = ckpt.RunCheckpoints(directory, keep=config.keep_checkpoints, read_only=True)
    steps = trainer._checkpoints.all_steps()
    if not steps:
        raise FileNotFoundError(f"{directory}: no checkpoint saved yet")
    if step is not None and step not in steps:
        raise ValueError(f"{directory}: no checkpoint for step {step}; saved steps are {steps}")
    return trainer, trainer.restore(step)
