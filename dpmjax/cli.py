"""Command line: ``dpmjax demo | train | sample | fit-steps``.

``dpmjax demo`` trains a small MLP on the two-moons data on the CPU (about a minute
on two cores), then samples it with DPM-Solver++(2M), DPM-Solver-fast and DDIM at 10
model evaluations, with DPM-Solver++(2M) at 6 evaluations on the logSNR grid and on a
grid fitted to the trained model (``dpmjax.fit_timesteps``, on noise of its own), and
with a 200-evaluation DPM-Solver++ reference, printing the sliced Wasserstein distance
of each to the data and writing a side-by-side picture.

What the command line promises:

* every user error (arguments, paths, data sets, checkpoints, a full disk) ends the
  program with exit status 2 and one line on stderr, never a traceback; an unexpected
  internal error prints one line too and exits with status 1 (``DPMJAX_TRACEBACK=1``
  shows its traceback);
* output paths are checked before any work: a missing parent directory, a directory or
  device given as a file, a read-only file or a path inside the run directory is
  refused; an existing file is replaced only when it was named with ``--out`` (not a
  default name);
* every file is written to a temporary file in the same directory and moved into place
  (``os.replace``), so a failed write leaves the previous file as it was; the statistics of
  ``compute-ems`` replace their directory as one unit; files get the permissions the umask
  gives new files;
* a command whose packages are not installed (the ``train`` and ``demo`` extras) says
  which extra to install, in one line, before doing anything;
* an interrupted ``train`` (Ctrl-C) saves a checkpoint first and resumes when the same
  command is run again; rerunning a finished run says so and does nothing.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

PROG = "dpmjax"
MAX_SEED = 2**32 - 1
ADAPTIVE_DEFAULTS = {"rtol": 0.05, "atol": 0.0078, "max_nfe": 10000}


class _UsageError(Exception):
    """An error to report as one line with exit status 2."""


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option whose help does not state its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or isinstance(
                action, (argparse._StoreTrueAction, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)".strip()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, exit status 2 (argparse's default prints the usage too)
        raise _UsageError(f"{self.prog}: error: {message}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _seed(text: str) -> int:
    value = _nonnegative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in 0..{MAX_SEED}, got {text!r}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    from .train.config import SCHEDULES
    from .train.data import DATASETS

    import dpmjax

    parser = _Parser(prog=PROG, description="DPM-Solver samplers in JAX: demo, training and sampling.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="train a 2-D model on the CPU and compare samplers at 10 and 6 NFE",
                          description="Train (or resume) a small MLP on 2-D data and compare samplers; writes "
                                      "OUT/run-DATA-STEPS/ (the training run), OUT/grid-6.json (the fitted grid) "
                                      "and OUT/demo.png (the samples side by side).")
    demo.add_argument("--out", default=os.path.join("out", "demo"), help="output directory")
    demo.add_argument("--train-steps", type=_positive_int, default=5000, help="training steps")
    demo.add_argument("--data", choices=[d for d in DATASETS if d != "digits"], default="moons", help="2-D data set")
    demo.add_argument("--samples", type=_positive_int, default=4000, help="samples per method")
    demo.add_argument("--seed", type=_seed, default=0, help="seed of the run and of the sampling noise")
    demo.add_argument("--width", type=_positive_int, default=None, help="MLP width (default: 64)")
    demo.add_argument("--depth", type=_positive_int, default=None, help="MLP residual blocks (default: 3)")
    demo.add_argument("--batch-size", type=_positive_int, default=None, help="training batch (default: 256)")
    demo.add_argument("--fit-trajectories", type=_positive_int, default=1024,
                      help="reference trajectories of the fitted 6-NFE grid")
    demo.add_argument("--fit-refine-iters", type=_nonnegative_int, default=200,
                      help="gradient refinement steps of the fitted grid")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    train = sub.add_parser("train", help="train a network, with resumable checkpoints")
    train.add_argument("--data", choices=DATASETS, default=None, help="data set (required for a new run; "
                       "default: the run's own when --out holds one)")
    train.add_argument("--out", default=None, help="run directory (default: runs/<data>)")
    train.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: 5000)")
    train.add_argument("--seed", type=_seed, default=None, help="seed of the run (default: 0)")
    train.add_argument("--schedule", choices=SCHEDULES, default=None, help="noise schedule (default: linear)")
    train.add_argument("--batch-size", type=_positive_int, default=None,
                       help="(default: 256 for 2-D data, 64 for digits)")
    train.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate (default: 0.002)")
    train.add_argument("--width", type=_positive_int, default=None, help="MLP width (2-D data; default: 64)")
    train.add_argument("--depth", type=_positive_int, default=None, help="MLP residual blocks (2-D data; default: 3)")
    train.add_argument("--channels", type=_positive_int, default=None, help="UNet base channels (digits; default: 16)")
    train.add_argument("--checkpoint-every", type=_positive_int, default=None, help="steps between checkpoints "
                       "(default: 1000)")
    train.add_argument("--keep-checkpoints", type=_positive_int, default=None, help="checkpoints kept (default: 3)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    sample = sub.add_parser("sample", help="sample a trained checkpoint")
    sample.add_argument("--checkpoint", required=True, help="run directory written by `dpmjax train` (required)")
    sample.add_argument("--step", type=_nonnegative_int, default=None, help="checkpoint step (default: latest)")
    sample.add_argument("--algorithm", choices=dpmjax.ALGORITHMS, default=None,
                        help="(default: the --timesteps grid's, else dpmsolver++)")
    sample.add_argument("--method", choices=dpmjax.METHODS, default=None,
                        help="(default: the --timesteps grid's, else multistep; v3 needs --ems)")
    sample.add_argument("--ems", default=None,
                        help="DPM-Solver-v3's statistics, a directory written by `dpmjax compute-ems` "
                             "(with --method v3; default: none)")
    sample.add_argument("--order", type=int, choices=(1, 2, 3), default=None,
                        help="(default: the --timesteps grid's, else 2)")
    sample.add_argument("--steps", type=_positive_int, default=10, help="model evaluations (NFE)")
    sample.add_argument("--skip-type", choices=dpmjax.SKIP_TYPES, default="logSNR",
                        help="time grid (the Python API's default is time_uniform; logSNR is more accurate)")
    sample.add_argument("--rtol", type=_positive_float, default=None,
                        help=f"relative tolerance of --method adaptive (default: {ADAPTIVE_DEFAULTS['rtol']})")
    sample.add_argument("--atol", type=_positive_float, default=None,
                        help=f"absolute tolerance of --method adaptive (default: {ADAPTIVE_DEFAULTS['atol']})")
    sample.add_argument("--max-nfe", type=_positive_int, default=None,
                        help="model evaluations --method adaptive may spend; sampling fails if it runs out "
                             f"(default: {ADAPTIVE_DEFAULTS['max_nfe']})")
    sample.add_argument("--guidance-scale", type=_finite_float, default=None,
                        help="classifier-free guidance scale (class-conditional models; default: 2)")
    sample.add_argument("--class", dest="class_", type=_nonnegative_int, default=None,
                        help="sample only this class (default: a grid of all classes)")
    sample.add_argument("--num", type=_positive_int, default=None,
                        help="number of samples (default: 2000 points, or 8 images per class)")
    sample.add_argument("--seed", type=_seed, default=0, help="seed of the starting noise")
    sample.add_argument("--no-ema", action="store_true", help="use the raw instead of the EMA parameters")
    sample.add_argument("--out", default=None, help="image to write (default: samples.png, which is not replaced "
                        "if it exists; a file named with --out is)")
    sample.add_argument("--solver", default=None,
                        help="a solver file written by `dpmjax fit-solver` (fixes the method, grid and NFE; "
                             "default: none, the solver of the options below)")
    sample.add_argument("--timesteps", default=None,
                        help="time grid file from `dpmjax fit-steps` (JSON or .npy); sets --steps to its length - 1 "
                             "and the solver to the one it was fitted for (default: none, use --skip-type)")

    fit = sub.add_parser("fit-steps", help="fit a time grid to a trained 2-D model (dpmjax.fit_timesteps)")
    fit.add_argument("--checkpoint", required=True, help="run directory written by `dpmjax train` (required)")
    fit.add_argument("--algorithm", choices=("dpmsolver++", "dpmsolver"), default="dpmsolver++",
                     help="solver the grid is fitted for")
    fit.add_argument("--method", choices=("multistep", "unipc"), default="multistep",
                     help="solver the grid is fitted for; `dpmjax sample --timesteps` uses the same one")
    fit.add_argument("--order", type=int, choices=(1, 2, 3), default=2, help="solver order")
    fit.add_argument("--steps", type=_positive_int, default=6, help="model evaluations (NFE) of the grid")
    fit.add_argument("--trajectories", type=_positive_int, default=1024, help="reference trajectories")
    fit.add_argument("--candidates", type=_positive_int, default=40, help="candidate grid intervals")
    fit.add_argument("--refine-iters", type=_nonnegative_int, default=200,
                     help="gradient refinement steps (0: the dynamic program's grid)")
    fit.add_argument("--grid-only", action="store_true",
                     help="fit only the solver's grid, not the network's time input at each step")
    fit.add_argument("--seed", type=_seed, default=0, help="seed of the fitting noise")
    fit.add_argument("--out", default=None, help="grid file to write, .json or .npy (default: timesteps.json, "
                     "which is not replaced if it exists; a file named with --out is)")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar")

    ems = sub.add_parser("compute-ems", help="compute DPM-Solver-v3's empirical model statistics of a trained 2-D "
                         "model (dpmjax.compute_ems), for `dpmjax sample --method v3 --ems DIR`")
    ems.add_argument("--checkpoint", required=True, help="run directory written by `dpmjax train` (required)")
    ems.add_argument("--lambdas", type=_positive_int, default=401,
                     help="points of the uniform logSNR grid the statistics are computed on")
    ems.add_argument("--samples", type=_positive_int, default=1024, help="training-data samples they average over")
    ems.add_argument("--smooth-dl", type=_nonnegative_int, default=5,
                     help="half-width of the moving average applied to the derivative of l (must be < --lambdas)")
    ems.add_argument("--seed", type=_seed, default=0, help="seed of the data samples and the noise")
    ems.add_argument("--out", default=None, help="directory the statistics are written as (l.npz, sb.npz, "
                     "lambdas.npy, ems.json; replaced as a whole; default: ems, which is not replaced if it exists; "
                     "a directory named with --out is, when it holds nothing but statistics)")
    ems.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_fit_solver_parser(sub)
    return parser


def _output_file(args, default: str, *protected: str) -> str:
    """``args.out`` (or ``default``), checked as an output file before any work."""
    from .train.files import check_output_file

    out = default if args.out is None else args.out
    check_output_file(out, explicit=args.out is not None, protected=protected)
    return out


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# -- train --------------------------------------------------------------------------------


def _train_config(args):
    from .train.config import TrainConfig, default_model_spec, read_config

    from .train.files import check_output_dir

    if args.out is not None and not args.out.strip():
        raise _UsageError(f"{PROG} train: error: --out must name a directory, got {args.out!r}")
    out = args.out or (os.path.join("runs", args.data) if args.data else None)
    if out is None:
        raise _UsageError(f"{PROG} train: error: --data is required (or --out of an existing run)")
    check_output_dir(out)
    if os.path.exists(os.path.join(out, "config.json")):
        base = read_config(out)
        if args.data is not None and args.data != base.data:
            raise ValueError(f"{out} holds a run on data={base.data!r}, not {args.data!r}; use another --out")
    else:
        if args.data is None:
            raise _UsageError(f"{PROG} train: error: --data is required for a new run ({out} has no config.json)")
        base = TrainConfig(data=args.data)
    fields = {"steps": args.steps, "seed": args.seed, "schedule": args.schedule, "batch_size": args.batch_size,
              "learning_rate": args.lr, "checkpoint_every": args.checkpoint_every,
              "keep_checkpoints": args.keep_checkpoints}
    cfg = base.to_dict()
    cfg.update({k: v for k, v in fields.items() if v is not None})
    model = dict(cfg["model"] or default_model_spec(cfg["data"], cfg["schedule"]))
    if args.schedule is not None and base.model is not None and args.schedule != base.schedule:
        model = default_model_spec(cfg["data"], cfg["schedule"])  # let the mismatch show on 'schedule'
    for flag, key, kind in ((args.width, "width", "mlp"), (args.depth, "depth", "mlp"),
                            (args.channels, "channels", "unet")):
        if flag is not None:
            if model["kind"] != kind:
                raise _UsageError(f"{PROG} train: error: --{key} applies to the {kind} model, "
                                  f"but data={cfg['data']!r} uses the {model['kind']} model")
            model[key] = flag
    cfg["model"] = model
    return TrainConfig.from_dict(cfg), out


def _cmd_train(args) -> int:
    from .train.trainer import Trainer

    config, out = _train_config(args)
    try:
        trainer = Trainer(config, out)
    except KeyboardInterrupt:
        print(f"{PROG} train: interrupted before the first step; nothing saved", file=sys.stderr)
        return 130
    latest = trainer.checkpoints.latest_step()
    if latest is not None and latest >= trainer.config.steps:
        trainer.close()
        print(f"{out} is already trained ({latest} of {trainer.config.steps} steps); nothing to do. "
              f"Sample it with: {PROG} sample --checkpoint {out}")
        return 0
    if latest is not None:
        print(f"resuming {out} from step {latest}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        result = trainer.train(progress=not args.no_progress)
    except KeyboardInterrupt:
        step = trainer.checkpoints.latest_step()
        where = ("before the first checkpoint; nothing saved yet" if step is None
                 else f"checkpoint at step {step} in {os.path.abspath(out)}")
        print(f"{PROG} train: interrupted {where}; run the same command to "
              f"{'start again' if step is None else 'resume'}", file=sys.stderr)
        return 130
    finally:
        trainer.close()
    state = result.state
    last = [result.losses[k] for k in sorted(result.losses)[-100:]]
    mean_loss = sum(last) / len(last) if last else float("nan")
    print(f"trained {config.data} to step {int(state.step)} in {time.perf_counter() - t0:.1f}s; "
          f"mean loss of the last {len(last)} steps {mean_loss:.4f}; checkpoints in {os.path.abspath(out)}")
    return 0


# -- sample -------------------------------------------------------------------------------


SOLVER_DEFAULTS = {"algorithm": "dpmsolver++", "method": "multistep", "order": 2}


def _load_grid(path: str):
    """The grid of ``--timesteps`` and the solver settings recorded beside it (``{}`` if none)."""
    import dpmjax

    if not os.path.exists(path):
        raise ValueError(f"--timesteps file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"--timesteps {path!r} is not a file")
    grid = dpmjax.load_timesteps(path)
    fitted_for = {}
    if not path.endswith(".npy"):
        with open(path) as f:
            doc = json.load(f)
        fitted_for = {k: doc[k] for k in SOLVER_DEFAULTS if isinstance(doc, dict) and doc.get(k) is not None}
    allowed = {"algorithm": dpmjax.ALGORITHMS, "method": dpmjax.METHODS, "order": (1, 2, 3)}
    for key, value in fitted_for.items():
        if key == "order" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"--timesteps {path}: \"order\" must be one of 1, 2, 3; got {value!r}")
        if value not in allowed[key]:
            raise ValueError(f"--timesteps {path}: {json.dumps(key)} must be one of "
                             f"{', '.join(map(str, allowed[key]))}; got {value!r}")
    return grid, fitted_for


def _solver_settings(args) -> tuple[dict, Optional[object]]:
    """algorithm / method / order: given on the command line, else the grid's, else the defaults.

    A grid fitted for another solver than the one asked for is refused: it was optimised
    for that solver's update rule, and is usually worse than a fixed grid for another.
    """
    grid, fitted_for = (None, {}) if args.timesteps is None else _load_grid(args.timesteps)
    chosen = {k: getattr(args, k) for k in SOLVER_DEFAULTS}
    clash = [f"--{k} {chosen[k]} (fitted for {fitted_for[k]})" for k in SOLVER_DEFAULTS
             if chosen[k] is not None and k in fitted_for and str(chosen[k]) != str(fitted_for[k])]
    if clash:
        raise ValueError(f"--timesteps {args.timesteps} was fitted for another solver: {', '.join(clash)}; "
                         "leave these options out to use the grid's, or fit a grid for this solver with fit-steps")
    settings = {k: chosen[k] if chosen[k] is not None else fitted_for.get(k, SOLVER_DEFAULTS[k])
                for k in SOLVER_DEFAULTS}
    settings["order"] = int(settings["order"])
    return settings, grid


def _run_sampler(args, fn, label):
    """Call ``fn(**extra)``; for ``--method adaptive`` refuse an unfinished solve and put the real NFE in the label."""
    import jax

    if args.method_resolved != "adaptive":
        return jax.block_until_ready(fn()), label
    x, info = fn(return_info=True, rtol=args.rtol, atol=args.atol, max_nfe=args.max_nfe)
    x = jax.block_until_ready(x)
    nfe = int(info["nfe"])
    if bool(info["hit_max_nfe"]):
        raise RuntimeError(f"the adaptive solver stopped after {nfe} model evaluations (--max-nfe {args.max_nfe}) "
                           f"before reaching the end time (at t = {float(info['t_final']):.4g}); raise --max-nfe "
                           "or loosen --rtol/--atol")
    if not bool(info["finished"]):
        raise RuntimeError(f"the adaptive solver stopped after {nfe} model evaluations at t = "
                           f"{float(info['t_final']):.4g}: its error estimate was not finite (does the model return "
                           "NaN?)")
    return x, label.replace("{nfe}", str(nfe))


def _write_points(out, ds, x, label, seconds, seed) -> int:
    """``sample``'s 2-D output: the samples beside fresh data (seed ``seed + 1``), their sliced
    Wasserstein distance to it in the title and the report line; non-finite samples raise."""
    import jax

    from .train import plots
    from .train.metrics import sliced_wasserstein

    ref, _ = ds.sample(jax.random.key(seed + 1), x.shape[0])
    swd = float(sliced_wasserstein(x, ref, jax.random.key(0)))
    if not math.isfinite(swd):
        raise RuntimeError(f"samples are not finite ({label})")
    plots.scatter_panels([(f"data ({ds.name})", ref), (f"{label}\nSWD to the data {swd:.4f}", x)], out,
                         suptitle="SWD: sliced Wasserstein distance to fresh data samples (lower is better)")
    print(f"wrote {out}: {x.shape[0]} samples, {label}, {seconds:.2f}s (incl. compile); "
          f"sliced Wasserstein distance to the data {swd:.4f}")
    return 0


def _write_images(out, x, label, scale, rows, seconds, note="") -> int:
    """``sample``'s image output: a grid of ``rows`` rows and the report line; non-finite samples raise."""
    import jax.numpy as jnp

    from .train import plots

    if not bool(jnp.all(jnp.isfinite(x))):
        raise RuntimeError(f"samples are not finite ({label}, guidance {scale})")
    plots.image_grid(x, out, rows=rows, title=f"{label}, guidance {scale:g}")
    print(f"wrote {out}: {x.shape[0]} images, {label}, guidance scale {scale:g}{note}, {seconds:.2f}s (incl. compile)")
    return 0


