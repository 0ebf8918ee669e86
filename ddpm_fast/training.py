"""L_simple training (Ho et al. 2020, Algorithm 1) with AdamW, warm-up, gradient clipping and an
EMA of the weights; checkpoints are written atomically and a run resumes exactly.

Checkpoint folder layout: each checkpoint is a complete folder step-NNNNNNNN/ written under a
temporary name and renamed into place; the file `latest` (replaced atomically, last) names the
current one. A crash at any moment leaves `latest` pointing at a whole, consistent checkpoint.
    step-NNNNNNNN/model.safetensors, ema.safetensors   weights (diffusers names)
    step-NNNNNNNN/optimizer.pt                         AdamW state (loaded with weights_only)
    step-NNNNNNNN/rng.pt                               torch RNG state
    step-NNNNNNNN/state.json                           step, config, training arguments
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .atomic import atomic_dir, atomic_write_bytes
from .data import digits_dataset  # noqa: F401  (re-exported: the shipped model's data)
from .data import to_model_space
from .sampling import q_sample
from .schedule import Schedule
from .unet import UNet2DModel, UNetConfig


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    hflip: bool = False
    precision: str = "fp32"         # fp32, bf16 or fp16 autocast (fp16 with a gradient scaler)
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 1000


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def l_simple(unet, schedule: Schedule, x0: torch.Tensor, generator=None,
             autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t)‖², t uniform over the schedule. With autocast_dtype
    the U-Net runs under autocast; the noising and the loss stay fp32."""
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (b,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    x_t = q_sample(schedule, x0, t, noise)
    with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        eps = unet(x_t, t)
    return F.mse_loss(eps.float(), noise)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← ema + (1 − decay)(model − ema) for every parameter, as one multi-tensor op (one
    kernel launch on a GPU, not one per parameter)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()],
                         1 - decay)


def save_checkpoint(folder: Path, model, ema, opt, step: int, cfg: TrainConfig,
                    scaler=None, schedule: Optional[Schedule] = None) -> Path:
    """Collective under torchrun (every rank calls it: RNG states are gathered); rank 0 writes."""
    import shutil

    from safetensors.torch import save_file

    from . import distributed

    rng_states = distributed.gather_objects(torch.get_rng_state())
    if not distributed.is_main():
        distributed.barrier()
        return folder / f"step-{step:08d}"
    name = f"step-{step:08d}"
    with atomic_dir(folder / name) as tmp:
        for label, m in (("model", model), ("ema", ema)):
            save_file({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()},
                      str(tmp / f"{label}.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        torch.save({"torch": rng_states}, tmp / "rng.pt")
        state = {"step": step, "unet_config": model.config.to_dict(), "train": asdict(cfg),
                 "grad_scaler": scaler.state_dict() if scaler is not None else {},
                 # the schedule trained with: sampling and conversion read it back
                 "scheduler_config": (schedule or Schedule.linear()).scheduler_config()}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    atomic_write_bytes(folder / "latest", name.encode())
    for old in folder.glob("step-*"):          # keep only the checkpoint `latest` names
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return folder / name


def has_checkpoint(folder: Path) -> bool:
    return (folder / "latest").is_file()


def load_checkpoint(folder: Path, model, ema, opt, scaler=None,
                    schedule: Optional[Schedule] = None) -> int:
    from safetensors.torch import load_file

    ckpt = folder / (folder / "latest").read_text().strip()
    state = json.loads((ckpt / "state.json").read_text())
    saved, wanted = state.get("unet_config", {}), model.config.to_dict()
    if saved != wanted:
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise ValueError(f"{ckpt}: the checkpoint's U-Net differs from this run's "
                         f"({', '.join(diff)}): resume with the same data and model settings, "
                         "or train into a new --out")
    saved = state.get("scheduler_config")       # absent in checkpoints of older versions
    wanted = json.loads(json.dumps((schedule or Schedule.linear()).scheduler_config()))
    if saved is not None and saved != wanted:
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise ValueError(f"{ckpt}: the checkpoint was trained with another schedule "
                         f"({', '.join(diff)}): resume with the same schedule, or train into a "
                         "new --out")
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    ema.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    from . import distributed

    rank, size = distributed.world()
    states = torch.load(ckpt / "rng.pt", weights_only=True)["torch"]
    if isinstance(states, torch.Tensor):     # a single-process checkpoint
        states = [states]
    if len(states) == size:                  # same world size: each rank continues its stream
        torch.set_rng_state(states[rank])
    return int(state["step"])


def train(unet: UNet2DModel, data: torch.Tensor, cfg: TrainConfig, out_dir=None,
          schedule: Optional[Schedule] = None, resume: bool = False, device="cpu",
          log: Callable[[str], None] = print) -> tuple[UNet2DModel, list[float]]:
    """Train on `data` ([N, C, H, W]: float in [-1, 1], or uint8 pixels converted a batch at a
    time, which keeps a large dataset in a quarter of the memory); returns the EMA model and
    the loss curve."""
    if data.ndim != 4 or data.shape[1:] != (unet.config.in_channels, unet.config.sample_size,
                                            unet.config.sample_size):
        raise ValueError(f"data shape {tuple(data.shape)} does not fit the model "
                         f"({unet.config.in_channels}×{unet.config.sample_size}²)")
    from . import distributed

    if cfg.precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got "
                         f"{cfg.precision!r}")
    schedule = schedule or Schedule.linear()
    if schedule.prediction_type != "epsilon":
        raise ValueError(f"training minimises L_simple, an ε-prediction loss; the schedule's "
                         f"prediction_type is {schedule.prediction_type!r}")
    rank, world_size = distributed.world()
    torch.manual_seed(cfg.seed + rank)       # ranks draw different batches, times and noise
    model = unet.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    # the fused CUDA AdamW updates every parameter in a few kernels instead of a loop of them
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0,
                            fused=torch.device(device).type == "cuda")
    autocast_dtype = AUTOCAST_DTYPES[cfg.precision]
    # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=cfg.precision == "fp16")
    step = 0
    folder = Path(out_dir) if out_dir else None
    if resume and folder and has_checkpoint(folder):
        step = load_checkpoint(folder, model, ema, opt, scaler, schedule)
        log(f"resumed from {folder} at step {step}")
    # DDP broadcasts rank 0's weights at construction and averages gradients in backward, so
    # every rank's model (and EMA) stays identical; the global batch is world_size × batch_size
    net = (torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model)
    data = data.to(device)
    # losses stay on the device until a log line, a checkpoint or every 1000th step reads them
    # (and checks them for NaN/Inf): no host sync per step
    losses, pending, t0 = [], [], time.perf_counter()
    while step < cfg.steps:
        idx = torch.randint(0, data.shape[0], (cfg.batch_size,), device=device)
        x0 = to_model_space(data[idx])
        if cfg.hflip:
            flip = torch.rand(cfg.batch_size, device=device) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
        loss = l_simple(net, schedule, x0, autocast_dtype=autocast_dtype)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)                 # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        ema_update(ema, model, cfg.ema_decay)
        step += 1
        pending.append(loss.detach())
        logging = bool(cfg.log_every) and step % cfg.log_every == 0
        saving = folder is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps)
        if logging or saving or step == cfg.steps or len(pending) == 1000:
            losses += _host_losses(pending, step, scaler.is_enabled())
            pending = []
        if logging and rank == 0:
            recent = losses[-cfg.log_every:]
            log(f"step {step}/{cfg.steps} loss {sum(recent) / len(recent):.4f} "
                f"({(time.perf_counter() - t0) / step:.3f} s/step)")
        if saving:
            save_checkpoint(folder, model, ema, opt, step, cfg, scaler, schedule)
    return ema, losses


