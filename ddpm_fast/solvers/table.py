"""The one step every few-step solver is (DESIGN.md, "Few-step solvers"): a table row of linear
coefficients, the torch step that applies it, and the reference loop.

Every solver family (solvers/dpmsolver.py, …) turns a diffusers scheduler's settings into a Plan:
the U-Net's timesteps, the initial noise scale and one float32 row per step. A step reads:

    x_in = C_IN·x                                         U-Net input (scale_model_input)
    m    = P·x + Q·out                                    converted output (convert_model_output;
                                                          then dynamic thresholding or a clamp
                                                          when THRESH)
    x_c  = KX·x + KL·x_last + K0·m + K1·m1 + K2·m2 + K3·m3   corrector (UniPC's; KX = 1 and the
                                                          rest 0 where a step has none)
    x'   = A·x_c + B0·m + B1·m1 + B2·m2 + S·z             predictor / update
    then x_last ← x_c, m3 ← m2, m2 ← m1, m1 ← m           (fixed buffers, zeros at the start)

m1, m2, m3 are the converted outputs of the one, two and three steps before; a coefficient on a
buffer the step must not read is 0. z is one standard normal draw per step for stochastic plans
(diffusers draws it after the model call, every step), else unused. T is the timestep the U-Net
sees (a float: some schedulers feed fractional timesteps); WORD the Philox step word of the
step's noise (num_train_timesteps + 1 + step index: distinct from x_T's word and from every
other step's, whatever the timesteps); ORDER the solver order of the step (information).

Everything is per element, so one fused kernel can run it, and the row index lives on the
device (a CUDA graph replays any step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..ops.ddpm_step import threshold_sample

C_IN, P, Q, KX, KL, K0, K1, K2, K3, A, B0, B1, B2, S, T, WORD, ORDER, THRESH = range(18)
COLS = 20                  # 18 used; rows of 80 bytes
COLUMN_NAMES = ("C_IN", "P", "Q", "KX", "KL", "K0", "K1", "K2", "K3", "A", "B0", "B1", "B2",
                "S", "T", "WORD", "ORDER", "THRESH")


@dataclass
class Plan:
    """A solver run: the U-Net's timesteps, the initial noise scale and one table row per step
    (columns above)."""

    timesteps: list                     # fed to the U-Net (the scheduler's .timesteps)
    init_noise_sigma: float
    table: torch.Tensor                 # float32 [steps, COLS]
    table64: torch.Tensor               # the same rows in float64 (a float64 yardstick run)
    stochastic: bool                    # one z per step, drawn after the model call
    corrector: bool = False             # some row has a corrector (KX ≠ 1 or K* ≠ 0)
    # (ratio, max value): dynamic thresholding of m; (range,): m clamped to ±range (Heun's
    # clip_sample); THRESH is 1 on every row with either (limit_prediction)
    threshold: Optional[tuple] = None
    keep_channels: Optional[int] = None  # m uses out[:, :keep_channels] (learned variances)
    sigmas: list = field(default_factory=list)   # the noise levels the steps run between
    orders: list = field(default_factory=list)   # order of each step (also column ORDER)
    scheduler: str = ""                 # the diffusers class it mirrors
    settings: dict = field(default_factory=dict, repr=False)


def new_rows(n: int) -> torch.Tensor:
    """n float64 rows with the identities filled in: KX = 1 (no corrector), C_IN = 1."""
    rows = torch.zeros(n, COLS, dtype=torch.float64)
    rows[:, KX] = 1.0
    rows[:, C_IN] = 1.0
    return rows


def make_plan(rows: torch.Tensor, timesteps, num_train_timesteps: int, **fields) -> Plan:
    """A Plan from float64 rows (WORD filled in here), checked finite."""
    rows = rows.clone()
    rows[:, WORD] = num_train_timesteps + 1 + torch.arange(len(rows), dtype=torch.float64)
    if not bool(torch.isfinite(rows).all()):
        k = int((~torch.isfinite(rows)).any(1).nonzero()[0])
        raise ValueError(f"step {k} of {len(rows)} has non-finite coefficients "
                         f"({dict(zip(COLUMN_NAMES, rows[k].tolist()))})")
    corrector = bool((rows[:, KX] != 1).any() or (rows[:, KL:K3 + 1] != 0).any())
    return Plan(timesteps=list(timesteps), table=rows.float(), table64=rows,
                corrector=corrector, **fields)


# ---------------------------------------------------------------------------- the step
def convert_output(plan: Plan, row: torch.Tensor, x: torch.Tensor, out) -> torch.Tensor:
    """m = P·x + Q·out (out a tensor or an object with .sample; a learned variance's extra
    channels dropped), thresholded when the plan says so."""
    if not isinstance(out, torch.Tensor):
        out = out.sample
    if plan.keep_channels is not None:
        out = out[:, :plan.keep_channels]
    if out.shape != x.shape:
        raise ValueError(f"model output of shape {tuple(out.shape)} for a sample of shape "
                         f"{tuple(x.shape)}")
    m = row[P] * x + row[Q] * out.to(x.dtype)
    if plan.threshold is not None:           # THRESH is 1 on every row then (no host read)
        m = limit_prediction(m, plan.threshold)
    return m


def limit_prediction(m: torch.Tensor, threshold: tuple) -> torch.Tensor:
    """m under a plan's threshold: dynamic thresholding (ratio, max value), or a clamp to
    ±range for (range,) (a scheduler's clip_sample)."""
    if len(threshold) == 1:
        return m.clamp(-threshold[0], threshold[0])
    return threshold_sample(m, *threshold)


def solver_step(plan: Plan, row: torch.Tensor, x: torch.Tensor, out, state: list,
                z: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One step: x' from row `row`, the sample x, the model output `out`, state = [x_last, m1,
    m2, m3] (updated in place: the buffers shift) and the step's noise z (stochastic plans).
    In x's dtype."""
    x_last, m1, m2, m3 = state
    m = convert_output(plan, row, x, out)
    if plan.corrector:
        x = (row[KX] * x + row[KL] * x_last + row[K0] * m + row[K1] * m1 + row[K2] * m2
             + row[K3] * m3)
    x_new = row[A] * x + row[B0] * m + row[B1] * m1 + row[B2] * m2
    if plan.stochastic:
        if z is None:
            raise ValueError(f"{plan.scheduler} steps need their noise z")
        x_new = x_new + row[S] * z
    state[:] = [x, m, m1, m2]
    return x_new


def initial_state(x: torch.Tensor) -> list:
    """[x_last, m1, m2, m3]: zeros (no step reads a buffer before it is written)."""
    return [torch.zeros_like(x) for _ in range(4)]


# ---------------------------------------------------------------------------- reference loop
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def randn_diffusers(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    """torch.randn as diffusers' randn_tensor draws it: on a CPU generator's device then moved
    (a CUDA generator for a CPU tensor is an error there too), a list of generators one image
    each (a list of one is the generator itself)."""
    device = torch.device(device)
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            if len(generator) != shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
            return torch.cat([randn_diffusers((1, *shape[1:]), g, device, dtype)
                              for g in generator]).to(device)
    draw_on = device
    if generator is not None and generator.device.type != device.type:
        if generator.device.type != "cpu":
            raise ValueError(f"cannot draw a {device} tensor from a {generator.device.type} "
                             "generator (diffusers' randn_tensor refuses it too)")
        draw_on = torch.device("cpu")
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


def _timestep(t, device) -> torch.Tensor:
    dtype = torch.int64 if float(t).is_integer() else torch.float32
    return torch.tensor(t, dtype=dtype, device=device)


@torch.no_grad()
def reference_sample(unet: Model, plan: Plan, shape, generator=None, *, device=None,
                     x_T: Optional[torch.Tensor] = None, dtype=torch.float32,
                     noise: Optional[Callable[[int], torch.Tensor]] = None,
                     progress=None) -> torch.Tensor:
    """Run `plan` from x_T (drawn from `generator` like diffusers' canonical loop:
    randn(shape) · init_noise_sigma) to the final sample, in float32 torch ops (solver_step).
    The generator's draws are diffusers' (x_T, then one per step for stochastic plans, after
    the model call), so the same generator gives diffusers' sample and leaves the generator in
    the same state. `noise(k)` instead gives step k's z (Philox noise keyed by image: the
    pipeline's seeded mode). dtype=torch.float64 runs the float64 table in float64 (the draws
    still float32 ones, cast): a yardstick for float32 rounding."""
    shape = tuple(shape)
    if device is None:
        device = x_T.device if x_T is not None else (
            generator.device if isinstance(generator, torch.Generator) else "cpu")
    device = torch.device(device)
    if plan.keep_channels is not None and shape[1] != plan.keep_channels:
        raise ValueError(f"variance_type={plan.settings.get('variance_type')!r}: diffusers keeps "
                         f"the first {plan.keep_channels} channels of the output as the "
                         f"prediction, which fits {plan.keep_channels}-channel images only, "
                         f"not {shape[1]}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    table = (plan.table if dtype == torch.float32 else plan.table64).to(device)
    if x_T is None:
        x = (randn_diffusers(shape, generator, device) * plan.init_noise_sigma).to(dtype)
    else:
        x = x_T.to(device=device, dtype=dtype)
    state = initial_state(x)
    for k, t in enumerate(plan.timesteps):
        row = table[k]
        out = unet(x * row[C_IN], _timestep(t, device))
        z = None
        if plan.stochastic:           # after the model call, as diffusers draws it
            z = (noise(k) if noise is not None else
                 randn_diffusers(x.shape, generator, device)).to(dtype)
        x = solver_step(plan, row, x, out, state, z)
        if progress is not None:
            progress(1)
    return x