def _cmd_sample(args) -> int:
    import jax
    import jax.numpy as jnp

    import dpmjax
    from .train import plots
    from .train.trainer import load_trained

    if args.solver is not None:
        return _cmd_sample_solver(args)
    out = _output_file(args, "samples.png", args.checkpoint)
    plots.check_image_path(out)
    solver, grid = _solver_settings(args)
    args.method_resolved = solver["method"]
    given = [f"--{k.replace('_', '-')}" for k in ADAPTIVE_DEFAULTS if getattr(args, k) is not None]
    if given and solver["method"] != "adaptive":
        raise ValueError(f"{'/'.join(given)} only apply to --method adaptive; --method {solver['method']} takes a "
                         "fixed number of steps (--steps)")
    for k, v in ADAPTIVE_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    trainer, state = load_trained(args.checkpoint, step=args.step)
    trainer.close()
    ds = trainer.dataset
    params = state.params if args.no_ema else state.ema_params
    key = jax.random.key(args.seed)
    kwargs = dict(schedule=trainer.schedule, steps=args.steps, skip_type=args.skip_type, **solver)
    if (solver["method"] == "v3") != (args.ems is not None):
        raise ValueError("--method v3 and --ems go together: v3 samples with the statistics that "
                         "`dpmjax compute-ems` writes")
    if args.ems is not None:
        if grid is not None:
            raise ValueError("--method v3 takes its time steps from the --ems grid; drop --timesteps")
        kwargs["ems"] = dpmjax.load_ems(args.ems)
    name = f"{solver['algorithm']} {solver['method']} order {solver['order']}"
    nfe = "{nfe}" if solver["method"] == "adaptive" else str(args.steps)
    where = f"rtol {args.rtol:g}, atol {args.atol:g}" if solver["method"] == "adaptive" else args.skip_type
    if grid is not None:
        nfe = str(len(grid.timesteps) - 1) if solver["method"] != "adaptive" else nfe
        kwargs.update(steps=len(grid.timesteps) - 1, timesteps=grid)
        del kwargs["skip_type"]  # the grid is the time grid (sample() refuses skip_type with timesteps=)
        where = f"grid {os.path.basename(args.timesteps)}"
    label = f"{name}, {nfe} NFE, {where}"

    if ds.num_classes == 0:
        if args.class_ is not None or args.guidance_scale is not None:
            raise ValueError(f"--class/--guidance-scale need a class-conditional model; {ds.name} is unlabelled")
        n = args.num or 2000
        t0 = time.perf_counter()
        x, label = _run_sampler(
            args, lambda **kw: dpmjax.sample(trainer.model_fn, params, key, (n,) + ds.shape, **kwargs, **kw), label)
        return _write_points(out, ds, x, label, time.perf_counter() - t0, args.seed)

    if args.class_ is not None and args.class_ >= ds.num_classes:
        raise ValueError(f"--class must be in 0..{ds.num_classes - 1}, got {args.class_}")
    scale = 2.0 if args.guidance_scale is None else args.guidance_scale
    if args.class_ is None:
        per = args.num or 8
        labels = jnp.repeat(jnp.arange(ds.num_classes, dtype=jnp.int32), per)
        rows = ds.num_classes
    else:
        n = args.num or 64
        labels = jnp.full((n,), args.class_, jnp.int32)
        rows = max(1, int(math.sqrt(n)))
    null = jnp.full(labels.shape, ds.num_classes, jnp.int32)
    t0 = time.perf_counter()
    x, label = _run_sampler(args, lambda **kw: dpmjax.sample(
        trainer.model_fn, params, key, (labels.shape[0],) + ds.shape, condition=labels,
        unconditional_condition=null, guidance_scale=scale, **kwargs, **kw), label)
    return _write_images(out, x, label, scale, rows, time.perf_counter() - t0)


