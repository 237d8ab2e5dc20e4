"""dpmjax: DPM-Solver, DPM-Solver++ and UniPC samplers for diffusion models in JAX.

The public API is listed here and nothing else is; see the README for a tour.
"""

from .analytic import GaussianMixture
from .diffusers import from_diffusers
from .ems import EMS, compute_ems, degenerate_ems, load_ems, save_ems
from .fit import fit_timesteps, load_timesteps, save_timesteps
from .learned import fit_solver, load_solver, save_solver
from .methods import (ALGORITHMS, METHODS, SOLVER_TYPES, UNIPC_VARIANTS, Adaptive, DPMSolver, DPMSolverPP, Method,
                      SDEDPMSolver, SDEDPMSolverPP, Singlestep, SinglestepFixed, UniPC, V3, from_keywords)
from .models import (MODEL_TYPES, ClassifierFree, ClassifierGuidance, Thresholding, dynamic_threshold, to_data,
                     to_noise)
from .sampler import Solution, add_noise, invert, sample, solve
from .solvers import Solver, SolverState, solver
from .schedules import EDM, NoiseSchedule, RectifiedFlow, VPCosine, VPDiscrete, VPLinear, VPSchedule
from .timesteps import SKIP_TYPES, FittedGrid, Grid, time_grid

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "METHODS",
    "MODEL_TYPES",
    "SKIP_TYPES",
    "SOLVER_TYPES",
    "UNIPC_VARIANTS",
    "EMS",
    "Adaptive",
    "ClassifierFree",
    "ClassifierGuidance",
    "DPMSolver",
    "DPMSolverPP",
    "Grid",
    "Method",
    "SDEDPMSolver",
    "SDEDPMSolverPP",
    "Singlestep",
    "SinglestepFixed",
    "Solution",
    "Thresholding",
    "UniPC",
    "V3",
    "from_keywords",
    "solve",
    "GaussianMixture",
    "EDM",
    "FittedGrid",
    "NoiseSchedule",
    "RectifiedFlow",
    "Solver",
    "SolverState",
    "VPCosine",
    "VPDiscrete",
    "VPLinear",
    "VPSchedule",
    "add_noise",
    "compute_ems",
    "degenerate_ems",
    "dynamic_threshold",
    "fit_solver",
    "fit_timesteps",
    "from_diffusers",
    "invert",
    "load_ems",
    "load_solver",
    "load_timesteps",
    "sample",
    "save_ems",
    "save_solver",
    "save_timesteps",
    "solver",
    "time_grid",
    "to_data",
    "to_noise",
]
