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
    if unet.config.out_channels != unet.config.in_channels:     # e.g. 2·C: a learned σ² head
        raise ValueError(f"training minimises L_simple on ε: the U-Net must output its "
                         f"{unet.config.in_channels} input channels, it has out_channels="
                         f"{unet.config.out_channels} (learned variances need L_hybrid, not "
                         "implemented)")
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