# -- demo ---------------------------------------------------------------------------------

DEMO_METHODS = (
    # (label, sampler keyword arguments); the last one is the reference of |x - x_ref|
    ("DPM-Solver++(2M)", dict(algorithm="dpmsolver++", method="multistep", order=2, steps=10, skip_type="logSNR")),
    ("DPM-Solver-fast", dict(algorithm="dpmsolver", method="singlestep", order=3, steps=10, skip_type="logSNR")),
    ("DDIM", dict(algorithm="dpmsolver", method="multistep", order=1, steps=10, skip_type="time_uniform")),
    ("DPM-Solver++ reference", dict(algorithm="dpmsolver++", method="multistep", order=2, steps=200,
                                    skip_type="logSNR")),
)

# The fitted-grid comparison: one solver at few steps, on the logSNR grid and on a grid fitted to the model.
DEMO_FIT_STEPS = 6
DEMO_FIT_SOLVER = dict(algorithm="dpmsolver++", method="multistep", order=2)
DEMO_FIT_LABELS = ("DPM-Solver++(2M) logSNR", "DPM-Solver++(2M) fitted")
# DPM-Solver-v3 at the same 6 NFE and order, with statistics computed from the model
# (the defaults of `dpmjax compute-ems`) and the authors' c_pseudo=False.
DEMO_V3_LABEL = "DPM-Solver-v3 logSNR"
DEMO_V3_SOLVER = dict(method="v3", order=2, c_pseudo=False)
DEMO_V3_EMS = dict(n_lambdas=401, samples=1024)


