"""Few-step solvers as per-step tables of linear coefficients (DESIGN.md, "Few-step solvers").

table: the common row layout, Plan, the torch step (solver_step) and the reference loop
    (reference_sample) every solver family shares.
FAMILIES: each scheduler class with its sampler name (BY_SCHEDULER, BY_SAMPLER look them up).
dpmsolver: diffusers' DPMSolverMultistepScheduler (DPM-Solver, DPM-Solver++, their SDE
    variants): dpm_settings (every setting honoured or refused by name), dpm_plan.
euler: EulerDiscreteScheduler and EulerAncestralDiscreteScheduler (σ-space steps, input scale,
    ancestral noise): euler_settings / euler_plan, euler_ancestral_settings / _plan.
deis: DEISMultistepScheduler (log-ρ multistep): deis_settings, deis_plan.
heun: HeunDiscreteScheduler (Euler step, then the trapezoidal correction: two calls a level):
    heun_settings, heun_plan.
singlestep: DPMSolverSinglestepScheduler (k model calls a step from the group's start sample):
    singlestep_settings, singlestep_plan.
unipc: diffusers' UniPCMultistepScheduler (UniP predictor + UniC corrector, bh1/bh2, x̂0/ε̂):
    unipc_settings, unipc_plan.
"""
from dataclasses import dataclass
from typing import Callable

from .dpmsolver import DPM_SCHEDULER_DEFAULTS, dpm_plan, dpm_settings
from .deis import DEIS_SCHEDULER_DEFAULTS, deis_plan, deis_settings
from .euler import (EULER_ANCESTRAL_SCHEDULER_DEFAULTS, EULER_SCHEDULER_DEFAULTS, SWAP_KEYS,
                    euler_ancestral_plan, euler_ancestral_settings, euler_plan, euler_settings)
from .heun import HEUN_SCHEDULER_DEFAULTS, heun_plan, heun_settings
from .singlestep import SINGLESTEP_SCHEDULER_DEFAULTS, singlestep_plan, singlestep_settings
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


def _ignoring_swapped_keys(settings: Callable[[dict], dict], defaults: dict,
                           read: frozenset = frozenset()) -> Callable[[dict], dict]:
    """`settings` that lets through, as carrying no setting, the keys a from_config swap among
    the classes ddpm_fast runs leaves in a config (SWAP_KEYS: diffusers keeps them as "hidden"
    keys and ignores them), except variance_type (each family judges a learned one) and the
    keys the class does read although they are not its arguments (`read`)."""
    def checked(config: dict) -> dict:
        if not isinstance(config, dict):
            return settings(config)
        return settings({k: v for k, v in config.items()
                         if k in defaults or k not in SWAP_KEYS or k == "variance_type"
                         or k in read})
    return checked


FAMILIES = tuple(Family(name, sampler, defaults,
                        _ignoring_swapped_keys(settings, defaults, read), plan)
                 for name, sampler, defaults, settings, plan, read in (
    # diffusers' DPM-Solver reads sigma_min / sigma_max (Euler's) for karras sigmas if present
    ("DPMSolverMultistepScheduler", "dpm++", DPM_SCHEDULER_DEFAULTS, dpm_settings, dpm_plan,
     frozenset({"sigma_min", "sigma_max"})),
    ("DPMSolverSinglestepScheduler", "dpm++-singlestep", SINGLESTEP_SCHEDULER_DEFAULTS,
     singlestep_settings, singlestep_plan, frozenset({"sigma_min", "sigma_max"})),
    ("UniPCMultistepScheduler", "unipc", UNIPC_SCHEDULER_DEFAULTS, unipc_settings, unipc_plan,
     frozenset()),
    ("EulerDiscreteScheduler", "euler", EULER_SCHEDULER_DEFAULTS, euler_settings, euler_plan,
     frozenset()),
    ("EulerAncestralDiscreteScheduler", "euler-ancestral", EULER_ANCESTRAL_SCHEDULER_DEFAULTS,
     euler_ancestral_settings, euler_ancestral_plan, frozenset()),
    ("DEISMultistepScheduler", "deis", DEIS_SCHEDULER_DEFAULTS, deis_settings, deis_plan,
     frozenset({"sigma_min", "sigma_max"})),
    ("HeunDiscreteScheduler", "heun", HEUN_SCHEDULER_DEFAULTS, heun_settings, heun_plan,
     frozenset({"sigma_min", "sigma_max"})),
))
BY_SCHEDULER = {f.scheduler: f for f in FAMILIES}
BY_SAMPLER = {f.sampler: f for f in FAMILIES}

__all__ = ["BY_SAMPLER", "BY_SCHEDULER", "FAMILIES", "Family", "A", "B0", "B1", "B2", "C_IN", "COLS", "COLUMN_NAMES", "DPM_SCHEDULER_DEFAULTS", "K0",
           "K1", "K2", "K3", "KL", "KX", "ORDER", "P", "Q", "S", "T", "THRESH", "WORD", "Plan",
           "dpm_plan", "dpm_settings", "initial_state", "UNIPC_SCHEDULER_DEFAULTS", "unipc_plan",
           "unipc_settings", "EULER_SCHEDULER_DEFAULTS",
           "EULER_ANCESTRAL_SCHEDULER_DEFAULTS", "DEIS_SCHEDULER_DEFAULTS", "euler_plan",
           "euler_settings", "euler_ancestral_plan", "euler_ancestral_settings", "deis_plan",
           "deis_settings", "SINGLESTEP_SCHEDULER_DEFAULTS", "singlestep_plan",
           "singlestep_settings", "HEUN_SCHEDULER_DEFAULTS", "heun_plan", "heun_settings",
           "randn_diffusers", "reference_sample",
           "solver_step"]
