"""Convolution with the U-Net's neighbours folded in: the op `ddpm_fast::conv2d`.

    u = cat([x, skip], dim=1)                   when skip is given (the up blocks' concatenation)
    u = GroupNorm(u)                            when norm = (weight, bias, groups, eps), from
                                                norm_stats when given, else from u itself
    u = nearest-2×-upsample(u)                  when upsample (Upsample2D's convolution)
    u = silu(u)                                 when silu
    y = conv2d(pad(u, padding), weight, bias, stride)   zero padding on the activations
    y += temb[:, :, None, None]                 temb [N, Cout] or [1, Cout]
    y += residual                               or
    y += conv1x1(shortcut input, shortcut weight) + shortcut bias     (on the raw input)

`return_stats=True` also returns the statistics of y that a following conv2d's `norm_stats` takes.
(Upsampling before or after the norm is the same thing: nearest-neighbour copies keep every
channel's mean and variance, and the norm is a per-channel affine map.)

Statistics format: fp32 [N, T, C, 3] of per-channel partials (count, mean, M2) over T tiles of
each image's pixels (the reference writes T = 1, the Triton kernel one partial per output tile).
They are merged with Chan et al.'s formula into per-group mean and variance, never as
E[x²] − E[x]², and being per channel they concatenate along C, so the norm of cat([x, skip]) takes
(stats of x, stats of skip) even when a group straddles the boundary. Turning partials into a
norm's scale and shift is a small pass of its own (one launch per norm) unless the producer was
told the next norm's groups (`stats_groups=G`, with `next_skip_stats` when that norm reads
cat([y, skip])): then its last program per image also merges them into [N, G, 3] group
statistics (a `ConvStats`), which the consumer's prologue reads directly. The "conv" U-Net does
this for all of its norms, so none is a launch of its own.

Backends: the torch reference below defines the op and runs on CPU by default; the Triton
implicit-GEMM kernel (kernels/triton/conv2d.py) runs on CUDA, and on CPU tensors under
TRITON_INTERPRET=1 for tests.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _native
from . import backend

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STAT_FIELDS = 3          # count, mean, M2


class Norm(NamedTuple):
    """The GroupNorm folded into a convolution's input."""
    weight: torch.Tensor
    bias: torch.Tensor
    groups: int
    eps: float


class ConvStats(NamedTuple):
    """What `return_stats=True, stats_groups=G` returns beside y: the per-channel partials
    [N, T, C, 3] and the G groups' (count, mean, M2) [N, G, 3] of y, or of cat([y, skip]) when
    the skip's stats were given as `next_skip_stats`, finished by the producer itself (its last
    program per image, on the Triton path), so that the following norm needs no pass of its
    own. `channels`: how many channels the groups cover (C, or C + the skip's)."""
    partials: torch.Tensor
    groups: torch.Tensor
    channels: int


# ---------------------------------------------------------------------- statistics
def chan_merge(count, mean, m2, dim: int):
    """Merge partial (count, mean, M2) along `dim` (Chan, Golub & LeVeque): numerically safe for
    any split. Empty partials (count 0) contribute nothing."""
    total = count.sum(dim, keepdim=True)
    merged_mean = (count * mean).sum(dim, keepdim=True) / total.clamp(min=1)
    m2 = (m2 + count * (mean - merged_mean) ** 2).sum(dim)
    return total.squeeze(dim), merged_mean.squeeze(dim), m2


def channel_stats(y: torch.Tensor) -> torch.Tensor:
    """Per-channel statistics of y [N, C, H, W] as one partial per image: [N, 1, C, 3]."""
    y = y.float()
    var, mean = torch.var_mean(y, dim=(2, 3), correction=0)
    count = torch.full_like(mean, y.shape[2] * y.shape[3])
    return torch.stack([count, mean, var * count], dim=-1)[:, None]


def per_channel_stats(stats: torch.Tensor) -> torch.Tensor:
    """[N, T, C, 3] partials → [N, C, 3], merged over tiles."""
    count, mean, m2 = chan_merge(stats[..., 0], stats[..., 1], stats[..., 2], dim=1)
    return torch.stack([count, mean, m2], dim=-1)


