"""Drop-in DDPMPipeline: from_pretrained(path) and pipe(batch_size=..., generator=...).images.

mode="reference": fp32 torch ops and torch.Generator noise drawn in diffusers' order, so the same
    folder and generator give diffusers' images (max |Δ| ≲ 1e-6 on CPU).
mode="fast": ddpm_fast/fast.py (bf16 + fused step + CUDA graphs on GPU); noise is Philox keyed by
    (seed, image index). The seed is `seed=` when given (the reproducible way); otherwise one
    number drawn from `generator` (advancing it), or from torch's default generator without one,
    so torch.manual_seed(k) / the same generator state fix a call and consecutive calls differ.
    A list of generators (one per image) is refused: fast mode's noise is keyed by image index.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import checkpoints, memory
from .images import model_to_unit, unit_to_uint8
from .sampling import (NoiseSource, check_model_output, ddim_draws, ddim_sample, ddpm_sample,
                       sample_loop)
from .schedule import Schedule, check_scheduler_config
from .solvers import BY_SAMPLER, BY_SCHEDULER, FAMILIES
from .unet import UNet2DModel

MODES = ("reference", "fast")
OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class ImagePipelineOutput:
    images: object   # list of PIL images, np.ndarray [B, H, W, C] in [0, 1], or torch [B, C, H, W]


def to_output(x: torch.Tensor, output_type: str):
    """Model-space images in [-1, 1] → diffusers' output types (same conversion as diffusers)."""
    image = model_to_unit(x)
    if output_type == "pt":
        return image
    image = image.cpu().permute(0, 2, 3, 1).numpy()
    return image if output_type == "np" else to_pil(image)


def to_pil(image: np.ndarray) -> list:
    """Images in [0, 1], numpy [B, H, W, C] → PIL images (grey for one channel)."""
    from PIL import Image

    u8 = unit_to_uint8(image)
    if u8.shape[-1] == 1:
        return [Image.fromarray(im.squeeze(-1), mode="L") for im in u8]
    return [Image.fromarray(im) for im in u8]


# Philox seeds are key_tensor's range [0, 2**63); a drawn seed is uniform over it
SEED_BOUND = 2 ** 63 - 1


def draw_seed(generator=None) -> int:
    """A fast-mode Philox seed drawn from `generator` (advancing it), or from torch's default
    generator when None: the same generator state gives the same seed, the next call another."""
    if isinstance(generator, (list, tuple)):
        raise ValueError(
            f"fast mode takes one generator, not a list of {len(generator)}: its noise is keyed "
            "by (seed, image index), so image i of a seed is the same in any batch; pass seed= "
            "(reproducible) or one torch.Generator, or use mode='reference' for one generator "
            "per image (diffusers' behaviour)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(SEED_BOUND, (1,), generator=generator, device=device).item())


# Sampling steps when none are given, in the API and the CLI alike: the default of diffusers'
# pipeline for that sampler (DDPMPipeline 1000, DDIMPipeline 50)
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, **{f.sampler: 20 for f in FAMILIES}}
# The samplers by name: DDPM, DDIM and each few-step solver family's (solvers.FAMILIES)
SAMPLERS = tuple(DEFAULT_STEPS)


def default_steps(sampler: str, num_train_timesteps: int) -> int:
    """num_inference_steps when none is given: DEFAULT_STEPS[sampler], or all the model's
    timesteps when it has fewer."""
    return min(DEFAULT_STEPS[sampler], num_train_timesteps)


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_sampler_arguments(sampler: str, eta, variance) -> None:
    """Refuse an argument the sampler would ignore (diffusers' DDPMPipeline raises TypeError
    for eta): eta belongs to DDIM, a variance type to DDPM."""
    if eta is not None and sampler != "ddim":
        raise ValueError(f"eta={eta!r} is a DDIM argument; the {sampler.upper()} sampler has no "
                         "η (sample DDIM: sampler='ddim' / --sampler ddim, or a DDIMScheduler)")
    if variance is not None and sampler != "ddpm":
        why = "variance is set by η" if sampler == "ddim" else "steps are set by its scheduler"
        raise ValueError(f"variance={variance!r} is a DDPM argument; the {sampler.upper()} "
                         f"sampler's {why}")


