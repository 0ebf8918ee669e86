"""Few-step solvers as per-step tables of linear coefficients (DESIGN.md, "Few-step solvers").

table: the common row layout, Plan, the torch step (solver_step) and the reference loop
    (reference_sample) every solver family shares.
dpmsolver: diffusers' DPMSolverMultistepScheduler (DPM-Solver, DPM-Solver++, their SDE
    variants): dpm_settings (every setting honoured or refused by name), dpm_plan.
"""
from .dpmsolver import DPM_SCHEDULER_DEFAULTS, dpm_plan, dpm_settings
from .table import (A, B0, B1, B2, C_IN, COLS, COLUMN_NAMES, K0, K1, K2, K3, KL, KX, ORDER, P, Q,
                    S, T, THRESH, WORD, Plan, initial_state, randn_diffusers, reference_sample,
                    solver_step)

__all__ = ["A", "B0", "B1", "B2", "C_IN", "COLS", "COLUMN_NAMES", "DPM_SCHEDULER_DEFAULTS", "K0",
           "K1", "K2", "K3", "KL", "KX", "ORDER", "P", "Q", "S", "T", "THRESH", "WORD", "Plan",
           "dpm_plan", "dpm_settings", "initial_state", "randn_diffusers", "reference_sample",
           "solver_step"]
