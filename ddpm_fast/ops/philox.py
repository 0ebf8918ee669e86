"""Philox-4x32-10 Gaussian noise keyed by (seed, image index), counter (step, element).

Image n of a batch whose key is (seed, first) gets the normals of image index first + n, so an
image's noise depends on its seed and index only: never on batch size, device or backend. Element
e of an image uses Philox counter (e // 4, step, seed >> 32, 0) with key (seed & 0xffffffff, image)
and output word e % 4; words (0, 1) and (2, 3) become two normals each by Box–Muller, evaluated in
float64 and rounded once to float32 (csrc/common.h holds the C++/CUDA twin of this file).
"""
from __future__ import annotations

import math

import torch

from .. import _native
from . import backend

MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a·m for a in [0, 2³²) held in int64 (no uint64 in torch)."""
    lo = (a * m) & MASK32  # the int64 product may wrap, its low 32 bits are still exact
    hi = (a * (m >> 16) + ((a * (m & 0xFFFF)) >> 16)) >> 16  # every partial product < 2⁴⁸
    return hi & MASK32, lo


def philox4x32_10_reference(c0, c1, c2, c3, k0, k1) -> torch.Tensor:
    """Philox-4x32-10 on int64 tensors (broadcast) holding uint32 values; returns [..., 4]."""
    c = [torch.as_tensor(v, dtype=torch.int64) for v in (c0, c1, c2, c3)]
    k0 = torch.as_tensor(k0, dtype=torch.int64)
    k1 = torch.as_tensor(k1, dtype=torch.int64)
    *c, k0, k1 = torch.broadcast_tensors(*c, k0, k1)
    for _ in range(10):
        hi0, lo0 = _mulhilo(c[0], _M0)
        hi1, lo1 = _mulhilo(c[2], _M1)
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0 = (k0 + _W0) & MASK32
        k1 = (k1 + _W1) & MASK32
    return torch.stack(c, dim=-1)


def _uniform_open01(x: torch.Tensor) -> torch.Tensor:
    return ((x >> 8).double() + 0.5) * 2.0 ** -24


def _box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.sqrt(-2.0 * torch.log(_uniform_open01(a)))
    theta = (2 * math.pi) * _uniform_open01(b)
    return (r * torch.cos(theta)).float(), (r * torch.sin(theta)).float()


def philox_normal_reference(seed: int, first_image: int, num_images: int, per_image: int,
                            step: int, device="cpu") -> torch.Tensor:
    """Normals [num_images, per_image] in float32, computed with torch integer ops."""
    groups = (per_image + 3) // 4
    image = torch.arange(num_images, dtype=torch.int64, device=device)[:, None] + first_image
    group = torch.arange(groups, dtype=torch.int64, device=device)[None, :]
    r = philox4x32_10_reference(group & MASK32, step & MASK32, (seed >> 32) & MASK32, 0,
                                seed & MASK32, image & MASK32)
    z0, z1 = _box_muller(r[..., 0], r[..., 1])
    z2, z3 = _box_muller(r[..., 2], r[..., 3])
    z = torch.stack([z0, z1, z2, z3], dim=-1).reshape(num_images, groups * 4)
    return z[:, :per_image].contiguous()


def key_tensor(seed: int, first_image: int = 0, device="cpu") -> torch.Tensor:
    """The int64 [2] tensor (seed, index of image 0) that the kernels read."""
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if not 0 <= first_image < 2 ** 32:
        raise ValueError(f"image index must be in [0, 2**32), got {first_image}")
    return torch.tensor([seed, first_image], dtype=torch.int64, device=device)


def _check(key, step):
    """The kernels read key[0], key[1] and step[0] through raw pointers on key's device."""
    torch._check(key.dtype == torch.int64 and key.numel() == 2 and key.is_contiguous(),
                 lambda: "key must be a contiguous int64 [2] tensor")
    torch._check(step.dtype == torch.int64 and step.numel() >= 1,
                 lambda: "step must be an int64 tensor with at least one element")
    torch._check(step.device == key.device,
                 lambda: f"philox_normal: step is on {step.device}, key on {key.device}")


@torch.library.custom_op("ddpm_fast::philox_normal", mutates_args=())
def _philox_normal_op(key: torch.Tensor, step: torch.Tensor, num_images: int, per_image: int
                      ) -> torch.Tensor:
    _check(key, step)
    device = key.device
    out = torch.empty(num_images, per_image, dtype=torch.float32, device=device)
    which = backend.select("philox_normal", device)
    if which == "triton" and num_images and per_image:
        from ..kernels.triton import sampler

        with _native.on_device(out):
            sampler.philox_normal(out, key, step)
        return out
    if which == "native" and num_images and per_image:
        if device.type == "cuda":
            with _native.on_device(out):
                _native._C.philox_normal_cuda(out.data_ptr(), key.data_ptr(), step.data_ptr(),
                                              num_images, per_image, _native.stream_of(out))
        else:
            _native._C.philox_normal_cpu(out.data_ptr(), key.data_ptr(), step.data_ptr(),
                                         num_images, per_image)
        return out
    k = key.tolist()
    out.copy_(philox_normal_reference(int(k[0]), int(k[1]), num_images, per_image,
                                      int(step.reshape(-1)[0]), device))
    return out


@_philox_normal_op.register_fake
def _(key, step, num_images, per_image):
    _check(key, step)
    return key.new_empty(num_images, per_image, dtype=torch.float32)


def philox_normal(shape, seed: int, step: int, first_image: int = 0, device="cpu") -> torch.Tensor:
    """Normals of the given shape [N, ...]: image n is image index first_image + n."""
    shape = tuple(shape)
    key = key_tensor(seed, first_image, device)
    step_t = torch.tensor([step], dtype=torch.int64, device=device)
    per_image = math.prod(shape[1:])
    return _philox_normal_op(key, step_t, shape[0], per_image).view(shape)
