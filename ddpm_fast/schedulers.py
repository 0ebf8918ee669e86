"""`pipe.scheduler`: diffusers-style scheduler objects for the drop-in DDPMPipeline.

A diffusers user reads `pipe.scheduler.config` and swaps `pipe.scheduler` (for example
`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`). These classes are light
holders of a validated config with diffusers' names (no diffusers import): `DDPMScheduler`
(every setting of check_scheduler_config), `DDIMScheduler` (the same settings without
`variance_type`, plus `set_alpha_to_one`) and the few-step solvers' classes
(`DPMSolverMultistepScheduler`, `DPMSolverSinglestepScheduler`, `UniPCMultistepScheduler`,
`EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `DEISMultistepScheduler`,
`HeunDiscreteScheduler`:
solvers.FAMILIES, each family's settings check). The pipeline samples with its own step
tables; a
scheduler object of either library is read through its `.config` alone (duck typing) and its
class name, and every setting is honoured or refused by name.

A folder whose scheduler_config.json (or model_index.json) names DDIMScheduler is read the same
way (read_config): the pipeline samples DDIM with it, as diffusers' DDPMPipeline does with that
scheduler (eta = 0 unless the call gives one).

DDIM follows diffusers' DDIMScheduler.step exactly: the previous timestep is
t − num_train_timesteps // num_inference_steps (not the next timestep of the run, which differs
under "trailing"/"linspace" spacing), ᾱ before the first step is 1 (set_alpha_to_one) or ᾱ_0,
and "diffusers" numerics form every coefficient with its float32 operations.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from .schedule import DDPM_SCHEDULER_DEFAULTS, Schedule, check_scheduler_config
from .solvers import BY_SCHEDULER

# DDIMScheduler's arguments (diffusers 0.42) with their defaults.
DDIM_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "clip_sample": True,
    "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon",
    "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
    "sample_max_value": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False,
}
# diffusers' DDIMScheduler raises NotImplementedError for the other DDPM beta schedules
DDIM_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler", *BY_SCHEDULER)


class FrozenConfig(OrderedDict):
    """A read-only mapping with attribute access, like diffusers' FrozenDict: `dict(config)`,
    `config["beta_end"]`, `config.beta_end` and `XScheduler.from_config(config)` all work."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        for key, value in dict(*args, **kwargs).items():
            OrderedDict.__setitem__(self, key, value)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no setting {name!r}") from None

    def _refuse(self, *args, **kwargs):
        raise TypeError("a scheduler config is read-only (as diffusers' FrozenDict): build a new "
                        "scheduler with XScheduler.from_config(config, setting=value)")

    __setitem__ = __delitem__ = __setattr__ = _refuse
    setdefault = pop = popitem = update = clear = _refuse

    def __reduce__(self):
        return (FrozenConfig, (list(self.items()),))


def live_config(config) -> dict:
    """The settings a scheduler object's config (diffusers' FrozenDict, our FrozenConfig, or
    an object with a .config) holds, as a plain dict: its values are what the object samples
    with. Its `_use_default_values` list only records which keys were defaults when it was
    built (register_to_config may have changed them since), so it is dropped here; in a
    scheduler_config.json file diffusers does follow it, and so does read_config."""
    if not isinstance(config, dict) and hasattr(config, "config"):
        config = config.config
    return {k: v for k, v in dict(config).items() if k != "_use_default_values"}


def ddim_settings(config: dict) -> dict:
    """Every DDIMScheduler setting of a config (defaults filled in), or a ValueError naming the
    first one not honoured. The settings shared with DDPMScheduler go through
    check_scheduler_config; `variance_type` (a DDPMScheduler key that DDIMScheduler.from_config
    drops with a warning) is dropped here too."""
    if not isinstance(config, dict):
        raise ValueError(f"scheduler config must be a dict, got {type(config).__name__}")
    used_defaults = config.get("_use_default_values", [])
    given = {k: v for k, v in config.items()
             if not k.startswith("_") and k not in used_defaults and k != "variance_type"}
    unknown = sorted(k for k in given if k not in DDIM_SCHEDULER_DEFAULTS)
    if unknown:
        raise ValueError(f"scheduler setting {unknown[0]!r} is not a DDIMScheduler setting and "
                         "is not honoured")
    cfg = {**DDIM_SCHEDULER_DEFAULTS, **given}
    if not isinstance(cfg["set_alpha_to_one"], bool):
        raise ValueError(f"scheduler setting set_alpha_to_one={cfg['set_alpha_to_one']!r} is not "
                         "supported: must be true or false")
    if cfg["trained_betas"] is None and cfg["beta_schedule"] not in DDIM_BETA_SCHEDULES:
        raise ValueError(f"scheduler setting beta_schedule={cfg['beta_schedule']!r} is not "
                         "supported with DDIMScheduler (diffusers' DDIMScheduler does not "
                         f"implement it; supported: {', '.join(DDIM_BETA_SCHEDULES)})")
    shared = {k: v for k, v in cfg.items() if k != "set_alpha_to_one"}
    checked = check_scheduler_config(shared)
    checked.pop("variance_type")
    return {**checked, "set_alpha_to_one": cfg["set_alpha_to_one"]}


