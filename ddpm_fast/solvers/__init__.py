"""Few-step solvers as per-step tables of linear coefficients (DESIGN.md, "Few-step solvers").

dpmsolver: diffusers' DPMSolverMultistepScheduler (DPM-Solver, DPM-Solver++, their SDE variants)
— dpm_settings (every setting honoured or refused by name), dpm_plan (timesteps + table) and
reference_sample (the torch loop that applies the table).
"""
from .dpmsolver import (A, B0, B1, B2, C_IN, COLS, COLUMN_NAMES, DPM_SCHEDULER_DEFAULTS, ORDER,
                        P, Q, S, T, THRESH, Plan, dpm_plan, dpm_settings, reference_sample,
                        solver_step)

__all__ = ["A", "B0", "B1", "B2", "C_IN", "COLS", "COLUMN_NAMES", "DPM_SCHEDULER_DEFAULTS",
           "ORDER", "P", "Q", "S", "T", "THRESH", "Plan", "dpm_plan", "dpm_settings",
           "reference_sample", "solver_step"]