def group_stats(stats: torch.Tensor | Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """[N, T, C, 3] partials (or several parts', concatenated along C) → [N, groups, 3]: each
    group's (count, mean, M2)."""
    parts = [stats] if isinstance(stats, torch.Tensor) else stats
    per_channel = torch.cat([per_channel_stats(s) for s in parts], dim=1)
    n, c, _ = per_channel.shape
    grouped = per_channel.view(n, groups, c // groups, STAT_FIELDS)
    return torch.stack(chan_merge(grouped[..., 0], grouped[..., 1], grouped[..., 2], dim=2), -1)


def norm_affine(stats: Sequence[torch.Tensor], norm: Norm):
    """GroupNorm as a per-(image, channel) affine map u·scale + shift, both fp32 [N, C], from the
    per-channel statistics of each input part (x, then skip)."""
    per_channel = torch.cat([per_channel_stats(s) for s in stats], dim=1)       # [N, C, 3]
    n, c, _ = per_channel.shape
    grouped = per_channel.view(n, norm.groups, c // norm.groups, STAT_FIELDS)
    count, mean, m2 = chan_merge(grouped[..., 0], grouped[..., 1], grouped[..., 2], dim=2)
    rstd = torch.rsqrt(m2 / count + norm.eps)                                # [N, G]
    rstd = rstd.repeat_interleave(c // norm.groups, dim=1)
    mean = mean.repeat_interleave(c // norm.groups, dim=1)
    scale = norm.weight.float()[None] * rstd
    return scale, norm.bias.float()[None] - mean * scale


# ---------------------------------------------------------------------- arguments
def conv_padding(padding, kernel_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) as F.pad takes it, from torch's int / (ph, pw) or F.pad's 4-tuple;
    None means 'same' for odd kernels (k // 2 on every side)."""
    if padding is None:
        kh, kw = kernel_size
        return (kw // 2, kw // 2, kh // 2, kh // 2)
    if isinstance(padding, int):
        return (padding,) * 4
    padding = tuple(int(p) for p in padding)
    if len(padding) == 2:
        return (padding[1], padding[1], padding[0], padding[0])
    if len(padding) == 4:
        return padding
    raise ValueError(f"padding must be an int, (ph, pw) or (left, right, top, bottom), "
                     f"got {padding!r}")


def output_size(h: int, w: int, kernel_size, stride: int, pad, upsample: bool):
    scale = 2 if upsample else 1
    kh, kw = kernel_size
    return ((h * scale + pad[2] + pad[3] - kh) // stride + 1,
            (w * scale + pad[0] + pad[1] - kw) // stride + 1)


def _memory_format(x: torch.Tensor):
    return (torch.channels_last if x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)


def _check(x, weight, bias, stride, pad, upsample, skip, norm_w, norm_b, groups, stats_x,
           stats_skip, temb, residual, sc_x, sc_skip, sc_w, sc_b, groups_x=None,
           stats_groups=0, cat_stats=None):
    """Shapes, dtypes and devices, before anything runs: each message names the argument."""
    def same_device(name, t):
        torch._check(t.device == x.device,
                     lambda: f"conv2d: {name} is on {t.device}, x on {x.device}")

    torch._check(x.dim() == 4, lambda: f"conv2d: x must be [N, C, H, W], got {tuple(x.shape)}")
    torch._check(x.dtype in FLOAT_DTYPES, lambda: f"conv2d: x dtype {x.dtype} not supported")
    n, cx, h, w = x.shape
    cin = cx
    if skip is not None:
        same_device("skip", skip)
        torch._check(skip.dim() == 4 and skip.shape[0] == n and skip.shape[2:] == x.shape[2:],
                     lambda: f"conv2d: skip {tuple(skip.shape)} must be [{n}, C, {h}, {w}]")
        torch._check(skip.dtype == x.dtype,
                     lambda: f"conv2d: skip dtype {skip.dtype} differs from x's {x.dtype}")
        cin += skip.shape[1]
    same_device("weight", weight)
    torch._check(weight.dim() == 4 and weight.shape[1] == cin,
                 lambda: f"conv2d: weight {tuple(weight.shape)} must be [Cout, {cin}, KH, KW]")
    torch._check(weight.dtype == x.dtype,
                 lambda: f"conv2d: weight dtype {weight.dtype} differs from x's {x.dtype}")
    cout = weight.shape[0]
    if bias is not None:
        same_device("bias", bias)
        torch._check(bias.shape == (cout,), lambda: f"conv2d: bias must be [{cout}]")
    torch._check(stride in (1, 2), lambda: f"conv2d: stride must be 1 or 2, got {stride}")
    torch._check(min(pad) >= 0, lambda: f"conv2d: padding must be non-negative, got {pad}")
    ho, wo = output_size(h, w, weight.shape[2:], stride, pad, upsample)
    torch._check(ho > 0 and wo > 0, lambda: f"conv2d: input {h}×{w} too small for the kernel")
    if norm_w is not None:
        same_device("norm weight", norm_w)
        same_device("norm bias", norm_b)
        torch._check(groups > 0 and cin % groups == 0,
                     lambda: f"conv2d: norm groups {groups} must divide the {cin} input channels")
        torch._check(norm_w.shape == (cin,) and norm_b.shape == (cin,),
                     lambda: f"conv2d: norm weight and bias must be [{cin}]")
    for name, s, c in (("norm_stats", stats_x, cx),
                       ("norm_stats for skip", stats_skip, cin - cx)):
        if s is not None:
            torch._check(norm_w is not None, lambda: f"conv2d: {name} given without norm")
            same_device(name, s)
            torch._check(s.dim() == 4 and s.shape[0] == n and s.shape[2] == c
                         and s.shape[3] == STAT_FIELDS and s.dtype == torch.float32,
                         lambda: f"conv2d: {name} must be fp32 [{n}, T, {c}, 3], got "
                                 f"{s.dtype} {tuple(s.shape)}")
    torch._check(stats_skip is None or skip is not None,
                 lambda: "conv2d: norm_stats for skip given without skip")
    if groups_x is not None:
        same_device("norm_stats' groups", groups_x)
        torch._check(stats_x is not None and groups_x.shape == (n, groups, STAT_FIELDS)
                     and groups_x.dtype == torch.float32,
                     lambda: f"conv2d: norm_stats' group statistics must be fp32 "
                             f"[{n}, {groups}, 3], got {groups_x.dtype} {tuple(groups_x.shape)}")
    c_cat = 0
    if cat_stats is not None:
        same_device("next_skip_stats", cat_stats)
        torch._check(stats_groups > 0, lambda: "conv2d: next_skip_stats given without "
                                               "stats_groups")
        torch._check(cat_stats.dim() == 4 and cat_stats.shape[0] == n
                     and cat_stats.shape[3] == STAT_FIELDS and cat_stats.dtype == torch.float32,
                     lambda: f"conv2d: next_skip_stats must be fp32 [{n}, T, C, 3], got "
                             f"{cat_stats.dtype} {tuple(cat_stats.shape)}")
        c_cat = cat_stats.shape[2]
    c_out = weight.shape[0] + c_cat
    torch._check(stats_groups >= 0 and (stats_groups == 0 or c_out % stats_groups == 0),
                 lambda: f"conv2d: stats_groups {stats_groups} must divide the {c_out} "
                         "channels the next norm reads")
    if temb is not None:
        same_device("temb", temb)
        torch._check(temb.dim() == 2 and temb.shape[0] in (1, n) and temb.shape[1] == cout,
                     lambda: f"conv2d: temb must be [{n}, {cout}] or [1, {cout}], got "
                             f"{tuple(temb.shape)}")
    if residual is not None:
        same_device("residual", residual)
        torch._check(residual.shape == (n, cout, ho, wo),
                     lambda: f"conv2d: residual must be [{n}, {cout}, {ho}, {wo}], got "
                             f"{tuple(residual.shape)}")
    if sc_w is not None:
        torch._check(residual is None, lambda: "conv2d: give residual or shortcut, not both")
        for name, t in (("shortcut input", sc_x), ("shortcut skip", sc_skip),
                        ("shortcut weight", sc_w), ("shortcut bias", sc_b)):
            if t is not None:
                same_device(name, t)
        csc = sc_x.shape[1] + (0 if sc_skip is None else sc_skip.shape[1])
        torch._check(sc_x.dim() == 4 and sc_x.shape[0] == n and sc_x.shape[2:] == (ho, wo)
                     and sc_x.dtype == x.dtype,
                     lambda: f"conv2d: shortcut input must be {x.dtype} [{n}, C, {ho}, {wo}], "
                             f"got {sc_x.dtype} {tuple(sc_x.shape)}")
        if sc_skip is not None:
            torch._check(sc_skip.shape[0] == n and sc_skip.shape[2:] == (ho, wo)
                         and sc_skip.dtype == x.dtype,
                         lambda: f"conv2d: shortcut skip must be {x.dtype} [{n}, C, {ho}, {wo}]")
        torch._check(sc_w.shape[:2] == (cout, csc) and sc_w.numel() == cout * csc
                     and sc_w.dtype == x.dtype,
                     lambda: f"conv2d: shortcut weight must be {x.dtype} [{cout}, {csc}, 1, 1], "
                             f"got {sc_w.dtype} {tuple(sc_w.shape)}")
        if sc_b is not None:
            torch._check(sc_b.shape == (cout,), lambda: f"conv2d: shortcut bias must be [{cout}]")
    return ho, wo


# ---------------------------------------------------------------------- the reference
def conv2d_reference(x, weight, bias=None, *, stride=1, pad=(1, 1, 1, 1), upsample=False,
                     skip=None, norm: Optional[Norm] = None, norm_stats=None, silu=False,
                     temb=None, residual=None, shortcut=None):
    """The definition in fp32 torch ops: returns (y in x's dtype and memory format, stats of y)."""
    u = x.float() if skip is None else torch.cat([x.float(), skip.float()], dim=1)
    if norm is not None:
        stats = norm_stats if norm_stats is not None else [channel_stats(u)]
        scale, shift = norm_affine(stats, norm)
        u = u * scale[:, :, None, None] + shift[:, :, None, None]
    if upsample:
        u = F.interpolate(u, scale_factor=2.0, mode="nearest")
    if silu:
        u = F.silu(u)
    y = F.conv2d(F.pad(u, pad), weight.float(), None if bias is None else bias.float(), stride)
    if temb is not None:
        y = y + temb.float()[:, :, None, None]
    if residual is not None:
        y = y + residual.float()
    if shortcut is not None:
        sc_x, sc_skip, sc_w, sc_b = shortcut
        v = sc_x.float() if sc_skip is None else torch.cat([sc_x.float(), sc_skip.float()], 1)
        y = y + F.conv2d(v, sc_w.float().reshape(sc_w.shape[0], -1, 1, 1),
                         None if sc_b is None else sc_b.float())
    out = y.to(x.dtype).contiguous(memory_format=_memory_format(x))
    return out, channel_stats(y)


# ---------------------------------------------------------------------- the op
def _impl(x, weight, bias, stride, pad, upsample, skip, norm_w, norm_b, groups, eps, stats_x,
          stats_skip, groups_x, silu, temb, residual, sc_x, sc_skip, sc_w, sc_b, return_stats,
          stats_groups, cat_stats):
    ho, wo = _check(x, weight, bias, stride, pad, upsample, skip, norm_w, norm_b, groups,
                    stats_x, stats_skip, temb, residual, sc_x, sc_skip, sc_w, sc_b, groups_x,
                    stats_groups, cat_stats)
    norm = None if norm_w is None else Norm(norm_w, norm_b, groups, eps)
    stats = None
    if norm is not None:     # each part's statistics: from its producer, else computed here
        stats = [channel_stats(x) if stats_x is None else stats_x]
        if skip is not None:
            stats.append(channel_stats(skip) if stats_skip is None else stats_skip)
    shortcut = None if sc_w is None else (sc_x, sc_skip, sc_w, sc_b)
    y_groups = None
    which = backend.select("conv2d", x.device)
    if which == "triton":
        from ..kernels.triton import conv2d as triton_conv

        scale = shift = group_norm = None
        if norm is not None and groups_x is not None:     # finished by x's producer
            group_norm = (groups_x, norm.weight, norm.bias, norm.eps)
        elif norm is not None:
            with _native.on_device(x):
                scale, shift = triton_conv.norm_affine(stats, *norm)
        y = torch.empty(x.shape[0], weight.shape[0], ho, wo, dtype=x.dtype, device=x.device,
                        memory_format=_memory_format(x))
        with _native.on_device(x):
            y_stats, y_groups = triton_conv.conv2d(
                y, x, weight, bias, stride=stride, pad=pad, upsample=upsample, skip=skip,
                scale=scale, shift=shift, silu=silu, temb=temb, residual=residual,
                shortcut=shortcut, return_stats=return_stats, group_norm=group_norm,
                stats_groups=stats_groups, stats_cat=cat_stats)
    else:   # torch, or "native" (no C++/CUDA convolution of ours: torch's is that backend)
        y, y_stats = conv2d_reference(x, weight, bias, stride=stride, pad=pad,
                                      upsample=upsample, skip=skip, norm=norm, norm_stats=stats,
                                      silu=silu, temb=temb, residual=residual, shortcut=shortcut)
        if stats_groups:
            y_groups = group_stats([y_stats] + ([] if cat_stats is None else [cat_stats]),
                                   stats_groups)
    def empty():             # a fresh one each: a custom op's outputs may not alias
        return y.new_empty(0, dtype=torch.float32)
    return (y, y_stats if return_stats else empty(),
            y_groups if y_groups is not None else empty())


@torch.library.custom_op("ddpm_fast::conv2d", mutates_args=())
def conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
              pad: Sequence[int], upsample: bool, skip: Optional[torch.Tensor],
              norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
              groups: int, eps: float, stats_x: Optional[torch.Tensor],
              stats_skip: Optional[torch.Tensor], groups_x: Optional[torch.Tensor], silu: bool,
              temb: Optional[torch.Tensor], residual: Optional[torch.Tensor],
              sc_x: Optional[torch.Tensor], sc_skip: Optional[torch.Tensor],
              sc_weight: Optional[torch.Tensor], sc_bias: Optional[torch.Tensor],
              return_stats: bool, stats_groups: int, cat_stats: Optional[torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(x, weight, bias, stride, tuple(pad), upsample, skip, norm_weight, norm_bias,
                 groups, eps, stats_x, stats_skip, groups_x, silu, temb, residual, sc_x, sc_skip,
                 sc_weight, sc_bias, return_stats, stats_groups, cat_stats)


@conv2d_op.register_fake
def _(x, weight, bias, stride, pad, upsample, skip, norm_weight, norm_bias, groups, eps, stats_x,
      stats_skip, groups_x, silu, temb, residual, sc_x, sc_skip, sc_weight, sc_bias,
      return_stats, stats_groups, cat_stats):
    ho, wo = _check(x, weight, bias, stride, tuple(pad), upsample, skip, norm_weight, norm_bias,
                    groups, stats_x, stats_skip, temb, residual, sc_x, sc_skip, sc_weight,
                    sc_bias, groups_x, stats_groups, cat_stats)
    y = torch.empty(x.shape[0], weight.shape[0], ho, wo, dtype=x.dtype, device=x.device,
                    memory_format=_memory_format(x))
    stats = x.new_empty(0, dtype=torch.float32)
    if return_stats:
        tiles = torch.library.get_ctx().new_dynamic_size()
        stats = x.new_empty(x.shape[0], tiles, weight.shape[0], STAT_FIELDS, dtype=torch.float32)
    y_groups = (x.new_empty(x.shape[0], stats_groups, STAT_FIELDS, dtype=torch.float32)
                if stats_groups else x.new_empty(0, dtype=torch.float32))
    return y, stats, y_groups


def _split_stats(entry, groups: int, channels: int):
    """A norm_stats entry (partials, or a producer's ConvStats) → (partials, group statistics
    usable by this norm or None). Group statistics serve a norm with the same groups over the
    same channels (x's, or x's and skip's); otherwise the partials are merged as usual."""
    if isinstance(entry, ConvStats):
        usable = entry.groups.shape[1] == groups and entry.channels == channels
        return entry.partials, entry.groups if usable else None
    return entry, None


def _partials(entry):
    return entry.partials if isinstance(entry, ConvStats) else entry


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           stride: int = 1, padding=None, upsample: bool = False,
           skip: Optional[torch.Tensor] = None, norm=None, norm_stats=None, silu: bool = False,
           temb: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
           shortcut=None, return_stats: bool = False, stats_groups: int = 0,
           next_skip_stats=None):
    """The op `ddpm_fast::conv2d` (module docstring): y, or (y, stats) with return_stats.

    norm: (weight, bias, groups, eps) of the GroupNorm on the (concatenated) input.
    norm_stats: stats returned by the producer of x, or (stats of x, stats of skip); None (or a
    None entry) computes that part's statistics here, in a separate pass.
    shortcut: (input, weight, bias) or ((x, skip), weight, bias), a 1×1 convolution of the raw
    input added to y.
    stats_groups: with return_stats, also finish y's statistics for a following GroupNorm with
    this many groups: stats is then a ConvStats, and a conv2d whose norm has those groups over
    y reads them without a finalizer pass. next_skip_stats: the stats of the skip that y will be
    concatenated with (an up block's input), to finish the groups of cat([y, skip]) instead.
    """
    pad = conv_padding(padding, tuple(weight.shape[2:]))
    norm_w = norm_b = None
    groups, eps = 1, 0.0
    if norm is not None:
        norm_w, norm_b, groups, eps = Norm(*norm)
    stats_x = stats_skip = groups_x = None
    if norm_stats is not None:
        if isinstance(norm_stats, (torch.Tensor, ConvStats)):
            norm_stats = (norm_stats,)
        if len(norm_stats) != (1 if skip is None else 2):
            raise ValueError("conv2d: norm_stats takes one entry per input part "
                             f"({'x' if skip is None else 'x and skip'}), got {len(norm_stats)}")
        stats_x, stats_skip = (tuple(norm_stats) + (None,))[:2]     # None: computed here
        cin = x.shape[1] + (0 if skip is None else skip.shape[1])
        if stats_x is not None:
            stats_x, groups_x = _split_stats(stats_x, groups, cin)
        if stats_skip is not None:
            stats_skip = _partials(stats_skip)
    sc_x = sc_skip = sc_w = sc_b = None
    if shortcut is not None:
        sc_in, sc_w, sc_b = shortcut
        sc_x, sc_skip = (sc_in, None) if isinstance(sc_in, torch.Tensor) else sc_in
    stats_groups = int(stats_groups) if return_stats else 0
    cat_stats = None if next_skip_stats is None else _partials(next_skip_stats)
    y, stats, y_groups = conv2d_op(x, weight, bias, int(stride), list(pad), bool(upsample), skip,
                                   norm_w, norm_b, int(groups), float(eps), stats_x, stats_skip,
                                   groups_x, bool(silu), temb, residual, sc_x, sc_skip, sc_w,
                                   sc_b, bool(return_stats), stats_groups, cat_stats)
    if not return_stats:
        return y
    if not stats_groups:
        return y, stats
    covered = weight.shape[0] + (0 if cat_stats is None else cat_stats.shape[2])
    return y, ConvStats(stats, y_groups, covered)