def read_config(config: dict) -> tuple[str, dict]:
    """(kind, every setting with defaults filled in) of a scheduler config dict (a folder's
    scheduler_config.json): its _class_name picks the class, DDPMScheduler when absent. kind is
    "ddpm", "ddim", or a few-step solver's class name (solvers.BY_SCHEDULER); any other class,
    and any setting not honoured, is a ValueError naming it."""
    if not isinstance(config, dict):
        raise ValueError(f"scheduler config must be a dict, got {type(config).__name__}")
    name = config.get("_class_name")
    if name == "DDIMScheduler":
        return "ddim", ddim_settings(config)
    if name in BY_SCHEDULER:
        return name, BY_SCHEDULER[name].settings(config)
    if name not in (None, "DDPMScheduler"):
        raise ValueError(unsupported_class(name))
    return "ddpm", check_scheduler_config(config)


def class_name(kind: str) -> str:
    """The diffusers class of a read_config kind."""
    return {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}.get(kind, kind)


def defaults_of(kind: str) -> dict:
    """Every setting of a read_config kind's class with its default."""
    if kind in BY_SCHEDULER:
        return BY_SCHEDULER[kind].defaults
    return DDPM_SCHEDULER_DEFAULTS if kind == "ddpm" else DDIM_SCHEDULER_DEFAULTS


def describe(config: dict) -> tuple[str, dict, str]:
    """(class name, its settings, the settings that differ from its defaults as text) of a
    scheduler config dict: what `ddpm-fast info` and `convert` show."""
    kind, settings = read_config(config)
    name, defaults = class_name(kind), defaults_of(kind)
    diff = [f"{k}={v!r}" for k, v in settings.items()
            if v != defaults.get(k) and k != "trained_betas"]
    if settings["trained_betas"] is not None:
        diff.append(f"trained_betas=[{len(settings['trained_betas'])} values]")
    if not diff:
        return name, settings, f"all {name} defaults"
    text = ", ".join(diff)
    return name, settings, text if kind == "ddpm" else f"{name} with {text}"


def ddpm_part(ddim_config: dict) -> dict:
    """The DDPMScheduler settings a DDIM config shares (for the pipeline's Schedule)."""
    return {k: v for k, v in ddim_config.items() if k != "set_alpha_to_one"}


class _Scheduler:
    """Shared behaviour: a validated `config`, `from_config`, `set_timesteps` → `timesteps`."""

    DEFAULTS: dict = {}

    def __init__(self, **settings):
        self.config = FrozenConfig(self._validate(settings))
        self.num_inference_steps: Optional[int] = None
        self.timesteps = torch.from_numpy(
            np.arange(0, self.config["num_train_timesteps"])[::-1].copy())
        self.init_noise_sigma = 1.0

    @classmethod
    def _validate(cls, settings: dict) -> dict:
        """The complete, checked settings; each scheduler class (DDPMScheduler, DDIMScheduler)
        defines its own."""
        raise NotImplementedError(f"{cls.__name__} is abstract: use DDPMScheduler or "
                                  "DDIMScheduler")

    @classmethod
    def from_config(cls, config=None, **kwargs):
        """As diffusers' from_config: the settings of `config` (a dict, a FrozenDict or any
        object with a `.config`) overridden by kwargs; keys the class does not take are dropped
        (diffusers drops them with a warning: DDPMScheduler's variance_type for DDIM)."""
        if config is not None and not isinstance(config, dict) and hasattr(config, "config"):
            config = config.config
        config = dict(config or {})
        used = config.pop("_use_default_values", [])
        settings = {k: v for k, v in config.items()
                    if not k.startswith("_") and k not in used and k in cls.DEFAULTS}
        settings.update(kwargs)
        return cls(**settings)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """diffusers' set_timesteps (the same timesteps the pipeline runs)."""
        schedule = Schedule.from_scheduler_config(
            {k: v for k, v in self.config.items() if k in DDPM_SCHEDULER_DEFAULTS})
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = torch.tensor(schedule.timesteps(num_inference_steps), dtype=torch.int64,
                                      device=device)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "trained_betas")
        return f"{type(self).__name__}({items})"


class DDPMScheduler(_Scheduler):
    """The settings of diffusers' DDPMScheduler (validated by check_scheduler_config)."""

    DEFAULTS = DDPM_SCHEDULER_DEFAULTS

    @classmethod
    def _validate(cls, settings):
        return check_scheduler_config(dict(settings))


class DDIMScheduler(_Scheduler):
    """The settings of diffusers' DDIMScheduler; the pipeline samples DDIM with them (eta and
    use_clipped_model_output are arguments of the call, as in diffusers' DDIMPipeline)."""

    DEFAULTS = DDIM_SCHEDULER_DEFAULTS

    @classmethod
    def _validate(cls, settings):
        return ddim_settings(dict(settings))