def solver_betas(settings: dict) -> dict:
    """The DDPMScheduler settings of a solver's config that define the training noise schedule
    (the pipeline's Schedule: timesteps, betas, prediction type)."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "prediction_type", "rescale_betas_zero_snr")
    return {"clip_sample": False, **{k: settings[k] for k in keys if k in settings}}


def sampler_of(kind: str) -> str:
    """The sampler name of a scheduler kind (schedulers.read_config's)."""
    return kind if kind in ("ddpm", "ddim") else BY_SCHEDULER[kind].sampler


class DDPMPipeline:
    """diffusers' DDPMPipeline surface: from_pretrained(path, torch_dtype=…), .to(device, dtype),
    pipe.device / pipe.dtype / pipe.unet / pipe.scheduler / pipe.components,
    set_progress_bar_config, save_pretrained, and __call__ → .images (README: "The drop-in
    pipeline"). `pipe.scheduler` may be swapped for a DDPMScheduler or DDIMScheduler (diffusers'
    or ddpm_fast.schedulers'): its settings are honoured or refused by name."""

    def __init__(self, unet: UNet2DModel, scheduler_config=None, *,
                 mode: str = "reference", device=None, numerics: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None, use_graphs: Optional[bool] = None,
                 compile: Optional[bool] = None, autotune_convs: Optional[bool] = None,
                 kernels: Optional[str] = None, scheduler=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if scheduler is not None and scheduler_config is not None:
            raise ValueError("pass scheduler_config (a dict) or scheduler (an object), not both")
        self.mode = mode
        self.device = torch.device(device) if device is not None else unet.device
        self.unet = unet.to(self.device).eval()
        self.numerics = numerics or ("diffusers" if mode == "reference" else "float64")
        self._fast_args = dict(dtype=None, use_graphs=use_graphs, compile=compile,
                               autotune_convs=autotune_convs, kernels=kernels)
        self._runner = None
        self._runner_source = None       # a WeightsWatch of what the runner copied
        self._progress_bar_config: dict = {}
        self.last_peak_memory: Optional[int] = None   # bytes, after each call (ddpm_fast.memory)
        # the scheduler: a config dict (a folder's scheduler_config.json) or a scheduler object
        if scheduler is None and scheduler_config is not None and \
                not isinstance(scheduler_config, dict) and hasattr(scheduler_config, "config"):
            scheduler, scheduler_config = scheduler_config, None
        if scheduler is not None:
            self.scheduler = scheduler
        else:
            from .schedulers import live_config, read_config

            # a config dict names its class (_class_name: DDPMScheduler by default, or
            # DDIMScheduler, as a folder's scheduler_config.json does); a scheduler object's
            # config (a mapping type of its own) holds the values it samples with
            config = scheduler_config or checkpoints.DEFAULT_SCHEDULER
            config = dict(config) if type(config) is dict else live_config(config)
            kind, settings = read_config(config)
            self._set_scheduler(kind, config if kind == "ddpm" else settings, None)
        if dtype is not None:
            self._set_dtype(dtype)

    def _set_scheduler(self, kind: str, config: dict, obj) -> None:
        """Validate a scheduler's settings (every one honoured or refused by name) and switch
        the sampler to it; nothing changes when a setting is refused."""
        from . import schedulers

        solver = None
        if kind == "ddpm":
            settings = check_scheduler_config(config)
            ddpm_config, ddim_extra = config, None
        elif kind == "ddim":
            settings = config                        # schedulers.ddim_settings' output
            ddpm_config = schedulers.ddpm_part(settings)
            ddim_extra = {"set_alpha_to_one": settings["set_alpha_to_one"]}
        else:                                        # a few-step solver's settings
            settings, ddim_extra, solver = config, None, (kind, config)
            ddpm_config = solver_betas(config)
        schedule = Schedule.from_scheduler_config(ddpm_config, self.numerics)
        self._check_unet_output(kind, settings.get("variance_type") or "fixed_small")
        if obj is None:
            cls = getattr(schedulers, schedulers.class_name(kind))
            obj = cls.from_config({k: v for k, v in settings.items()})
        self.scheduler_config = ddpm_config if solver is None else \
            {"_class_name": kind, **settings}
        self.schedule = schedule
        self.variance = "fixed_small" if solver else settings.get("variance_type", "fixed_small")
        self.clip = settings.get("clip_sample", False)
        self._ddim = ddim_extra                      # None: the scheduler is not a DDIMScheduler
        self._solver = solver                        # (class name, settings) of a solver
        self._scheduler = obj

    def _check_unet_output(self, sampler: str, variance: str) -> None:
        """The U-Net's output channels fit the sampler: 2 × in_channels exactly for a learned
        variance (DDPM only: diffusers' DDIMScheduler does not split the variance off)."""
        from .schedule import LEARNED_VARIANCES

        c = self.unet.config
        if sampler not in ("ddpm", "ddim"):          # a solver: learned variances split off
            want = 2 * c.in_channels if variance in LEARNED_VARIANCES else c.in_channels
            if c.out_channels != want:
                raise ValueError(f"this U-Net has out_channels={c.out_channels} for in_channels="
                                 f"{c.in_channels}; the {sampler} scheduler with variance_type="
                                 f"{variance!r} needs {want}")
            return
        if sampler == "ddim" and c.out_channels != c.in_channels:
            raise ValueError(f"DDIM needs a U-Net whose output is shaped like the image; this one "
                             f"has out_channels={c.out_channels} for in_channels={c.in_channels}"
                             " (diffusers' DDIMScheduler does not split off a learned variance):"
                             " sample it with a DDPMScheduler")
        if sampler == "ddpm":
            check_model_output(variance, c.in_channels, c.out_channels)

    @property
    def scheduler(self):
        """The scheduler object (diffusers' meaning): read `.config`, or assign a diffusers or
        ddpm_fast DDPMScheduler / DDIMScheduler to change the sampler."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler) -> None:
        from .schedulers import read_scheduler

        kind, settings = read_scheduler(scheduler)
        self._set_scheduler(kind, settings, scheduler)

    # ------------------------------------------------------------------ device and dtype
    @property
    def dtype(self) -> torch.dtype:
        """The U-Net's compute dtype: the weights' dtype in reference mode; in fast mode the
        runner's (set by .to(dtype) / dtype= / torch_dtype=, else fast.default_dtype)."""
        if self.mode == "reference":
            return self.unet.dtype
        if self._fast_args["dtype"] is not None:
            return self._fast_args["dtype"]
        from .fast import default_dtype

        return default_dtype(self.device)

    def _set_dtype(self, dtype) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        if self.mode == "reference":
            # diffusers runs the U-Net in this dtype: so does reference mode (weights cast, as
            # diffusers casts them); x_t and the sampler step stay float32 (diffusers: dtype too)
            self.unet.to(dtype)
        else:
            self._fast_args["dtype"] = dtype     # fast mode keeps fp32 master weights
        self._runner = None

    def to(self, *args, **kwargs) -> "DDPMPipeline":
        """diffusers' .to: to(device), to(dtype), to(device, dtype), to(device=, dtype=).
        Moves the U-Net (and casts it in reference mode), rebuilds the fast runner on the next
        call, and returns self. See `dtype` for what a dtype means in each mode."""
        dtype = kwargs.pop("dtype", None)
        device = kwargs.pop("device", None)
        kwargs.pop("silence_dtype_warnings", None)
        if kwargs:
            raise TypeError(f"to() got unexpected keyword arguments: {', '.join(kwargs)}")
        if len(args) > 2:
            raise ValueError("to() takes at most two arguments (device, dtype)")
        arg_device = arg_dtype = None
        if len(args) == 1:
            if isinstance(args[0], torch.dtype):
                arg_dtype = args[0]
            else:
                arg_device = args[0]
        elif len(args) == 2:
            if isinstance(args[0], torch.dtype):
                raise ValueError("to(a, b): the first argument is the device, the second dtype")
            arg_device, arg_dtype = args
        if dtype is not None and arg_dtype is not None:
            raise ValueError("dtype given both as an argument and as a keyword")
        if device is not None and arg_device is not None:
            raise ValueError("device given both as an argument and as a keyword")
        dtype = dtype if dtype is not None else arg_dtype
        device = device if device is not None else arg_device
        if device is not None:
            device = torch.device(device)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            self.unet.to(device)
            self.device = device
            self._runner = None
        if dtype is not None:
            self._set_dtype(dtype)
        return self

    @property
    def components(self) -> dict:
        """{"unet": …, "scheduler": …}: DDPMPipeline(**pipe.components) builds the same pipeline."""
        return {"unet": self.unet, "scheduler": self.scheduler}

    # ------------------------------------------------------------------ progress bar
    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm arguments for the progress bar a call shows (disable=True: none), as diffusers."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable=None, total=None):
        """A tqdm bar with set_progress_bar_config's arguments (diffusers' method); by default
        shown on torch.distributed rank 0 only, as diffusers."""
        from tqdm.auto import tqdm

        config = dict(self._progress_bar_config)
        if "disable" not in config:
            dist = torch.distributed
            config["disable"] = (dist.is_available() and dist.is_initialized()
                                 and dist.get_rank() != 0)
        if iterable is not None:
            return tqdm(iterable, **config)
        if total is not None:
            return tqdm(total=total, **config)
        raise ValueError("Either `total` or `iterable` has to be defined.")

    @staticmethod
    def numpy_to_pil(images):
        """[B, H, W, C] (or [H, W, C]) floats in [0, 1] → PIL images (diffusers' helper)."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        return to_pil(images)

    # ------------------------------------------------------------------ diffusers' knobs
    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        """A no-op: fast mode's attention is already a fused memory-efficient kernel (flash-style
        online softmax on GPUs), and reference mode keeps torch's attention for exact images."""

    def disable_xformers_memory_efficient_attention(self) -> None:
        """A no-op (see enable_xformers_memory_efficient_attention)."""

    def enable_attention_slicing(self, slice_size="auto") -> None:
        """A no-op: the U-Net's attention maps (16×16 and smaller) are small; for memory, pass
        a smaller batch_size (batch_size="auto" picks the largest that fits)."""

    def disable_attention_slicing(self) -> None:
        """A no-op (see enable_attention_slicing)."""

    def _no_offload(self, *args, **kwargs):
        raise NotImplementedError(
            "CPU offload is not supported: the pipeline holds one U-Net (36 M parameters for "
            "CIFAR-10, 114 M at 256×256), which fits any GPU; use pipe.to('cuda') instead")

    enable_model_cpu_offload = enable_sequential_cpu_offload = _no_offload
    enable_group_offload = _no_offload

    def maybe_free_model_hooks(self) -> None:
        """A no-op: no offload hooks are ever installed."""

    # Names of diffusers' DiffusionPipeline and what to use here instead.
    _DIFFUSERS_ONLY = {
        "vae": "a DDPM pipeline has no VAE (it samples pixels)",
        "text_encoder": "a DDPM pipeline is unconditional: no text encoder",
        "tokenizer": "a DDPM pipeline is unconditional: no tokenizer",
        "config": "the pipeline's parts are pipe.components; the U-Net's settings are "
                  "pipe.unet.config, the scheduler's pipe.scheduler.config",
        "_execution_device": "use pipe.device",
        "hf_device_map": "the pipeline runs on one device: pipe.device",
        "fuse_qkv_projections": "fast mode fuses q/k/v itself (one GEMM per attention block)",
        "enable_freeu": "FreeU is not implemented (it changes the images)",
        "from_pipe": "use DDPMPipeline(**pipe.components)",
    }
    _SURFACE = ("from_pretrained", "save_pretrained", "__call__", "to", "device", "dtype", "unet",
                "scheduler", "components", "progress_bar", "set_progress_bar_config",
                "numpy_to_pil", "mode", "max_batch_size", "last_peak_memory")

    def __getattr__(self, name: str):
        # only reached when normal lookup fails; dunder and private names stay plain (copy,
        # pickle and hasattr probe them)
        if name.startswith("__") or (name.startswith("_") and name not in self._DIFFUSERS_ONLY):
            raise AttributeError(name)
        why = self._DIFFUSERS_ONLY.get(name)
        raise AttributeError(
            f"ddpm_fast's DDPMPipeline has no attribute {name!r}" + (f": {why}" if why else "")
            + f". Its diffusers surface: {', '.join(self._SURFACE)}; no-ops: "
            "enable/disable_xformers_memory_efficient_attention, enable/disable_attention_slicing"
            " (README, 'The drop-in pipeline')")

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "DDPMPipeline":
        """A folder (diffusers format, an original DDPM checkpoint or our training run).
        torch_dtype= is diffusers' argument (the U-Net's dtype: see `dtype`); dtype= says the
        same (both given: they must agree)."""
        torch_dtype = kwargs.pop("torch_dtype", None)
        if torch_dtype is not None:
            if kwargs.get("dtype") not in (None, torch_dtype):
                raise ValueError(f"torch_dtype={torch_dtype} and dtype={kwargs['dtype']} "
                                 "disagree")
            kwargs["dtype"] = torch_dtype
        device = kwargs.get("device") or "cpu"
        # weights="raw": a checkpoint's trained weights instead of its EMA (checkpoints.load_unet)
        unet = checkpoints.load_unet(path, device=device, weights=kwargs.pop("weights", "ema"))
        return cls(unet, checkpoints.load_scheduler_config(path), **kwargs)

    @classmethod
    def from_diffusers(cls, pipe, **kwargs) -> "DDPMPipeline":
        """From a diffusers DDPMPipeline object (same weights, same scheduler: a DDPMScheduler
        or a DDIMScheduler, sampled as that pipeline samples with it)."""
        from .schedulers import live_config

        # a scheduler object's config does not name its class: say it (read_config routes it)
        config = {**live_config(pipe.scheduler), "_class_name": type(pipe.scheduler).__name__}
        return cls.from_diffusers_unet(pipe.unet, config, **kwargs)

    @classmethod
    def from_diffusers_unet(cls, diffusers_unet, scheduler_config: dict, **kwargs):
        unet = UNet2DModel(dict(diffusers_unet.config))
        unet.load_state_dict({k: v.float() for k, v in diffusers_unet.state_dict().items()})
        return cls(unet.to(kwargs.get("device") or "cpu"), scheduler_config, **kwargs)

    def save_pretrained(self, path) -> None:
        """A diffusers folder with the U-Net and pipe.scheduler's settings (a DDIMScheduler's
        folder names that class, as diffusers' save_pretrained writes it)."""
        config = dict(self.scheduler_config)    # a solver's names its class
        if self._ddim is not None:
            config = {"_class_name": "DDIMScheduler", **config, **self._ddim}
        checkpoints.save_pretrained(self.unet, path, config)

    @property
    def runner(self):
        """The fast runner over a private copy of pipe.unet, rebuilt whenever pipe.unet is
        another module or its weights changed since the copy (load_state_dict, an optimizer or
        EMA step, `pipe.unet = other`): fast mode never samples stale weights."""
        from .fast import FastRunner, WeightsWatch

        if self._runner is None or not self._runner_source.unchanged(self.unet):
            self._runner = None                  # free the old copy before making the new one
            self._runner = FastRunner(self.unet, self.device, **self._fast_args)
            self._runner_source = WeightsWatch(self.unet)
        return self._runner

    # ------------------------------------------------------------------ sampling
    def max_batch_size(self, fraction: float = 0.8) -> int:
        """The largest batch that should fit in `fraction` of the free memory of the device
        (measured on CUDA, estimated on CPU: see ddpm_fast.memory)."""
        from .memory import max_batch_size

        return max_batch_size(self.unet, self.device, self.dtype, fraction)

    def _model(self):
        """The U-Net as the reference samplers call it: float32 x_t, cast to the U-Net's dtype."""
        if self.unet.dtype == torch.float32:
            return self.unet
        unet, dtype = self.unet, self.unet.dtype
        return lambda x, t: unet(x.to(dtype), t)

    @torch.no_grad()
    def __call__(self, batch_size: int | str = 1, generator=None,
                 num_inference_steps: Optional[int] = None,
                 output_type: str = "pil", return_dict: bool = True, *, seed: Optional[int] = None,
                 first_image: int = 0, sampler: Optional[str] = None, eta: Optional[float] = None,
                 use_clipped_model_output: Optional[bool] = None,
                 variance: Optional[str] = None, clip: Optional[bool] = None, progress=None):
        """sampler: "ddpm", "ddim" or a few-step solver's name (SAMPLERS: "dpm++", "unipc", …),
        by default the scheduler's (pipe.scheduler: a DDIMScheduler samples DDIM exactly as
        diffusers' DDIMScheduler.step, with eta and use_clipped_model_output as in DDIMPipeline;
        a solver's class as diffusers' canonical loop with it, solver_plan). sampler="ddim" with
        a DDPMScheduler is ddpm_fast's DDIM extra (schedule.ddim_table). num_inference_steps: by
        default 1000 for DDPM and 50 for DDIM, as diffusers' DDPMPipeline and DDIMPipeline, 20
        for a solver (default_steps; at most the model's timesteps), the same as the CLI's. progress: a callable taking the number of
        finished steps; without it a tqdm bar is shown as in diffusers
        (set_progress_bar_config(disable=True) hides it)."""
        if batch_size == "auto":
            batch_size = self.max_batch_size()
        batch_size = positive_int(batch_size, "batch_size")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if sampler is None:
            sampler = self.default_sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if num_inference_steps is None:
            num_inference_steps = default_steps(sampler, self.schedule.num_timesteps)
        num_inference_steps = positive_int(num_inference_steps, "num_inference_steps")
        if sampler in BY_SAMPLER:
            if use_clipped_model_output is not None or clip is not None:
                raise ValueError(f"{'clip' if clip is not None else 'use_clipped_model_output'}"
                                 f" is a DDPM / DDIM argument; the {sampler} sampler's "
                                 "scheduler settings say what it does with x̂0")
            check_sampler_arguments(sampler, eta, variance)
            plan = self.solver_plan(sampler, num_inference_steps)
            x = self._sample_plan(plan, batch_size, generator, seed, first_image, progress)
            images = to_output(x, output_type)
            return ImagePipelineOutput(images) if return_dict else (images,)
        scheduler_ddim = sampler == "ddim" and self._ddim is not None
        if use_clipped_model_output and not scheduler_ddim:
            raise ValueError("use_clipped_model_output is a DDIMScheduler argument: set "
                             "pipe.scheduler to a DDIMScheduler to use it")
        check_sampler_arguments(sampler, eta, variance)
        eta = 0.0 if eta is None else eta
        variance = variance or self.variance
        self._check_unet_output(sampler, variance)
        if clip is not None and self.schedule.threshold is not None:
            raise ValueError("clip= has no effect: the scheduler's thresholding replaces x̂0 "
                             "clipping (as in diffusers); leave clip unset")
        clip = self.clip if clip is None else clip
        timesteps = self.schedule.timesteps(num_inference_steps)   # validates the step count
        if scheduler_ddim:
            from .schedulers import ddim_table

            table = ddim_table(self.schedule, timesteps, eta, self._ddim["set_alpha_to_one"],
                               bool(use_clipped_model_output))
        elif sampler == "ddim":
            table = self.schedule.ddim_table(timesteps, eta)
        else:
            table = self.schedule.step_table(timesteps, variance)
        c = self.unet.config
        shape = (batch_size, c.in_channels, c.sample_size, c.sample_size)
        memory.reset_peak(self.device)
        if self.mode == "fast" and seed is None:
            seed = draw_seed(generator)
        bar = None
        if progress is None:
            bar = self.progress_bar(total=len(timesteps))
            progress = bar.update
        try:
            if self.mode == "fast":
                x = self.runner.sample(table, timesteps, batch_size, seed, first_image, clip,
                                       num_train_timesteps=self.schedule.num_timesteps,
                                       progress=progress, threshold=self.schedule.threshold,
                                       variance=variance if sampler == "ddpm" else None)
            elif scheduler_ddim:
                noise = NoiseSource(shape, self.device, None if seed is not None else generator,
                                    seed, first_image, self.schedule.num_timesteps)
                x = sample_loop(self._model(), table, timesteps, noise, clip=clip,
                                progress=progress, threshold=self.schedule.threshold,
                                draws=ddim_draws(eta)).images
            else:
                common = dict(generator=None if seed is not None else generator, seed=seed,
                              first_image=first_image, num_inference_steps=num_inference_steps,
                              clip=clip, device=self.device, progress=progress)
                if sampler == "ddim":
                    x = ddim_sample(self._model(), self.schedule, shape, eta=eta,
                                    **common).images
                else:
                    x = ddpm_sample(self._model(), self.schedule, shape, variance=variance,
                                    **common).images
        finally:
            if bar is not None:
                bar.close()
        self.last_peak_memory = memory.peak_bytes(self.device)
        images = to_output(x, output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)

    @property
    def default_sampler(self) -> str:
        """The sampler pipe.scheduler runs: "ddpm", "ddim" or a solver family's name."""
        if self._solver is not None:
            return sampler_of(self._solver[0])
        return "ddpm" if self._ddim is None else "ddim"

    def solver_plan(self, sampler: str, num_inference_steps: int):
        """The plan (solvers/table.py) of a few-step sampler: with pipe.scheduler's settings when
        it is that sampler's scheduler, else the scheduler diffusers' swap would make,
        XScheduler.from_config(pipe.scheduler.config) (the settings the classes share carry
        over; the others take the solver's defaults)."""
        family = BY_SAMPLER[sampler]
        if self._solver is not None and self._solver[0] == family.scheduler:
            settings = self._solver[1]
        else:
            from .schedulers import live_config

            settings = family.settings({k: v for k, v in live_config(self.scheduler).items()
                                        if k in family.defaults})
            self._check_unet_output(sampler, settings.get("variance_type") or "fixed_small")
            return family.plan(settings, num_inference_steps)
        plan = family.plan(settings, num_inference_steps)
        self._keep_run_settings(plan.settings)
        return plan

    def _keep_run_settings(self, run_settings: dict) -> None:
        """Settings a run changes in pipe.scheduler's config, changed there as diffusers'
        set_timesteps changes them (DPMSolverSinglestepScheduler switches lower_order_final on
        for good), so that the next run sees them as diffusers' would."""
        kind, settings = self._solver
        changed = {k: v for k, v in run_settings.items() if k in settings and settings[k] != v}
        if not changed:
            return
        from .schedulers import FrozenConfig

        self._solver = (kind, {**settings, **changed})
        self.scheduler_config = {**self.scheduler_config, **changed}
        obj = self._scheduler
        if hasattr(obj, "register_to_config"):          # diffusers' scheduler object
            obj.register_to_config(**changed)
        elif isinstance(getattr(obj, "config", None), FrozenConfig):   # ddpm_fast's
            obj.config = FrozenConfig({**obj.config, **changed})

    def _sample_plan(self, plan, batch_size: int, generator, seed, first_image: int,
                     progress) -> torch.Tensor:
        """x_0 of a solver's plan: fast mode's runner, or the reference loop (diffusers' draws
        from `generator`, or Philox noise keyed by (seed, image) when a seed is given)."""
        from .ops.philox import philox_normal
        from .sampling import check_finite
        from .solvers import WORD, reference_sample

        c = self.unet.config
        shape = (batch_size, c.in_channels, c.sample_size, c.sample_size)
        total = self.schedule.num_timesteps
        memory.reset_peak(self.device)
        if self.mode == "fast" and seed is None:
            seed = draw_seed(generator)
        bar = None
        if progress is None:
            bar = self.progress_bar(total=len(plan.timesteps))
            progress = bar.update
        try:
            if self.mode == "fast":
                x = self.runner.sample_plan(plan, batch_size, seed, first_image, total,
                                            progress=progress)
            elif seed is not None:
                x_T = philox_normal(shape, seed, total, first_image, self.device)
                words = plan.table[:, WORD].long().tolist()
                x = reference_sample(
                    self._model(), plan, shape, device=self.device,
                    x_T=x_T * plan.init_noise_sigma, progress=progress,
                    noise=lambda k: philox_normal(shape, seed, words[k], first_image,
                                                  self.device))
            else:
                x = reference_sample(self._model(), plan, shape, generator, device=self.device,
                                     progress=progress)
            check_finite(x, len(plan.timesteps) - 1, plan.timesteps[-1], first_image)
        finally:
            if bar is not None:
                bar.close()
        self.last_peak_memory = memory.peak_bytes(self.device)
        return x

    # ------------------------------------------------------------------ benchmarks
    def benchmark_step_fn(self, batch: int):
        """One sampler step per call, for benchmarks/sample_throughput.py."""
        timesteps = self.schedule.timesteps(None)
        table = self.schedule.step_table(timesteps, self.variance, self.device)
        rule = dict(threshold=self.schedule.threshold, variance=self.variance)
        if self.mode == "fast":
            return self.runner.benchmark_step_fn(table, timesteps, batch, self.clip, **rule)
        from .ops.ddpm_step import ddpm_step, ddpm_step_general
        from .ops.philox import key_tensor
        from .schedule import LEARNED_VARIANCES

        fused = self.schedule.threshold is None and self.variance not in LEARNED_VARIANCES
        c = self.unet.config
        state = {"x": torch.randn(batch, c.in_channels, c.sample_size, c.sample_size,
                                  device=self.device)}
        key = key_tensor(0, 0, self.device)
        steps = torch.arange(len(timesteps), device=self.device)

        def step(i):
            i %= len(timesteps)
            with torch.no_grad():
                eps = self._model()(state["x"], torch.tensor(timesteps[i], device=self.device))
                noise = torch.randn_like(state["x"])
                # the reference loop's step: the fused op, or the torch step for thresholding
                # and learned variances
                state["x"] = (ddpm_step(state["x"], eps, table, steps[i:i + 1], key, noise,
                                        self.clip) if fused else
                              ddpm_step_general(state["x"], eps, table, steps[i:i + 1], key,
                                                noise, self.clip, **rule))

        return step


def accelerate(pipe, **kwargs) -> DDPMPipeline:
    """A fast ddpm_fast pipeline with the weights and scheduler of a diffusers DDPMPipeline."""
    kwargs.setdefault("mode", "fast")
    kwargs.setdefault("device", pipe.unet.device)
    return DDPMPipeline.from_diffusers(pipe, **kwargs)