def _saved_demo_grid(path: str, settings: dict):
    """``(grid, None)`` if ``path`` holds a grid fitted with exactly ``settings``; else ``(None, why)``."""
    import dpmjax

    if not os.path.exists(path):
        return None, None
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
        grid = dpmjax.load_timesteps(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return None, f"{path} is unreadable ({_message(e)})"
    differ = sorted(k for k, v in settings.items() if not isinstance(doc, dict) or doc.get(k) != v)
    if differ:
        return None, f"{path} was fitted with other settings ({', '.join(differ)})"
    return grid, None


def run_demo(out: str, *, train_steps: int = 5000, data: str = "moons", samples: int = 4000, seed: int = 0,
             width: Optional[int] = None, depth: Optional[int] = None, batch_size: Optional[int] = None,
             progress: bool = True, log=print, fit_trajectories: int = 1024, fit_candidates: int = 40,
             fit_refine_iters: int = 200) -> dict:
    """Train (or resume) the demo model and compare the samplers; returns ``{label: result}``.

    A finished run in ``out/run-DATA-STEPS`` is reused (not trained again), and so is
    ``out/grid-6.json`` when it was fitted with the same settings to that run; the log
    says so.

    Each result has ``nfe``, ``swd`` (sliced Wasserstein distance to fresh data samples),
    ``ref_err`` (mean distance to the 200-NFE reference sample from the same noise),
    ``seconds`` (one call after compilation) and ``compile_seconds``.

    Besides the 10-NFE samplers of ``DEMO_METHODS``, DPM-Solver++(2M) runs at
    ``DEMO_FIT_STEPS`` = 6 NFE on the logSNR grid and on a grid fitted with
    :func:`dpmjax.fit_timesteps` to ``fit_trajectories`` reference trajectories from noise
    of their own (not the evaluation noise); ``fit_candidates`` and ``fit_refine_iters``
    are its ``n_candidates`` and ``refine_iters``. The fitted row also has
    ``fit_seconds`` (``None`` when the saved grid was reused), and the grid is saved to
    ``out/grid-6.json``. DPM-Solver-v3 order 2 runs at the same 6 NFE with statistics
    :func:`dpmjax.compute_ems` computes from 1024 training-data samples on 401 lambdas (its
    row has ``ems_seconds``).
    """
    import jax
    import jax.numpy as jnp

    import dpmjax
    from .train import plots
    from .train.config import TrainConfig, default_model_spec
    from .train.files import check_output_dir
    from .train.metrics import sliced_wasserstein
    from .train.trainer import Trainer

    check_output_dir(out)
    t_all = time.perf_counter()
    model = default_model_spec(data, "linear")
    model.update({k: v for k, v in (("width", width), ("depth", depth)) if v is not None})
    config = TrainConfig(data=data, steps=train_steps, seed=seed, model=model,
                         checkpoint_every=max(1, min(1000, train_steps)),
                         **({} if batch_size is None else {"batch_size": batch_size}))
    run_dir = os.path.join(out, f"run-{data}-{train_steps}")
    trainer = Trainer(config, run_dir)
    t0 = time.perf_counter()
    try:
        latest = trainer.checkpoints.latest_step()
        if latest is not None and latest >= train_steps:
            state = trainer.restore(latest)
            log(f"reusing the {model['width']}-wide, {model['depth']}-block MLP trained on {data} for {latest} steps "
                f"in {run_dir} (delete it to train again)")
        else:
            result = trainer.train(progress=progress)
            state = result.state
            done = int(state.step) - result.start_step
            resumed = f", resumed from step {result.start_step}" if result.start_step else ""
            log(f"trained a {model['width']}-wide, {model['depth']}-block MLP on {data} for {done} steps{resumed} "
                f"in {time.perf_counter() - t0:.1f}s (checkpoints: {run_dir})")
    finally:
        trainer.close()

    ds, params = trainer.dataset, state.ema_params
    shape = (samples,) + ds.shape
    noise = jax.random.normal(jax.random.key(seed + 1), shape)
    data_ref, _ = ds.sample(jax.random.key(seed + 2), samples)
    data_other, _ = ds.sample(jax.random.key(seed + 3), samples)
    proj_key = jax.random.key(seed + 4)
    results, xs = {}, {}

    def evaluate(label, kw):
        t0 = time.perf_counter()
        x = jax.block_until_ready(dpmjax.sample(trainer.model_fn, params, None, shape, schedule=trainer.schedule,
                                                noise=noise, **kw))
        compile_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        x = jax.block_until_ready(dpmjax.sample(trainer.model_fn, params, None, shape, schedule=trainer.schedule,
                                                noise=noise, **kw))
        seconds = time.perf_counter() - t0
        xs[label] = x
        return {"nfe": kw["steps"], "swd": float(sliced_wasserstein(x, data_ref, proj_key)),
                "seconds": seconds, "compile_seconds": compile_seconds}

    for label, kw in DEMO_METHODS:
        results[label] = evaluate(label, kw)

    # A 6-NFE grid fitted to this model, on fitting noise independent of the evaluation noise.
    steps = DEMO_FIT_STEPS
    fit_noise = jax.random.normal(jax.random.key(seed + 5), (fit_trajectories,) + ds.shape)
    grid_path = os.path.join(out, f"grid-{steps}.json")
    grid_settings = dict(steps=steps, **DEMO_FIT_SOLVER, data=data, seed=seed, checkpoint=os.path.abspath(run_dir),
                         trainer_steps=int(state.step), trajectories=fit_trajectories, n_candidates=fit_candidates,
                         refine_iters=fit_refine_iters)
    grid, why = _saved_demo_grid(grid_path, grid_settings)
    fit_seconds = None
    if grid is not None:
        log(f"reusing the {steps}-step grid in {grid_path}, fitted with the same settings (delete it to fit again)")
    else:
        if why:
            log(f"fitting a new {steps}-step grid: {why}")
        t0 = time.perf_counter()
        extra = {"progress": progress} if _accepts(dpmjax.fit_timesteps, "progress") else {}
        grid, info = dpmjax.fit_timesteps(trainer.model_fn, params, None, fit_noise.shape, schedule=trainer.schedule,
                                          steps=steps, noise=fit_noise, n_candidates=fit_candidates,
                                          refine_iters=fit_refine_iters, return_info=True, **DEMO_FIT_SOLVER,
                                          **extra)
        grid = jax.block_until_ready(grid)
        fit_seconds = time.perf_counter() - t0
        dpmjax.save_timesteps(grid_path, grid, **grid_settings)
        start_losses = info.get("start_losses", {})
        errs = ""
        if start_losses:
            errs = (f"; RMS error to the fine solution on the fitting noise: logSNR {start_losses['logSNR']:.4f}, "
                    f"fitted {info['fit_loss']:.4f} (refined from the {info['start']} grid)")
        log(f"fitted a {steps}-step grid in {fit_seconds:.1f}s ({fit_trajectories} trajectories of their own "
            f"noise{errs}); saved to {grid_path}")
    label_log, label_fit = DEMO_FIT_LABELS
    results[label_log] = evaluate(label_log, dict(DEMO_FIT_SOLVER, steps=steps, skip_type="logSNR"))
    results[label_fit] = evaluate(label_fit, dict(DEMO_FIT_SOLVER, steps=steps, timesteps=grid))
    results[label_fit]["fit_seconds"] = fit_seconds  # None: the saved grid was reused
    t0 = time.perf_counter()
    ems_data, _ = ds.sample(jax.random.key(seed + 6), DEMO_V3_EMS["samples"])
    ems = jax.block_until_ready(dpmjax.compute_ems(trainer.model_fn, params, jax.random.key(seed + 7), ds.shape,
                                                   schedule=trainer.schedule, data=ems_data,
                                                   n_lambdas=DEMO_V3_EMS["n_lambdas"], progress=progress))
    ems_seconds = time.perf_counter() - t0
    log(f"computed DPM-Solver-v3's statistics in {ems_seconds:.1f}s ({DEMO_V3_EMS['n_lambdas']} lambdas x "
        f"{DEMO_V3_EMS['samples']} data samples)")
    results[DEMO_V3_LABEL] = evaluate(DEMO_V3_LABEL, dict(DEMO_V3_SOLVER, steps=steps, skip_type="logSNR", ems=ems))
    results[DEMO_V3_LABEL]["ems_seconds"] = ems_seconds
    # table order: the 10-NFE samplers, the 6-NFE pair, the reference last
    ref_label = DEMO_METHODS[-1][0]
    results[ref_label] = results.pop(ref_label)

    x_ref = xs[ref_label]
    for label in results:
        results[label]["ref_err"] = float(jnp.mean(jnp.linalg.norm(xs[label] - x_ref, axis=-1)))
    floor = float(sliced_wasserstein(data_other, data_ref, proj_key))

    log(f"\n{samples} samples per method; SWD = sliced Wasserstein distance to {samples} fresh data points "
        f"(two data samples differ by {floor:.4f});\n|x - x_ref| = mean distance to the 200-NFE sample from the "
        "same starting noise.\n")
    log(f"{'method':<24}{'NFE':>5}{'SWD':>9}{'|x - x_ref|':>13}{'time (s)':>10}{'compile (s)':>13}")
    for label, r in results.items():
        log(f"{label:<24}{r['nfe']:>5}{r['swd']:>9.4f}{r['ref_err']:>13.4f}{r['seconds']:>10.3f}"
            f"{r['compile_seconds']:>13.2f}")

    panels = [(f"data ({data})", data_ref)]
    panels += [(f"{label}, {r['nfe']} NFE\nSWD {r['swd']:.3f}", xs[label]) for label, r in results.items()]
    png = os.path.join(out, "demo.png")
    plots.scatter_panels(panels, png, suptitle=f"{data}: samplers at 10 model evaluations, DPM-Solver++(2M) at "
                                               f"{steps} on the logSNR and a fitted grid, DPM-Solver-v3 at {steps}, "
                                               "and a 200-NFE reference\n"
                                               "SWD: sliced Wasserstein distance to fresh data samples "
                                               f"(lower is better; two data samples differ by {floor:.3f})")
    log(f"\nwrote {png}; total {time.perf_counter() - t_all:.1f}s")
    return results


def _cmd_demo(args) -> int:
    import math as _math

    results = run_demo(args.out, train_steps=args.train_steps, data=args.data, samples=args.samples,
                       seed=args.seed, width=args.width, depth=args.depth, batch_size=args.batch_size,
                       progress=not args.no_progress, fit_trajectories=args.fit_trajectories,
                       fit_refine_iters=args.fit_refine_iters)
    if not all(_math.isfinite(r["swd"]) for r in results.values()):
        raise RuntimeError("a sampler produced non-finite samples")
    return 0


# -- fit-steps ----------------------------------------------------------------------------


def _cmd_fit_steps(args) -> int:
    import jax

    import dpmjax
    from .train.trainer import load_trained

    out = _output_file(args, "timesteps.json", args.checkpoint)
    if out.endswith(".npy") and not args.grid_only:
        raise ValueError(f"--out {out}: a .npy file holds the grid alone; use a .json name (the grid and the "
                         "network's times) or --grid-only")
    trainer, state = load_trained(args.checkpoint)
    trainer.close()
    ds = trainer.dataset
    if ds.num_classes:
        raise ValueError(f"fit-steps supports the unlabelled 2-D data sets; {ds.name} is class-conditional")
    extra = {"progress": not args.no_progress} if _accepts(dpmjax.fit_timesteps, "progress") else {}
    t0 = time.perf_counter()
    grid, info = dpmjax.fit_timesteps(
        trainer.model_fn, state.ema_params, jax.random.key(args.seed), (args.trajectories,) + ds.shape,
        schedule=trainer.schedule, steps=args.steps, algorithm=args.algorithm, method=args.method,
        order=args.order, n_candidates=args.candidates, refine_iters=args.refine_iters,
        model_times=not args.grid_only, return_info=True, **extra,
    )
    grid = jax.block_until_ready(grid)
    seconds = time.perf_counter() - t0
    metadata = dict(steps=args.steps, algorithm=args.algorithm, method=args.method, order=args.order,
                    model_times=not args.grid_only, checkpoint=os.path.abspath(args.checkpoint),
                    trajectories=args.trajectories, n_candidates=args.candidates, refine_iters=args.refine_iters,
                    seed=args.seed)
    dpmjax.save_timesteps(out, grid, **metadata)
    head = (f"wrote {out}: {args.steps}-step grid for {args.algorithm} {args.method} order {args.order} in "
            f"{seconds:.1f}s; ")
    starts = ", ".join(f"{k} {v:.4f}" for k, v in info.get("start_losses", {}).items())
    if args.refine_iters == 0:  # the dynamic program's grid, measured end to end like the fixed grids
        print(head + f"the dynamic program's grid (no refinement): error {info['fit_loss']:.4f} (fixed grids: "
              f"{starts}); its accumulated one-step error {info['dp_cost']:.4g} is teacher-forced")
    else:
        print(head + f"fitted error {info['fit_loss']:.4f}" + (f" (starting grids: {starts})" if starts else ""))
    return 0


# -- compute-ems ---------------------------------------------------------------------------


EMS_OWNED = ("l.npz", "sb.npz", "lambdas.npy", "ems.json")


def _ems_output(args) -> str:
    """``--out`` (or ``ems``) of compute-ems, checked before any work: returns its real path.

    The statistics replace the directory as a whole, so it must be missing, or a directory
    holding nothing but statistics (and, for the default name, none yet); never the run
    directory or a directory inside it (symbolic links resolved).
    """
    from .train.files import OutputError, _inside, check_output_dir

    out = "ems" if args.out is None else args.out
    if not out.strip():
        raise OutputError(f"--out must name a directory, got {out!r}")
    real = os.path.realpath(out)
    if _inside(real, args.checkpoint):
        raise OutputError(f"--out {out} is inside the run directory {os.path.realpath(args.checkpoint)}; its files "
                          "belong to the run: write the statistics elsewhere")
    check_output_dir(real)
    if os.path.lexists(real):
        if not os.path.isdir(real):
            raise OutputError(f"--out {out} exists and is not a directory")
        entries = os.listdir(real)
        foreign = sorted(set(entries) - set(EMS_OWNED))
        if foreign:
            raise OutputError(f"--out {out} holds other files ({', '.join(foreign[:5])}); the statistics replace "
                              "the directory as a whole: name a new or empty directory")
        if args.out is None and entries:
            raise OutputError(f"{out}/ already holds statistics; name it with --out to replace them, or another "
                              "directory")
    if args.lambdas < 3:
        raise _UsageError(f"{PROG} compute-ems: error: --lambdas must be at least 3, got {args.lambdas}")
    if args.samples < 2:
        raise _UsageError(f"{PROG} compute-ems: error: --samples must be at least 2, got {args.samples}")
    if args.smooth_dl >= args.lambdas:
        raise _UsageError(f"{PROG} compute-ems: error: --smooth-dl ({args.smooth_dl}) must be smaller than "
                          f"--lambdas ({args.lambdas})")
    return real


def _cmd_compute_ems(args) -> int:
    import jax

    import dpmjax
    from .train.trainer import load_trained

    out = _ems_output(args)
    shown = "ems" if args.out is None else args.out
    trainer, state = load_trained(args.checkpoint)
    trainer.close()
    ds = trainer.dataset
    if ds.num_classes:
        raise ValueError(f"compute-ems supports the unlabelled 2-D data sets; {ds.name} is class-conditional")
    key_data, key_ems = jax.random.split(jax.random.key(args.seed))
    data, _ = ds.sample(key_data, args.samples)
    t0 = time.perf_counter()
    ems = dpmjax.compute_ems(trainer.model_fn, state.ema_params, key_ems, ds.shape, schedule=trainer.schedule,
                             data=data, n_lambdas=args.lambdas, smooth_dl=args.smooth_dl,
                             progress=not args.no_progress)
    ems = jax.block_until_ready(ems)
    seconds = time.perf_counter() - t0
    dpmjax.save_ems(out, ems)
    print(f"wrote {shown}/ (l.npz, sb.npz, lambdas.npy, ems.json): statistics on {args.lambdas} logSNR points from "
          f"{args.samples} {ds.name} samples in {seconds:.1f}s; sample with `{PROG} sample --checkpoint "
          f"{args.checkpoint} --method v3 --ems {shown}`")
    return 0


# -- fit-solver / sample --solver -------------------------------------------------------------


def _add_fit_solver_parser(sub) -> None:
    fit = sub.add_parser("fit-solver", help="fit a solver (time steps and coefficients) to a trained model "
                                            "(dpmjax.fit_solver)")
    fit.add_argument("--checkpoint", required=True, help="run directory written by `dpmjax train` (required)")
    fit.add_argument("--steps", type=_positive_int, required=True, help="model evaluations (NFE) of the solver")
    fit.add_argument("--out", required=True, help="solver file to write (required)")
    fit.add_argument("--trajectories", type=_positive_int, default=1024,
                     help="starting noises of the calibration, a quarter of them held out")
    fit.add_argument("--iters", type=_nonnegative_int, default=1000, help="Adam iterations")
    fit.add_argument("--loss", choices=("rms", "mean"), default="rms",
                     help="distance to the teacher: RMS over samples and coordinates, or the mean of the per-sample "
                          "RMS distances (dpmjax.fit_solver's loss)")
    fit.add_argument("--base-iters", type=_nonnegative_int, default=100,
                     help="refinement iterations of the starting grids (fit_timesteps)")
    fit.add_argument("--teacher-steps", type=_positive_int, default=400,
                     help="steps of the teacher solve (the base grids are fitted on its states at a divisor of it, "
                          "up to 40)")
    fit.add_argument("--max-time", type=_positive_float, default=None, help="stop the iterations after this many "
                     "seconds (the result then depends on the machine's speed; default: no limit)")
    fit.add_argument("--guidance-scale", type=_finite_float, default=None,
                     help="classifier-free guidance scale the solver is fitted at (class-conditional models; "
                          "default 2)")
    fit.add_argument("--seed", type=_seed, default=0, help="seed of the calibration noise")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar")


def _class_labels(ds, n: int):
    """``n`` labels cycling through the classes, and the null label of classifier-free guidance."""
    import jax.numpy as jnp

    labels = jnp.arange(n, dtype=jnp.int32) % ds.num_classes
    return labels, jnp.full(labels.shape, ds.num_classes, jnp.int32)


def _cmd_fit_solver(args) -> int:
    import jax

    import dpmjax
    from .train.trainer import load_trained

    from .train.files import check_output_file

    check_output_file(args.out, explicit=True, protected=(args.checkpoint,))
    trainer, state = load_trained(args.checkpoint)
    trainer.close()
    ds = trainer.dataset
    n = args.trajectories
    extra = {}
    if ds.num_classes:
        scale = 2.0 if args.guidance_scale is None else args.guidance_scale
        labels, null = _class_labels(ds, n)
        extra = dict(condition=labels, unconditional_condition=null, guidance_scale=scale)
    elif args.guidance_scale is not None:
        raise ValueError(f"--guidance-scale needs a class-conditional model; {ds.name} is unlabelled")
    t0 = time.perf_counter()
    solver, info = dpmjax.fit_solver(
        trainer.model_fn, state.ema_params, jax.random.key(args.seed), (n,) + ds.shape, schedule=trainer.schedule,
        steps=args.steps, iters=args.iters, base_iters=args.base_iters, teacher_steps=args.teacher_steps,
        loss=args.loss, max_time=args.max_time, progress=not args.no_progress, return_info=True, **extra)
    seconds = time.perf_counter() - t0
    dpmjax.save_solver(args.out, solver, schedule=trainer.schedule, sample_shape=ds.shape,
                       checkpoint=os.path.abspath(args.checkpoint), data=ds.name, trajectories=n, seed=args.seed,
                       guidance_scale=extra.get("guidance_scale"), base=info["base"], loss=args.loss,
                       heldout_start=info["start_loss"], heldout_loss=info["heldout_loss"], seconds=seconds)
    print(f"wrote {args.out}: a {args.steps}-NFE solver from {info['base']} in {seconds:.1f}s; distance to the "
          f"{args.teacher_steps}-step teacher on held-out noises {info['start_loss']:.4g} -> {info['heldout_loss']:.4g}"
          + ("" if info["improved"] else " (no improvement: the starting solver is saved)"))
    return 0


def _cmd_sample_solver(args) -> int:
    import jax
    import jax.numpy as jnp

    import dpmjax
    from . import learned
    from .train import plots
    from .train.trainer import load_trained

    fixed = [f"--{k.replace('_', '-')}" for k in ("algorithm", "method", "order", "ems", "timesteps")
             if getattr(args, k) is not None]
    if args.skip_type != "logSNR":
        fixed.append("--skip-type")
    if fixed:
        raise ValueError(f"--solver fixes the method and its time steps; drop {', '.join(fixed)}")
    out = _output_file(args, "samples.png", args.checkpoint)
    plots.check_image_path(out)
    trainer, state = load_trained(args.checkpoint, step=args.step)
    trainer.close()
    ds = trainer.dataset
    solver = dpmjax.load_solver(args.solver, schedule=trainer.schedule, sample_shape=ds.shape)
    if args.steps != 10 and args.steps != solver.num_evals:
        raise ValueError(f"--solver {args.solver} makes {solver.num_evals} model evaluations; drop --steps")
    meta = learned.load_solver_metadata(args.solver).get("metadata", {})
    params = state.ema_params if not args.no_ema else state.params
    label = f"solver {os.path.basename(args.solver)}, {solver.num_evals} NFE"
    key = jax.random.key(args.seed)
    if ds.num_classes == 0:
        if args.class_ is not None or args.guidance_scale is not None:
            raise ValueError(f"--class/--guidance-scale need a class-conditional model; {ds.name} is unlabelled")
        n = args.num or 2000
        x_T = solver.prior_std * jax.random.normal(key, (n,) + ds.shape)
        t0 = time.perf_counter()
        x = jax.block_until_ready(dpmjax.sample(trainer.model_fn, params, None, x_T.shape, noise=x_T, solver=solver))
        return _write_points(out, ds, x, label, time.perf_counter() - t0, args.seed)
    if args.class_ is not None and args.class_ >= ds.num_classes:
        raise ValueError(f"--class must be in 0..{ds.num_classes - 1}, got {args.class_}")
    fitted_at = meta.get("guidance_scale")
    scale = (fitted_at if fitted_at is not None else 2.0) if args.guidance_scale is None else args.guidance_scale
    n = args.num or (8 * ds.num_classes if args.class_ is None else 64)
    labels, null = _class_labels(ds, n)
    if args.class_ is not None:
        labels = jnp.full((n,), args.class_, jnp.int32)
    x_T = solver.prior_std * jax.random.normal(key, (n,) + ds.shape)
    t0 = time.perf_counter()
    x = jax.block_until_ready(dpmjax.sample(trainer.model_fn, params, None, x_T.shape, noise=x_T, solver=solver,
                                            condition=labels,
                                            guidance=dpmjax.ClassifierFree(unconditional=null, scale=scale)))
    seconds = time.perf_counter() - t0
    rows = ds.num_classes if args.class_ is None else max(1, int(math.sqrt(n)))
    note = "" if fitted_at is None or fitted_at == scale else f" (the solver was fitted at {fitted_at:g})"
    return _write_images(out, x, label, scale, rows, seconds, note)


# -- entry point --------------------------------------------------------------------------


def _quiet_event_loop_noise() -> None:
    """Drop the reports orbax's abandoned coroutines leave behind after a failed read or write.

    When a checkpoint read or write fails, orbax raises (we report that in one line) and
    leaves tasks, coroutines and event loops to the garbage collector, which prints a
    traceback per coroutine ("Event loop is closed" through ``sys.unraisablehook``, "Task
    exception was never retrieved" through the ``asyncio`` logger, "coroutine ... was
    never awaited" warnings). Other unraisable errors still print.
    """
    import inspect as _inspect
    import logging
    import warnings

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)

    previous = sys.unraisablehook

    def hook(unraisable):
        exc = unraisable.exc_value
        if (isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)) or _inspect.iscoroutine(
                unraisable.object):
            return
        previous(unraisable)

    sys.unraisablehook = hook