class _SolverScheduler(_Scheduler):
    """A few-step solver's settings (solvers.FAMILIES): set_timesteps gives the timesteps and
    init_noise_sigma its plan runs with."""

    FAMILY = ""

    @classmethod
    def _family(cls):
        return BY_SCHEDULER[cls.FAMILY]

    @classmethod
    def _validate(cls, settings):
        return cls._family().settings(dict(settings))

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """The run's timesteps and initial noise scale; settings a run changes for good in
        diffusers (DPMSolverSinglestepScheduler's lower_order_final: Plan.settings) change in
        this config too."""
        plan = self._family().plan(dict(self.config), int(num_inference_steps))
        changed = {k: v for k, v in plan.settings.items()
                   if k in self.config and self.config[k] != v}
        if changed:
            self.config = FrozenConfig({**self.config, **changed})
        self.num_inference_steps = int(num_inference_steps)
        self.init_noise_sigma = plan.init_noise_sigma
        self.timesteps = torch.tensor(plan.timesteps, device=device)


class DPMSolverMultistepScheduler(_SolverScheduler):
    """The settings of diffusers' DPMSolverMultistepScheduler (solvers/dpmsolver.py): the
    pipeline samples DPM-Solver(++) with them, as diffusers' canonical loop does."""

    FAMILY = "DPMSolverMultistepScheduler"
    DEFAULTS = BY_SCHEDULER[FAMILY].defaults


class DPMSolverSinglestepScheduler(_SolverScheduler):
    """The settings of diffusers' DPMSolverSinglestepScheduler (solvers/singlestep.py)."""

    FAMILY = "DPMSolverSinglestepScheduler"
    DEFAULTS = BY_SCHEDULER[FAMILY].defaults


class UniPCMultistepScheduler(_SolverScheduler):
    """The settings of diffusers' UniPCMultistepScheduler (solvers/unipc.py): UniP predictor
    and UniC corrector, as diffusers' canonical loop samples with them."""

    FAMILY = "UniPCMultistepScheduler"
    DEFAULTS = BY_SCHEDULER[FAMILY].defaults


class EulerDiscreteScheduler(_SolverScheduler):
    """The settings of diffusers' EulerDiscreteScheduler (solvers/euler.py): x_T scaled by
    init_noise_sigma, the U-Net's input by 1/√(σ²+1), as diffusers' canonical loop."""

    FAMILY = "EulerDiscreteScheduler"
    DEFAULTS = BY_SCHEDULER[FAMILY].defaults


class EulerAncestralDiscreteScheduler(_SolverScheduler):
    """The settings of diffusers' EulerAncestralDiscreteScheduler (solvers/euler.py)."""

    FAMILY = "EulerAncestralDiscreteScheduler"
    DEFAULTS = BY_SCHEDULER[FAMILY].defaults


class HeunDiscreteScheduler(_SolverScheduler):
    """The settings of diffusers' HeunDiscreteScheduler (solvers/heun.py): two model calls a
    noise level, as diffusers' canonical loop runs it."""

    FAMILY = "HeunDiscreteScheduler"
    DEFAULTS = BY_SCHEDULER[FAMILY].defaults


class DEISMultistepScheduler(_SolverScheduler):
    """The settings of diffusers' DEISMultistepScheduler (solvers/deis.py)."""

    FAMILY = "DEISMultistepScheduler"
    DEFAULTS = BY_SCHEDULER[FAMILY].defaults


def read_scheduler(scheduler) -> tuple[str, dict]:
    """("ddpm" | "ddim", validated settings) of a scheduler object of diffusers or ddpm_fast,
    read through its class name and `.config`; a ValueError names what is not honoured."""
    config = getattr(scheduler, "config", None)
    if config is None or isinstance(scheduler, dict):
        raise TypeError(f"pipe.scheduler must be a scheduler object with a .config (diffusers' or "
                        f"ddpm_fast's DDPMScheduler / DDIMScheduler), got "
                        f"{type(scheduler).__name__}")
    name = type(scheduler).__name__
    if name not in SCHEDULER_CLASSES:
        raise ValueError(unsupported_class(name))
    config = {k: v for k, v in live_config(config).items() if not k.startswith("_")}
    return read_config({**config, "_class_name": name})


def unsupported_class(name: str) -> str:
    """Why a scheduler class is refused, listing the ones that are honoured."""
    return (f"scheduler {name} is not supported: ddpm_fast samples with "
            f"{', '.join(SCHEDULER_CLASSES)} (their settings are honoured or refused by name)")


def ddim_table(schedule: Schedule, timesteps, eta: float = 0.0, set_alpha_to_one: bool = True,
               use_clipped_model_output: bool = False) -> torch.Tensor:
    """Step-table rows (schedule.py's layout) of diffusers' DDIMScheduler.step over `timesteps`
    with these DDIMScheduler settings: Schedule.ddim_table (the one home of the formula; its
    docstring gives the previous-timestep rule and numerics)."""
    return schedule.ddim_table(timesteps, eta, set_alpha_to_one=set_alpha_to_one,
                               use_clipped_model_output=use_clipped_model_output)
