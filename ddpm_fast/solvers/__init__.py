"""Few-step solvers as per-step tables of linear coefficients (DESIGN.md, "Few-step solvers").

table: the common row layout, Plan, the torch step (solver_step) and the reference loop
    (reference_sample) every solver family shares.
FAMILIES: each scheduler class with its sampler name (BY_SCHEDULER, BY_SAMPLER look them up).
dpmsolver: diffusers' DPMSolverMultistepScheduler (DPM-Solver, DPM-Solver++, their SDE
    variants): dpm_settings (every setting honoured or refused by name), dpm_plan.
unipc: diffusers' UniPCMultistepScheduler (UniP predictor + UniC corrector, bh1/bh2, x̂0/ε̂):
    unipc_settings, unipc_plan.
"""
from dataclasses import dataclass
from typing import Callable

from .dpmsolver import DPM_SCHEDULER_DEFAULTS, dpm_plan, dpm_settings
from .unipc import UNIPC_SCHEDULER_DEFAULTS, unipc_plan, unipc_settings
from .table import (A, B0, B1, B2, C_IN, COLS, COLUMN_NAMES, K0, K1, K2, K3, KL, KX, ORDER, P, Q,
                    S, T, THRESH, WORD, Plan, initial_state, randn_diffusers, reference_sample,
                    solver_step)



@dataclass(frozen=True)
class Family:
    """A diffusers scheduler class run as table rows: its settings check, its plan, its
    defaults and the sampler name the pipeline and the CLI call it by."""
    scheduler: str                        # the diffusers class name
    sampler: str                          # pipe(sampler=…), ddpm-fast sample --sampler
    defaults: dict
    settings: Callable[[dict], dict]      # every setting, or a ValueError naming one
    plan: Callable[[dict, int], Plan]     # (settings, num_inference_steps) → Plan


FAMILIES = (
    Family("DPMSolverMultistepScheduler", "dpm++", DPM_SCHEDULER_DEFAULTS, dpm_settings,
           dpm_plan),
    Family("UniPCMultistepScheduler", "unipc", UNIPC_SCHEDULER_DEFAULTS, unipc_settings,
           unipc_plan),
)
BY_SCHEDULER = {f.scheduler: f for f in FAMILIES}
BY_SAMPLER = {f.sampler: f for f in FAMILIES}

__all__ = ["BY_SAMPLER", "BY_SCHEDULER", "FAMILIES", "Family", "A", "B0", "B1", "B2", "C_IN", "COLS", "COLUMN_NAMES", "DPM_SCHEDULER_DEFAULTS", "K0",
           "K1", "K2", "K3", "KL", "KX", "ORDER", "P", "Q", "S", "T", "THRESH", "WORD", "Plan",
           "dpm_plan", "dpm_settings", "initial_state", "UNIPC_SCHEDULER_DEFAULTS", "unipc_plan",
           "unipc_settings", "randn_diffusers", "reference_sample",
           "solver_step"]