class TrainingDivergedError(RuntimeError):
    """The L_simple loss became NaN or Inf; the message names the first such step."""


def _host_losses(pending: list, step: int, scaled: bool) -> list[float]:
    """The device losses of the last len(pending) steps (ending at `step`) as floats, in one
    sync. A NaN/Inf loss stops training before a checkpoint can save broken weights; with fp16's
    gradient scaler, whose overflowing steps are skipped, only if the latest loss is one."""
    values = torch.stack(pending).float().tolist()
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad and (not scaled or bad[-1] == len(values) - 1):
        first = step - len(values) + bad[0] + 1
        raise TrainingDivergedError(
            f"training diverged: the loss is {values[bad[0]]} at step {first} (checked at step "
            f"{step}); lower --lr, or train with --precision bf16 or fp32")
    return values


DIGITS_CONFIG = UNetConfig(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
    layers_per_block=1, norm_num_groups=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.1)


# ---------------------------------------------------------------------- likelihood (bits/dim)

def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The normal CDF as the original DDPM code computes it (diffusion_utils_2.py
    approx_standard_normal_cdf): 0.5 (1 + tanh(√(2/π) (x + 0.044715 x³)))."""
    return 0.5 * (1.0 + torch.tanh((2.0 / math.pi) ** 0.5 * (x + 0.044715 * x.pow(3))))


def standard_normal_cdf(x):
    """The exact normal CDF, 0.5 (1 + erf(x/√2))."""
    return 0.5 * (1.0 + torch.erf(x / 2 ** 0.5))


def _discretized_gaussian_log_likelihood(x, mean, log_scale, exact_cdf: bool = False):
    """log p(x) of 8-bit data in [-1, 1] under a Gaussian discretised to bins of width 2/255,
    the outermost bins extended to ±∞ (Ho et al. 2020, section 3.3). The CDF is the original
    code's tanh approximation (discretized_gaussian_log_likelihood there), so that the numbers
    reproduce its implementation; exact_cdf=True uses erf instead."""
    cdf = standard_normal_cdf if exact_cdf else approx_standard_normal_cdf
    centred, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (centred + 1 / 255))
    cdf_min = cdf(inv_std * (centred - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


@torch.no_grad()
def bits_per_dim(unet, schedule: Schedule, x0: torch.Tensor, variance: str = "fixed_large",
                 clip: bool = True, num_terms: Optional[int] = None, generator=None,
                 exact_cdf: bool = False) -> dict:
    """The variational bound L_vlb = L_T + Σ_{t>1} L_{t−1} + L_0 in bits per dimension, per image
    (Ho et al. 2020, eq. 5; the paper's NLL metric). x0: 8-bit images scaled to [-1, 1].
    num_terms: evaluate that many KL terms (the smallest t exactly, the rest evenly spaced and
    scaled: an estimate, for speed); None evaluates all T − 1 of them. The decoder term L_0
    uses the original code's tanh approximation of the normal CDF; exact_cdf=True the exact
    (erf) one. Returns per-image tensors: total, prior, decoder, kl."""
    if schedule.prediction_type != "epsilon":
        raise ValueError(f"bits_per_dim needs an ε-predicting model; the scheduler's "
                         f"prediction_type is {schedule.prediction_type!r}")
    device, f64 = x0.device, torch.float64
    n_t = schedule.num_timesteps
    x0 = x0.to(torch.float64)
    abar = schedule.on(device, "alphas_cumprod", f64)
    post_var = schedule.on(device, "posterior_variance", f64)
    post_logvar = schedule.on(device, "posterior_log_variance_clipped", f64)
    c1 = schedule.on(device, "posterior_mean_coef1", f64)
    c2 = schedule.on(device, "posterior_mean_coef2", f64)
    betas = schedule.betas.to(device, f64)
    model_logvar = (torch.log(torch.cat([post_var[1:2], betas[1:]])) if variance == "fixed_large"
                    else post_logvar)
    dims = x0[0].numel()
    ln2 = torch.log(torch.tensor(2.0, dtype=f64))

    def term(t: int):
        """(mean over dims, in nats) of L_{t-1} for t ≥ 1 (KL) or L_0 for t = 0 (decoder)."""
        noise = torch.randn(x0.shape, generator=generator, dtype=f64, device=device)
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
        xt = q_sample(schedule, x0, tt, noise)
        eps = unet(xt.to(unet.dtype), tt).to(f64)
        x0_pred = (xt - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        if clip:
            x0_pred = x0_pred.clamp(-schedule.clip_range, schedule.clip_range)
        mean = c1[t] * x0_pred + c2[t] * xt
        if t == 0:
            ll = _discretized_gaussian_log_likelihood(x0, mean, 0.5 * model_logvar[t],
                                                      exact_cdf)
            return -ll.flatten(1).mean(1)
        kl = _normal_kl(c1[t] * x0 + c2[t] * xt, post_logvar[t], mean, model_logvar[t])
        return kl.flatten(1).mean(1)

    if num_terms is None or num_terms >= n_t - 1:
        kl = sum(term(t) for t in range(1, n_t))
    else:
        # the terms are largest and change fastest at small t: those are summed exactly, the
        # rest estimated from evenly spaced samples (stratified, scaled to their count)
        exact = min(32, n_t - 1, max(num_terms // 2, 1))
        kl = sum(term(t) for t in range(1, exact + 1))
        rest = n_t - 1 - exact
        k = max(num_terms - exact, 1)
        if rest > 0:
            samples = torch.linspace(exact + 1, n_t - 1, k).round().long().tolist()
            kl = kl + sum(term(t) for t in samples) * (rest / len(samples))
    decoder = term(0)
    prior = _normal_kl(abar[-1].sqrt() * x0, torch.log(1 - abar[-1]),
                       torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).mean(1)
    to_bits = 1 / ln2
    return {"total": (kl + decoder + prior) * to_bits, "prior": prior * to_bits,
            "decoder": decoder * to_bits, "kl": kl * to_bits, "dims": dims}


def main(argv=None) -> None:
    """python -m ddpm_fast.training OUT_DIR [STEPS]: train the shipped digits model and write its
    EMA weights (fp16) as a pipeline folder at OUT_DIR/pipeline."""
    import sys

    from .checkpoints import save_pretrained

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0])
    steps = int(argv[1]) if len(argv) > 1 else 10000
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=steps, batch_size=64, lr=5e-4, warmup=500, ema_decay=0.999,
                      seed=0, log_every=500, checkpoint_every=2000)
    ema, losses = train(UNet2DModel(DIGITS_CONFIG), digits_dataset(DIGITS_CONFIG.sample_size, "train"), cfg,
                        out_dir=out / "checkpoint", resume=True)
    ema.config.dropout = 0.0   # inference config (dropout is inactive in eval mode anyway)
    save_pretrained(ema, out / "pipeline", Schedule.linear().scheduler_config(),
                    dtype=torch.float16)
    print(f"final loss {losses[-1]:.4f}; wrote {out / 'pipeline'}" if losses else "nothing to do")


if __name__ == "__main__":
    main()
