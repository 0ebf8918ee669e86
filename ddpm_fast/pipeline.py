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
from .sampling import ddim_sample, ddpm_sample
from .schedule import Schedule, check_scheduler_config
from .unet import UNet2DModel

MODES = ("reference", "fast")
OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class ImagePipelineOutput:
    images: object   # list of PIL images, np.ndarray [B, H, W, C] in [0, 1], or torch [B, C, H, W]


def to_output(x: torch.Tensor, output_type: str):
    """Model-space images in [-1, 1] → diffusers' output types (same conversion as diffusers)."""
    image = (x / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    image = image.cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return image
    from PIL import Image

    u8 = (image * 255).round().astype("uint8")
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


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class DDPMPipeline:
    def __init__(self, unet: UNet2DModel, scheduler_config: Optional[dict] = None, *,
                 mode: str = "reference", device=None, numerics: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None, use_graphs: Optional[bool] = None,
                 compile: Optional[bool] = None, autotune_convs: Optional[bool] = None,
                 kernels: Optional[str] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.device = torch.device(device) if device is not None else unet.device
        self.unet = unet.to(self.device).eval()
        self.scheduler_config = dict(scheduler_config or checkpoints.DEFAULT_SCHEDULER)
        numerics = numerics or ("diffusers" if mode == "reference" else "float64")
        # every DDPMScheduler setting is honoured or refused here, by name (never ignored)
        settings = check_scheduler_config(self.scheduler_config)
        self.schedule = Schedule.from_scheduler_config(settings, numerics)
        self.variance = settings["variance_type"]
        self.clip = settings["clip_sample"]
        if mode == "fast" and self.schedule.threshold is not None:
            raise ValueError("scheduler setting thresholding=True is not supported in fast mode "
                             "(its per-image quantile is not in the fused step); use "
                             "mode='reference', which honours it")
        self._fast_args = dict(dtype=dtype, use_graphs=use_graphs, compile=compile,
                               autotune_convs=autotune_convs, kernels=kernels)
        self._runner = None
        self.last_peak_memory: Optional[int] = None   # bytes, after each call (ddpm_fast.memory)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "DDPMPipeline":
        device = kwargs.get("device") or "cpu"
        # weights="raw": a checkpoint's trained weights instead of its EMA (checkpoints.load_unet)
        unet = checkpoints.load_unet(path, device=device, weights=kwargs.pop("weights", "ema"))
        return cls(unet, checkpoints.load_scheduler_config(path), **kwargs)

    @classmethod
    def from_diffusers(cls, pipe, **kwargs) -> "DDPMPipeline":
        """From a diffusers DDPMPipeline object (same weights, same scheduler settings)."""
        # a scheduler object's config does not name its class: say it, so that only a
        # DDPMScheduler is accepted
        config = {**dict(pipe.scheduler.config), "_class_name": type(pipe.scheduler).__name__}
        return cls.from_diffusers_unet(pipe.unet, config, **kwargs)

    @classmethod
    def from_diffusers_unet(cls, diffusers_unet, scheduler_config: dict, **kwargs):
        unet = UNet2DModel(dict(diffusers_unet.config))
        unet.load_state_dict({k: v.float() for k, v in diffusers_unet.state_dict().items()})
        return cls(unet.to(kwargs.get("device") or "cpu"), scheduler_config, **kwargs)

    def save_pretrained(self, path) -> None:
        checkpoints.save_pretrained(self.unet, path, self.scheduler_config)

    @property
    def runner(self):
        if self._runner is None:
            from .fast import FastRunner

            self._runner = FastRunner(self.unet, self.device, **self._fast_args)
        return self._runner

    # ------------------------------------------------------------------ sampling
    def max_batch_size(self, fraction: float = 0.8) -> int:
        """The largest batch that should fit in `fraction` of the free memory of the device
        (measured on CUDA, estimated on CPU: see ddpm_fast.memory)."""
        from .memory import max_batch_size

        dtype = self.runner.dtype if self.mode == "fast" else torch.float32
        return max_batch_size(self.unet, self.device, dtype, fraction)

    @torch.no_grad()
    def __call__(self, batch_size: int | str = 1, generator=None, num_inference_steps: int = 1000,
                 output_type: str = "pil", return_dict: bool = True, *, seed: Optional[int] = None,
                 first_image: int = 0, sampler: str = "ddpm", eta: float = 0.0,
                 variance: Optional[str] = None, clip: Optional[bool] = None, progress=None):
        if batch_size == "auto":
            batch_size = self.max_batch_size()
        batch_size = positive_int(batch_size, "batch_size")
        num_inference_steps = positive_int(num_inference_steps, "num_inference_steps")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        variance = variance or self.variance
        if clip is not None and self.schedule.threshold is not None:
            raise ValueError("clip= has no effect: the scheduler's thresholding replaces x̂0 "
                             "clipping (as in diffusers); leave clip unset")
        clip = self.clip if clip is None else clip
        timesteps = self.schedule.timesteps(num_inference_steps)   # validates the step count
        c = self.unet.config
        shape = (batch_size, c.in_channels, c.sample_size, c.sample_size)
        memory.reset_peak(self.device)
        if self.mode == "fast" and seed is None:
            seed = draw_seed(generator)

        if self.mode == "fast":
            table = (self.schedule.ddim_table(timesteps, eta) if sampler == "ddim"
                     else self.schedule.step_table(timesteps, variance))
            x = self.runner.sample(table, timesteps, batch_size, seed, first_image, clip,
                                   num_train_timesteps=self.schedule.num_timesteps,
                                   progress=progress)
        else:
            common = dict(generator=None if seed is not None else generator, seed=seed,
                          first_image=first_image, num_inference_steps=num_inference_steps,
                          clip=clip, device=self.device, progress=progress)
            if sampler == "ddim":
                x = ddim_sample(self.unet, self.schedule, shape, eta=eta, **common).images
            else:
                x = ddpm_sample(self.unet, self.schedule, shape, variance=variance,
                                **common).images
        self.last_peak_memory = memory.peak_bytes(self.device)
        images = to_output(x, output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)

    # ------------------------------------------------------------------ benchmarks
    def benchmark_step_fn(self, batch: int):
        """One sampler step per call, for benchmarks/sample_throughput.py."""
        timesteps = self.schedule.timesteps(None)
        table = self.schedule.step_table(timesteps, self.variance, self.device)
        if self.mode == "fast":
            return self.runner.benchmark_step_fn(table, timesteps, batch, self.clip)
        from .ops.ddpm_step import ddpm_step
        from .ops.philox import key_tensor

        c = self.unet.config
        state = {"x": torch.randn(batch, c.in_channels, c.sample_size, c.sample_size,
                                  device=self.device)}
        key = key_tensor(0, 0, self.device)
        steps = torch.arange(len(timesteps), device=self.device)

        def step(i):
            i %= len(timesteps)
            with torch.no_grad():
                eps = self.unet(state["x"], torch.tensor(timesteps[i], device=self.device))
                noise = torch.randn_like(state["x"])
                state["x"] = ddpm_step(state["x"], eps, table, steps[i:i + 1], key, noise, self.clip)

        return step


def accelerate(pipe, **kwargs) -> DDPMPipeline:
    """A fast ddpm_fast pipeline with the weights and scheduler of a diffusers DDPMPipeline."""
    kwargs.setdefault("mode", "fast")
    kwargs.setdefault("device", pipe.unet.device)
    return DDPMPipeline.from_diffusers(pipe, **kwargs)
