"""How much memory sampling takes, and the largest batch that fits.

- `peak_bytes(device)` / `reset_peak(device)`: the peak since the last reset: CUDA's allocator
  high-water mark on a GPU; on the CPU the process's peak resident set (getrusage), which is
  never reset and includes everything else the process holds.
- `max_batch_size(unet, device)`: on CUDA measured: one eager U-Net forward at two batch sizes
  gives bytes per image and fixed bytes, and the free memory bounds the batch. On the CPU
  estimated: the bytes of every module output for one image (a forward on the meta device, no
  memory and no compute; an upper bound on what a forward keeps alive) against MemAvailable.
"""
from __future__ import annotations

import os

import torch

from .unet import UNet2DModel

MAX_AUTO_BATCH = 4096


def reset_peak(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024   # Linux: KiB


def _available_cpu_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def activation_bytes_per_image(unet: UNet2DModel, dtype: torch.dtype) -> int:
    """Sum of every module's output bytes for one image, from a forward on the meta device."""
    with torch.device("meta"):
        model = UNet2DModel(unet.config).to(dtype).eval()
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    c = unet.config
    try:
        with torch.no_grad():
            model(torch.empty(1, c.in_channels, c.sample_size, c.sample_size, device="meta",
                              dtype=dtype), torch.zeros(1, dtype=torch.long, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return total


def _cuda_forward_bytes(unet: UNet2DModel, batch: int, dtype: torch.dtype) -> int:
    c = unet.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, device=unet.device,
                    dtype=dtype)
    t = torch.zeros(batch, dtype=torch.long, device=unet.device)
    reset_peak(unet.device)
    base = torch.cuda.memory_allocated(unet.device)
    with torch.no_grad():
        unet(x, t)
    return peak_bytes(unet.device) - base


def max_batch_size(unet: UNet2DModel, device=None, dtype: torch.dtype | None = None,
                   fraction: float = 0.8) -> int:
    """The largest batch whose sampling step should fit in `fraction` of the free memory."""
    device = torch.device(device or unet.device)
    dtype = dtype or unet.dtype
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    state_bytes = 3 * 4 * unet.config.in_channels * unet.config.sample_size ** 2   # x, eps, out
    if device.type == "cuda":
        probe = unet if unet.device == device and unet.dtype == dtype else \
            UNet2DModel(unet.config).to(device, dtype).eval()
        small, large = _cuda_forward_bytes(probe, 2, dtype), _cuda_forward_bytes(probe, 16, dtype)
        per_image = max((large - small) / 14, 1.0) + state_bytes
        fixed = max(small - 2 * per_image, 0.0)
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        per_image = activation_bytes_per_image(unet, dtype) + state_bytes
        fixed = 0.0
        free = _available_cpu_bytes()
    batch = int((free * fraction - fixed) // per_image)
    return max(1, min(batch, MAX_AUTO_BATCH))