# What each command imports beyond the sampler, and the extra that installs it.
_EXTRA_MODULES = {"train": ("flax", "orbax.checkpoint", "tqdm"), "demo": ("matplotlib", "sklearn")}
_COMMAND_EXTRAS = {"demo": ("train", "demo"), "train": ("train",), "sample": ("train", "demo"),
                   "fit-steps": ("train",), "compute-ems": ("train",), "fit-solver": ("train",)}


def _require_extras(args) -> None:
    """Refuse, in one line naming the extra to install, a command whose packages are missing.

    Checked before any work; then quiets the logging orbax does on routine operations.
    """
    import importlib.util

    from absl import logging as absl_logging  # orbax logs routine notices as warnings; before importing it

    absl_logging.set_verbosity(absl_logging.ERROR)
    extras = set(_COMMAND_EXTRAS[args.command])
    if args.command == "train" and args.data == "digits":
        extras.add("demo")  # the digits data ship with scikit-learn
    missing = []
    for extra in ("train", "demo"):
        for module in _EXTRA_MODULES[extra] if extra in extras else ():
            try:
                found = importlib.util.find_spec(module) is not None  # found, not imported (fast)
            except ImportError:
                found = False
            if not found:
                missing.append(module.split(".")[0].replace("sklearn", "scikit-learn").replace(
                    "orbax", "orbax-checkpoint"))
    if missing:
        extra = "demo" if "demo" in extras else "train"
        raise _UsageError(f"{PROG} {args.command}: error: needs {', '.join(missing)}, which the sampler does not: "
                          f"pip install 'dpmjax[{extra}]'")
    _quiet_event_loop_noise()


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0: done; 2: a user error (one line on stderr); 130: interrupted; 1: an internal error
    (one line; set ``DPMJAX_TRACEBACK=1`` to see the traceback).
    """
    try:
        args = _build_parser().parse_args(argv)
        _require_extras(args)
        commands = {"demo": _cmd_demo, "train": _cmd_train, "sample": _cmd_sample, "fit-steps": _cmd_fit_steps,
                    "compute-ems": _cmd_compute_ems, "fit-solver": _cmd_fit_solver}
        return commands[args.command](args)
    except _UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an extra's module needed on a path _require_extras does not foresee
        root = (e.name or "").split(".")[0]
        extra = next((x for x, mods in _EXTRA_MODULES.items() if root in {m.split(".")[0] for m in mods}), None)
        if extra is None:
            return _internal_error(e)
        print(f"{PROG}: error: needs {root}, which the sampler does not: pip install 'dpmjax[{extra}]'",
              file=sys.stderr)
        return 2
    except (OSError, ValueError, TypeError, OverflowError, RuntimeError) as e:  # CheckpointError is a RuntimeError
        print(f"{PROG}: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line, unless asked for the traceback
        return _internal_error(e)


def _internal_error(e: Exception) -> int:
    if os.environ.get("DPMJAX_TRACEBACK"):
        raise e
    print(f"{PROG}: internal error: {type(e).__name__}: {_message(e)} "
          "(set DPMJAX_TRACEBACK=1 to see the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
