"""Singlestep DPM-Solver and DPM-Solver++ (Lu et al. 2022a, §3.3; 2022b), as diffusers'
DPMSolverSinglestepScheduler runs them, as rows of the solvers' common table (solvers/table.py).

A singlestep solver of order k spends k model calls on one step of its own from the group's
start sample x_g: the calls inside the group are at intermediate noise levels (diffusers'
timesteps), and each of them advances from x_g, not from the sample it was called at:

    m   = P·x + Q·out                                   convert_model_output (at the current x)
    x_c = x                     (order 1: a group starts; KX = 1)
    x_c = x_last                (order 2, 3: KX = 0, KL = 1: the group's start, kept in x_last)
    x'  = A·x_c + B0·m + B1·m1 + B2·m2 + S·z            first / second / third order update

x_last ← x_c after each step, so it holds x_g through the whole group. The weights of D0, D1,
D2 are the multistep solver's (dpmsolver.step_weights, from h = λ_t − λ_g); the differences
are taken over the group's own outputs (singlestep_dpm_solver_second/third_order_update):

    order 2:  r0 = (λ_s0 − λ_s1)/h,  D0 = m1,  D1 = (m − m1)/r0
              x' = A·x_g + w0·D0 + w1·D1                (w1 = w0/2 for "midpoint")
    order 3:  r0 = (λ_s0 − λ_s2)/h,  r1 = (λ_s1 − λ_s2)/h,  D0 = m2,
              D1_0 = (m1 − m2)/r1,  D1_1 = (m − m2)/r0,
              D1 = (r0·D1_0 − r1·D1_1)/(r0 − r1),  D2 = 2(D1_1 − D1_0)/(r0 − r1)
              x' = A·x_g + w0·D0 + w1·D1_1              ("midpoint")
              x' = A·x_g + w0·D0 + w1·D1 + w2·D2        ("heun")

with s0 the current level, s1, s2 the group's earlier ones. The orders follow get_order_list:
groups 1, 2(, 3) repeating, shortened at the end with lower_order_final, which diffusers' own
set_timesteps switches on (for good, in the scheduler's config) when the steps are not a
multiple of the order or final_sigmas_type is "zero"; the last step is first order with "zero".

Settings: DPMSolverSinglestepScheduler takes a subset of the multistep scheduler's arguments
(no timestep_spacing, steps_offset, euler_at_final, use_lu_lambdas, rescale_betas_zero_snr:
its timesteps are always the "linspace" ones below lambda_min_clipped) and algorithm types
dpmsolver++, dpmsolver and sde-dpmsolver++; dpmsolver.check_settings checks them the same way.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .dpmsolver import (DPM_SCHEDULER_DEFAULTS, _alpha_sigma, check_settings, checked_levels,
                        convert_coefficients, finish_plan, noise_levels, step_weights)
from .table import A, B0, B1, B2, KL, KX, ORDER, P, Q, S, T, Plan, new_rows

SCHEDULER = "DPMSolverSinglestepScheduler"
ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")
_ONLY_MULTISTEP = ("euler_at_final", "use_lu_lambdas", "timestep_spacing", "steps_offset",
                   "rescale_betas_zero_snr")
# Every argument of diffusers' DPMSolverSinglestepScheduler (0.42) with its default.
SINGLESTEP_SCHEDULER_DEFAULTS = {
    **{k: v for k, v in DPM_SCHEDULER_DEFAULTS.items() if k not in _ONLY_MULTISTEP},
    "lower_order_final": False,
}


def singlestep_settings(config: dict) -> dict:
    """Every DPMSolverSinglestepScheduler setting of a diffusers config (defaults filled in),
    or a ValueError naming the first one not honoured exactly (dpmsolver.dpm_settings' rules:
    DDPMScheduler keys a from_config swap leaves behind carry no setting, the aliases diffusers
    applies are applied, its own failures refused)."""
    return check_settings(config, SCHEDULER, SINGLESTEP_SCHEDULER_DEFAULTS, ALGORITHM_TYPES)


def lower_order_final(cfg: dict, n: int) -> bool:
    """lower_order_final as diffusers' set_timesteps(n) leaves it: switched on when n is not a
    multiple of the order or the last noise level is zero."""
    return bool(cfg["lower_order_final"] or n % cfg["solver_order"] != 0 or
                cfg["final_sigmas_type"] == "zero")


def step_orders(cfg: dict, n: int) -> list[int]:
    """The order of each of n steps: groups of 1, 2(, 3) (mirrors get_order_list)."""
    order = cfg["solver_order"]
    if not lower_order_final(cfg, n):
        orders = list(range(1, order + 1)) * (n // order)
    elif order == 3:
        tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[n % 3]
        orders = [1, 2, 3] * (n // 3 - (n % 3 == 0)) + tail
    elif order == 2:
        orders = [1, 2] * (n // 2 - (n % 2 == 0)) + ([1, 1] if n % 2 == 0 else [1])
    else:
        orders = [1] * n
    if cfg["final_sigmas_type"] == "zero":
        orders[-1] = 1
    return orders


def _expand(order: int, heun: bool, r0: float, r1: float, w) -> list[float]:
    """Weights on (m, m1, m2) of the update's D terms (module docstring)."""
    m, m1, m2 = np.eye(3)
    if order == 1:
        return list(w[0] * m)
    if order == 2:
        return list(w[0] * m1 + w[1] * (m - m1) / r0)
    d1_0, d1_1 = (m1 - m2) / r1, (m - m2) / r0
    if not heun:
        return list(w[0] * m2 + w[1] * d1_1)
    d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
    return list(w[0] * m2 + w[1] * d1 + w[2] * d2)


