"""Checkpoints of a training run with orbax-checkpoint.

Layout of a run directory::

    DIR/config.json          the TrainConfig (written atomically)
    DIR/losses.jsonl         one {"step": k, "loss": v} line per step (cut back to the
                             checkpoint's step when training resumes)
    DIR/checkpoints/<step>/  orbax checkpoints: the TrainState and a copy of the config

orbax writes each step into a temporary directory and renames it when complete, so a
run killed at any moment (even with SIGKILL) leaves its earlier checkpoints intact; the
leftover temporary directory is removed when the run is reopened. Anything else that
goes wrong while reading a checkpoint raises ``RuntimeError`` (unreadable) or
``ValueError`` (written by a different run), naming the directory; nothing falls back
silently to a fresh start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from .config import TrainConfig

CHECKPOINT_SUBDIR = "checkpoints"
LOSSES_FILE = "losses.jsonl"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0].split(" See full TensorStore details")[0] if text else ""
    return f"{type(e).__name__}: {line[:300]}"


@contextlib.contextmanager
def _quiet_orbax(level: int = logging.ERROR):
    """Raise the level of the ``absl`` logger (orbax's) within the block.

    orbax logs routine notices as warnings (opening a directory read-only says "Given
    directory is read only"), and failures at ERROR with a full traceback before it
    raises; the exception it raises is what callers see and report.
    """
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(max(level, previous))
    try:
        yield
    finally:
        logger.setLevel(previous)


class RunCheckpoints:
    """The orbax ``CheckpointManager`` of one run directory.

    Args:
      directory: the run directory (checkpoints go to ``directory/checkpoints``).
      keep: how many of the most recent checkpoints to keep.
      read_only: open without creating anything (for sampling).
    """

    def __init__(self, directory: str, *, keep: int = 3, read_only: bool = False):
        self.run_dir = os.path.abspath(directory)
        self.directory = os.path.join(self.run_dir, CHECKPOINT_SUBDIR)
        if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory} is not a directory; a run keeps its checkpoints there")
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"{self.run_dir}: no {CHECKPOINT_SUBDIR}/ directory (nothing trained here)")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,
        )
        try:
            with _quiet_orbax():
                self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:  # orbax raises a variety of errors on unreadable directories
            raise CheckpointError(f"{self.directory}: cannot open checkpoints ({_first_line(e)})") from e
        self._check_listing()

    def _check_listing(self):
        # A directory named like a step that orbax does not recognise as a finished
        # checkpoint was damaged after it was written (orbax writes to a temporary name).
        # Resuming from an older step would silently drop the newer one: refuse. (An older
        # damaged step, say one being deleted by max_to_keep when the process was killed,
        # is never restored, so it does not matter.)
        steps = set(self._manager.all_steps())
        newest = max(steps, default=-1)
        for name in os.listdir(self.directory):
            if name.isdigit() and int(name) not in steps and int(name) > newest:
                raise CheckpointError(
                    f"{self.directory}: step directory {name!r} is not a complete orbax checkpoint; "
                    "remove it to resume from an earlier step"
                )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, config: TrainConfig) -> None:
        """Save ``state`` (any pytree of arrays) and ``config`` as checkpoint ``step``, synchronously.

        Raises:
          CheckpointError: the write failed (a full disk, say). orbax writes into a
            temporary directory, so the earlier checkpoints are intact and the partial one
            is removed when the run is reopened.
        """
        try:
            with _quiet_orbax(logging.CRITICAL):
                self._manager.save(
                    int(step),
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state),
                        config=ocp.args.JsonSave(config.to_dict()),
                    ),
                    force=True,
                )
                self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"{self.directory}: cannot save checkpoint {int(step)} ({_first_line(e)})") from e

    def restore(self, step: int, abstract_state: Any, config: TrainConfig) -> Any:
        """Restore checkpoint ``step`` into the structure of ``abstract_state``.

        Raises:
          ValueError: the checkpoint was written by a run with a different config.
          CheckpointError: it is unreadable or its arrays do not fit ``abstract_state``.
        """
        where = os.path.join(self.directory, str(step))
        try:
            with _quiet_orbax(logging.CRITICAL):
                saved = self._manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
            saved_config = TrainConfig.from_dict(saved.config)
        except Exception as e:
            raise CheckpointError(f"{where}: unreadable checkpoint config ({_first_line(e)})") from e
        diff = saved_config.mismatches(config)
        if diff:
            raise ValueError(f"{where}: checkpoint was written by a different run ({'; '.join(diff)})")
        try:
            with _quiet_orbax(logging.CRITICAL):
                restored = self._manager.restore(
                    int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                ).state
        except Exception as e:
            raise CheckpointError(f"{where}: cannot restore checkpoint ({_first_line(e)})") from e
        want = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), abstract_state)
        got = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), restored)
        if jax.tree.structure(restored) != jax.tree.structure(abstract_state) or want != got:
            raise CheckpointError(f"{where}: checkpoint arrays do not match the model of this run")
        return restored

    def close(self):
        self._manager.close()


def append_losses(run_dir: str, losses: dict[int, float]) -> None:
    """Append ``{"step", "loss"}`` lines to ``run_dir/losses.jsonl``.

    Appending is not atomic: a kill can cut the last line short. :func:`truncate_losses`,
    which every (re)start of training runs first, repairs that.
    """
    if not losses:
        return
    text = "".join(json.dumps({"step": int(step), "loss": float(losses[step])}) + "\n" for step in sorted(losses))
    with open(os.path.join(run_dir, LOSSES_FILE), "a") as f:
        f.write(text)


def _parse_losses(path: str) -> dict[int, float]:
    out: dict[int, float] = {}
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
                out[int(rec["step"])] = float(rec["loss"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
    return out


def truncate_losses(run_dir: str, step: int) -> None:
    """Cut ``run_dir/losses.jsonl`` back to the steps before ``step`` (the checkpoint training resumes from).

    A run killed after its last checkpoint has logged steps it will run again; without
    this they would be logged twice. The file is rewritten atomically with one line per
    step in order, so a line cut short by the kill is dropped too (and cannot swallow the
    first line appended after it). Nothing is written when the file is already exact.
    """
    from .._files import write_file

    path = os.path.join(run_dir, LOSSES_FILE)
    if not os.path.exists(path):
        return
    kept = {k: v for k, v in _parse_losses(path).items() if k < step}
    text = "".join(json.dumps({"step": k, "loss": kept[k]}) + "\n" for k in sorted(kept))
    with open(path, "rb") as f:
        if f.read() == text.encode("utf-8"):
            return
    write_file(path, lambda f: f.write(text.encode("utf-8")))


def read_losses(run_dir: str) -> dict[int, float]:
    """``{step: loss}`` from ``run_dir/losses.jsonl`` (one line per step; a line cut short by a kill is skipped)."""
    path = os.path.join(run_dir, LOSSES_FILE)
    if not os.path.exists(path):
        return {}
    return _parse_losses(path)