def update_coefficients(cfg: dict, order: int, levels) -> tuple[float, list[float], float]:
    """(A, [B0, B1, B2], S) of one step of this order to noise level levels[0] from the group's
    levels levels[1:] (current first, the group's start last)."""
    with np.errstate(all="ignore"):      # IEEE inf/NaN where diffusers' float32 gives them
        coef_x, w, noise, h = step_weights(cfg, order, levels[0], levels[order])
        lam = [_alpha_sigma(level)[2] for level in levels[1:order + 1]]
        r0 = (lam[0] - lam[-1]) / h if order >= 2 else math.nan
        r1 = (lam[1] - lam[-1]) / h if order >= 3 else math.nan
        b = _expand(order, cfg["solver_type"] == "heun", r0, r1, w)
    return float(coef_x), [float(v) for v in b], float(noise)


def singlestep_plan(settings: dict, num_inference_steps: int) -> Plan:
    """The plan (solvers/table.py) of DPMSolverSinglestepScheduler(**settings).set_timesteps(
    num_inference_steps) and the steps of its canonical loop; a ValueError (before any work)
    where diffusers fails or divides by zero."""
    cfg = singlestep_settings(settings)
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
    # the multistep arguments this class lacks, at the values its set_timesteps amounts to
    full = {**DPM_SCHEDULER_DEFAULTS, **cfg}
    timesteps, sigmas32 = noise_levels(full, n, round_cosine=True)
    levels = checked_levels(sigmas32)
    orders = step_orders(cfg, n)
    rows = new_rows(n)
    for k, order in enumerate(orders):
        rows[k, P], rows[k, Q] = convert_coefficients(full, levels[k])
        coef_x, b, noise = update_coefficients(cfg, order, [levels[k + 1]] +
                                               levels[k::-1][:order])
        rows[k, A], rows[k, S] = coef_x, noise
        rows[k, B0], rows[k, B1], rows[k, B2] = b
        if order > 1:                       # advance from the group's start (x_last)
            rows[k, KX], rows[k, KL] = 0.0, 1.0
        rows[k, T], rows[k, ORDER] = timesteps[k], order
        if not bool(torch.isfinite(rows[k]).all()):
            raise ValueError(f"step {k} (t = {timesteps[k]}, order {order}) of {n} has "
                             f"non-finite coefficients: repeated noise levels "
                             f"({levels[max(k - 2, 0):k + 2]}) make diffusers' singlestep "
                             "update divide by zero (NaN)")
    return finish_plan(cfg, rows, timesteps, levels, orders, SCHEDULER,
                       {**cfg, "lower_order_final": lower_order_final(cfg, n)})
