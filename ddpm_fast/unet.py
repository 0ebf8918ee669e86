"""The DDPM U-Net (Ho et al. 2020), architecture- and weight-compatible with diffusers' UNet2DModel.

Module and parameter names follow diffusers (conv_in, time_embedding.linear_1, down_blocks.0.resnets.0
.norm1, …), so a diffusers `diffusion_pytorch_model.safetensors` loads with strict=True. Only the parts of
UNet2DModel that DDPM models use are implemented: positional time embedding, DownBlock2D /
AttnDownBlock2D / UpBlock2D / AttnUpBlock2D, the attention mid block, conv down/up-sampling. A config
asking for anything else is rejected by name rather than silently ignored.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

KERNELS = ("reference", "fused", "conv")
DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")


@dataclass
class UNetConfig:
    """The UNet2DModel config keys that matter for DDPM models (config.json names)."""

    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 256, 256)
    down_block_types: tuple = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    up_block_types: tuple = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    attention_head_dim: Optional[int] = None   # None: one head over all channels (DDPM)
    freq_shift: int = 1
    flip_sin_to_cos: bool = False
    downsample_padding: int = 0
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    center_input_sample: bool = False
    add_attention: bool = True                 # attention in the mid block

    # Keys of UNet2DModel's config with the only values we implement.
    FIXED = {
        "time_embedding_type": "positional", "act_fn": "silu", "downsample_type": "conv",
        "upsample_type": "conv", "resnet_time_scale_shift": "default", "class_embed_type": None,
        "num_class_embeds": None, "time_embedding_dim": None, "mid_block_type": "UNetMidBlock2D",
        "attn_norm_num_groups": None,
    }
    # Keys that do not change the network.
    IGNORED = ("num_train_timesteps",)
    # What diffusers' UNet2DModel takes for a key that config.json leaves out (its __init__
    # defaults, 0.42): an absent key means these, not the DDPM values this dataclass defaults to.
    # sample_size has none (None: diffusers' DDPMPipeline cannot make the noise), so from_dict
    # refuses a config without it.
    DIFFUSERS_DEFAULTS = {
        "in_channels": 3, "out_channels": 3, "center_input_sample": False, "freq_shift": 0,
        "flip_sin_to_cos": True,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                             "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2,
        "mid_block_scale_factor": 1, "downsample_padding": 1, "dropout": 0.0,
        "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5, "add_attention": True,
    }

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        n = len(self.block_out_channels)
        for kind, allowed, types in (("down", DOWN_TYPES, self.down_block_types),
                                     ("up", UP_TYPES, self.up_block_types)):
            for t in types:
                if t not in allowed:
                    raise ValueError(f"unknown {kind} block type {t!r} (supported: {', '.join(allowed)})")
            if len(types) != n:
                raise ValueError(f"{len(types)} {kind} block types for {n} block_out_channels")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of "
                             f"norm_num_groups={self.norm_num_groups}")
        if self.layers_per_block < 1:
            raise ValueError("layers_per_block must be at least 1")
        if self.sample_size % self.downsampling:
            raise ValueError(f"sample_size={self.sample_size} is not a multiple of "
                             f"{self.downsampling}, the U-Net's downsampling for "
                             f"{n} levels (the up blocks could not meet their skips)")

    @classmethod
    def from_dict(cls, config: dict) -> "UNetConfig":
        """From a diffusers config.json dict, keys it leaves out taking diffusers' UNet2DModel
        defaults (DIFFUSERS_DEFAULTS), as diffusers loads it; rejects settings we do not
        implement, and a config without sample_size, by name."""
        known = {f.name for f in fields(cls)}
        for key, value in config.items():
            if key in cls.FIXED:
                if value != cls.FIXED[key]:
                    raise ValueError(f"unsupported UNet setting {key}={value!r} "
                                     f"(supported: {cls.FIXED[key]!r})")
            elif key not in known and not key.startswith("_") and key not in cls.IGNORED:
                raise ValueError(f"unknown UNet setting {key!r}")
        if "norm_num_groups" in config and config["norm_num_groups"] is None:
            raise ValueError("unsupported UNet setting norm_num_groups=None")
        if config.get("sample_size") is None:
            raise ValueError("config has no sample_size: the image size is unknown (diffusers' "
                             "DDPMPipeline cannot sample such a U-Net either); add "
                             '"sample_size": N to config.json')
        config = {**cls.DIFFUSERS_DEFAULTS, **config}
        kwargs = {k: v for k, v in config.items() if k in known}
        if isinstance(kwargs.get("sample_size"), (list, tuple)):
            h, w = kwargs["sample_size"]
            if h != w:
                raise ValueError(f"only square sample_size is supported, got {kwargs['sample_size']}")
            kwargs["sample_size"] = h
        return cls(**kwargs)

    @property
    def downsampling(self) -> int:
        """Total downsampling factor: image sizes must be multiples of it."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {"_class_name": "UNet2DModel", **d, **self.FIXED}


PRESETS = {
    # google/ddpm-cifar10-32: 35,746,307 parameters
    "cifar10": UNetConfig(),
    # google/ddpm-celebahq-256, ddpm-church-256, ddpm-bedroom-256, ddpm-cat-256
    "256": UNetConfig(
        sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4),
    # tiny model for tests: attention at two resolutions
    "tiny": UNetConfig(
        sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float
                       ) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] as in diffusers' get_timestep_embedding (max period 10000)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def norm_act(gn: nn.GroupNorm, x: torch.Tensor, silu: bool, fused: bool,
             add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GroupNorm(x + add) then optional SiLU: torch ops, or the fused op (ddpm_fast.ops)."""
    if fused:
        from .ops.group_norm import group_norm

        if add is not None:
            add = add.expand(x.shape[0], -1)
        return group_norm(x, gn.weight, gn.bias, gn.num_groups, gn.eps, silu, add)
    if add is not None:
        x = x + add[:, :, None, None]
    x = gn(x)
    return F.silu(x) if silu else x


class TimestepEmbedding(nn.Module):
    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeProjections(NamedTuple):
    """Every ResBlock's time projection for one timestep, concatenated: [1 or B, Σ out_ch].
    They depend on t alone, so the fast runner builds a table of them per run and passes one row
    instead of the time embedding (UNet2DModel.time_projections)."""
    rows: torch.Tensor


class ResnetBlock2D(nn.Module):
    """GroupNorm → SiLU → conv → + time projection → GroupNorm → SiLU → dropout → conv, + skip."""

    def __init__(self, in_ch, out_ch, temb_ch, groups, eps, dropout, output_scale_factor=1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.output_scale_factor = output_scale_factor
        self.fused = False
        self.proj_offset = 0        # where this block's columns sit in TimeProjections.rows

    def time_projection(self, temb) -> torch.Tensor:
        if isinstance(temb, TimeProjections):
            n = self.time_emb_proj.out_features
            return temb.rows[:, self.proj_offset:self.proj_offset + n]
        return self.time_emb_proj(F.silu(temb))

    def forward_conv(self, x, x_stats, temb, skip=None, skip_stats=None, **finish):
        """The block as two ddpm_fast.ops.conv2d calls ("conv" kernels): norm1 + SiLU in conv1's
        input (over cat([x, skip]) in up blocks), the time projection and norm2's statistics in
        its output; norm2 + SiLU in conv2's input, the residual or the 1×1 shortcut and the next
        norm's statistics in its output (`finish`: conv2d's stats_groups / next_skip_stats, for
        the norm that reads it). Returns (output, its statistics)."""
        from .ops.conv2d import conv2d

        if skip is not None and self.conv_shortcut is None:
            raise ValueError("a ResBlock with a skip input needs its 1x1 shortcut")

        def norm(gn):
            return gn.weight, gn.bias, gn.num_groups, gn.eps

        h, h_stats = conv2d(x, self.conv1.weight, self.conv1.bias, skip=skip,
                            norm=norm(self.norm1), silu=True, temb=self.time_projection(temb),
                            norm_stats=(x_stats,) if skip is None else (x_stats, skip_stats),
                            return_stats=True, stats_groups=self.norm2.num_groups)
        h = self.dropout(h)
        block_input = x if skip is None else (x, skip)
        shortcut = residual = None
        if self.conv_shortcut is not None:
            shortcut = (block_input, self.conv_shortcut.weight, self.conv_shortcut.bias)
        else:
            residual = x
        out, stats = conv2d(h, self.conv2.weight, self.conv2.bias, norm=norm(self.norm2),
                            norm_stats=h_stats, silu=True, residual=residual, shortcut=shortcut,
                            return_stats=True, **finish)
        if self.output_scale_factor != 1.0:
            return out / self.output_scale_factor, None
        return out, stats

    def forward(self, x, temb):
        h = self.conv1(norm_act(self.norm1, x, True, self.fused))
        # the time projection is added before norm2: the fused op takes it as `add`
        h = norm_act(self.norm2, h, True, self.fused, add=self.time_projection(temb))
        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Attention(nn.Module):
    """Spatial self-attention with GroupNorm in front and the residual behind (diffusers names)."""

    def __init__(self, channels, groups, eps, head_dim=None, rescale_output_factor=1.0):
        super().__init__()
        self.heads = 1 if head_dim is None else channels // head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])
        self.rescale_output_factor = rescale_output_factor
        self.fused = False
        self.register_buffer("qkv_weight", None, persistent=False)    # set by fuse_qkv()
        self.register_buffer("qkv_bias", None, persistent=False)

    def fuse_qkv(self) -> None:
        """Stack to_q, to_k and to_v into one [3C, C] projection (one GEMM instead of three;
        fast mode). Buffers, not parameters: they follow .to() but stay out of state_dict, and
        they are copies, so call this again after changing the weights."""
        with torch.no_grad():
            projections = (self.to_q, self.to_k, self.to_v)
            self.qkv_weight = torch.cat([p.weight for p in projections])
            self.qkv_bias = torch.cat([p.bias for p in projections])

    def project_qkv(self, seq: torch.Tensor):
        """q, k, v of seq [B, L, C]: three Linears, or views into one fused GEMM's output."""
        if self.qkv_weight is None:
            return self.to_q(seq), self.to_k(seq), self.to_v(seq)
        return F.linear(seq, self.qkv_weight, self.qkv_bias).chunk(3, dim=-1)

    def forward(self, x):
        if self.fused:
            return self._forward_fused(x)
        # The op sequence (views, transposes, where the norm runs) mirrors diffusers'
        # AttnProcessor2_0: on CPU, GroupNorm over a [B, C, L] view can round differently from
        # GroupNorm over the 4-D tensor, and reference mode must match diffusers to the bit.
        b, c, h, w = x.shape
        seq = x.view(b, c, h * w).transpose(1, 2)                          # [B, L, C]
        seq = self.group_norm(seq.transpose(1, 2)).transpose(1, 2)

        def heads(t):
            return t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = map(heads, self.project_qkv(seq))
        o = F.scaled_dot_product_attention(q, k, v)
        o = self.to_out[0](o.transpose(1, 2).reshape(b, -1, c))
        out = o.transpose(-1, -2).reshape(b, c, h, w) + x
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor

    def forward_conv(self, x, x_stats, **finish):
        """The block as three kernels ("conv" kernels): the q/k/v projection is a 1×1 conv2d
        with the GroupNorm (from x's statistics) in its input; the attention op; the output
        projection a 1×1 conv2d with the residual and the next norm's statistics (`finish` as in
        ResnetBlock2D.forward_conv) in its output.
        Channels_last activations are [B, L, C] sequences already, so no transposes are copied.
        Returns (output, its statistics)."""
        from .ops.conv2d import conv2d

        b, c, h, w = x.shape
        gn = self.group_norm
        if self.qkv_weight is None:
            self.fuse_qkv()
        qkv = conv2d(x, self.qkv_weight[:, :, None, None], self.qkv_bias, padding=0,
                     norm=(gn.weight, gn.bias, gn.num_groups, gn.eps), norm_stats=x_stats)
        q, k, v = qkv.permute(0, 2, 3, 1).reshape(b, h * w, 3 * c).chunk(3, dim=-1)
        if self.heads == 1:
            from .ops.attention import attention

            o = attention(q, k, v, c ** -0.5)
        else:
            def heads(t):
                return t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)

            o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
            o = o.transpose(1, 2).reshape(b, h * w, c)
        o = o.view(b, h, w, c).permute(0, 3, 1, 2)           # [B, C, H, W], channels_last
        out_proj = self.to_out[0]
        out, stats = conv2d(o, out_proj.weight[:, :, None, None], out_proj.bias, padding=0,
                            residual=x, return_stats=True, **finish)
        if self.rescale_output_factor != 1.0:
            return out / self.rescale_output_factor, None
        return out, stats

    def _forward_fused(self, x):
        b, c, h, w = x.shape
        seq = norm_act(self.group_norm, x, False, True).flatten(2).transpose(1, 2)   # [B, L, C]

        def heads(t):
            return t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = self.project_qkv(seq)
        if self.heads == 1:       # DDPM's single wide head: our op (SDPA or the Triton kernel)
            from .ops.attention import attention

            o = attention(q, k, v, c ** -0.5)
        else:
            o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
            o = o.transpose(1, 2).reshape(b, -1, c)
        # residual add folded into the output projection's GEMM (addmm with beta = 1)
        out = torch.addmm(x.flatten(2).transpose(1, 2).reshape(-1, c), o.reshape(-1, c),
                          self.to_out[0].weight.t()) + self.to_out[0].bias
        out = out.view(b, h * w, c).transpose(1, 2).reshape(b, c, h, w)
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor


class Downsample2D(nn.Module):
    def __init__(self, channels, padding):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:  # TF-style asymmetric padding of the original DDPM code
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, in_ch, out_ch, temb_ch, attention, add_downsample):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, g, eps, cfg.dropout)
            for i in range(cfg.layers_per_block)])
        self.attentions = nn.ModuleList([
            Attention(out_ch, g, eps, cfg.attention_head_dim)
            for _ in range(cfg.layers_per_block)]) if attention else None
        self.downsamplers = nn.ModuleList(
            [Downsample2D(out_ch, cfg.downsample_padding)]) if add_downsample else None

    def forward(self, x, temb):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, in_ch, prev_ch, out_ch, temb_ch, attention, add_upsample):
        super().__init__()
        g, eps, n = cfg.norm_num_groups, cfg.norm_eps, cfg.layers_per_block + 1
        self.resnets = nn.ModuleList()
        for i in range(n):
            skip_ch = in_ch if i == n - 1 else out_ch
            res_in = prev_ch if i == 0 else out_ch
            self.resnets.append(ResnetBlock2D(res_in + skip_ch, out_ch, temb_ch, g, eps, cfg.dropout))
        self.attentions = nn.ModuleList([
            Attention(out_ch, g, eps, cfg.attention_head_dim) for _ in range(n)]) if attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if add_upsample else None

    def forward(self, x, skips, temb):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, ch, temb_ch):
        super().__init__()
        g, eps, s = cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_ch, g, eps, cfg.dropout, s)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([
            Attention(ch, g, eps, cfg.attention_head_dim, s) if cfg.add_attention else None])

    def forward(self, x, temb):
        x = self.resnets[0](x, temb)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x, temb)


class UNet2DModel(nn.Module):
    """ε-prediction U-Net: forward(x [B, C, H, W], t [B] or scalar) → ε̂ [B, C, H, W]."""

    def __init__(self, config: UNetConfig | dict | str = "cifar10"):
        super().__init__()
        if isinstance(config, str):
            if config not in PRESETS:
                raise ValueError(f"unknown preset {config!r} (known: {', '.join(PRESETS)})")
            config = PRESETS[config]
        elif isinstance(config, dict):
            config = UNetConfig.from_dict(config)
        self.config = config
        ch = config.block_out_channels
        temb_ch = ch[0] * 4
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch)

        self.down_blocks = nn.ModuleList()
        out_ch = ch[0]
        for i, kind in enumerate(config.down_block_types):
            in_ch, out_ch = out_ch, ch[i]
            self.down_blocks.append(DownBlock(config, in_ch, out_ch, temb_ch,
                                              kind == "AttnDownBlock2D", i < len(ch) - 1))
        self.mid_block = MidBlock(config, ch[-1], temb_ch)

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(ch))
        out_ch = rev[0]
        for i, kind in enumerate(config.up_block_types):
            prev_ch, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, len(ch) - 1)]
            self.up_blocks.append(UpBlock(config, in_ch, prev_ch, out_ch, temb_ch,
                                          kind == "AttnUpBlock2D", i < len(ch) - 1))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)
        self.fused = False          # set_kernels sets this and every block's flag together
        self.conv = False
        offset = 0
        for block in self.resnets():
            block.proj_offset = offset
            offset += block.time_emb_proj.out_features

    def resnets(self) -> list:
        return [m for m in self.modules() if isinstance(m, ResnetBlock2D)]

    def time_projections(self, temb: torch.Tensor) -> TimeProjections:
        """Every ResBlock's time projection of `temb` (time_embed's output), concatenated."""
        return TimeProjections(torch.cat([b.time_emb_proj(F.silu(temb)) for b in self.resnets()],
                                         dim=1))

    def set_kernels(self, kernels: str, attention: Optional[str] = None) -> "UNet2DModel":
        """"reference": torch ops (bit-compatible with diffusers); "fused": ddpm_fast.ops
        GroupNorm(+add, +SiLU) kernels, and in the attention blocks the attention op with the
        residual folded into the output GEMM; "conv": every convolution one ddpm_fast.ops.conv2d
        call with the norm before it and the adds after it folded in (a ResBlock is two calls),
        attention blocks "fused". `attention` gives the attention blocks another choice
        ("reference" or "fused"). Weights and parameter names are unchanged."""
        attention = attention or ("fused" if kernels == "conv" else kernels)
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        if attention not in ("reference", "fused"):
            raise ValueError(f"attention kernels must be 'reference' or 'fused', got {attention!r}")
        self.conv = kernels == "conv"
        for m in self.modules():          # this model and each ResBlock / attention block
            if hasattr(m, "fused"):
                m.fused = (attention if isinstance(m, Attention) else kernels) != "reference"
        return self

    def fused_norms(self) -> list[nn.GroupNorm]:
        """The GroupNorms that run through ddpm_fast.ops.group_norm under the current kernels
        (that op reads its weight and bias as fp32)."""
        norms = [self.conv_norm_out] if self.fused else []
        for m in self.modules():
            if isinstance(m, ResnetBlock2D) and m.fused:
                norms += [m.norm1, m.norm2]
            elif isinstance(m, Attention) and m.fused:
                norms.append(m.group_norm)
        return norms

    def fuse_qkv(self) -> "UNet2DModel":
        """Every attention block's q/k/v projections as one GEMM (Attention.fuse_qkv)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fuse_qkv()
        return self

    @property
    def kernels(self) -> str:
        return "conv" if self.conv else "fused" if self.fused else "reference"

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def time_embed(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """The time MLP's output for timesteps t (a scalar or [B]); depends on t alone."""
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=torch.long, device=self.device)
        elif t.ndim == 0:
            t = t[None].to(self.device)
        t = t * torch.ones(batch, dtype=t.dtype, device=t.device)
        emb = timestep_embedding(t, self.config.block_out_channels[0],
                                 self.config.flip_sin_to_cos, self.config.freq_shift)
        return self.time_embedding(emb.to(self.dtype))

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError naming the problem with x: rank, channels, dtype, device, or a size the
        down/up-sampling cannot round-trip. Shape-only checks: free under torch.compile."""
        c = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"U-Net input must be [batch, {c.in_channels}, H, W], got {shape}")
        if x.shape[1] != c.in_channels:
            raise ValueError(f"U-Net input has {x.shape[1]} channels, the model takes "
                             f"{c.in_channels} (input shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise ValueError(f"U-Net input must be a floating-point tensor, got {x.dtype}")
        factor = c.downsampling
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"U-Net input size {x.shape[2]}×{x.shape[3]} is not divisible by "
                             f"{factor}, the model's total downsampling")
        device = self.conv_in.weight.device
        if x.device != device:
            raise ValueError(f"U-Net input is on {x.device}, the model on {device}")

    def forward(self, x: torch.Tensor, t, temb: torch.Tensor | TimeProjections | None = None
                ) -> torch.Tensor:
        """ε̂ for x at timesteps t; `temb` (time_embed's output, or all the ResBlocks' projections
        of it) replaces t when given."""
        self.check_input(x)
        if self.config.center_input_sample:
            x = 2 * x - 1.0
        if temb is None:
            temb = self.time_embed(t, x.shape[0])
        if self.conv:
            return self._forward_conv(x, temb)
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb)
            skips.extend(block_skips)
        x = self.mid_block(x, temb)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            x = block(x, block_skips, temb)
        return self.conv_out(norm_act(self.conv_norm_out, x, True, self.fused))

    def _forward_conv(self, x, temb):
        """forward() under "conv" kernels: each convolution (and each attention block's two
        projections) one conv2d call, each activation travelling with the per-channel
        statistics its producer computed, so that no GroupNorm is a pass of its own."""
        from .ops.conv2d import conv2d

        if self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules()):
            raise RuntimeError('"conv" kernels are for inference: dropout would sit before '
                               "norm2's statistics; train with the reference kernels")

        groups = self.config.norm_num_groups
        skips = []

        def finish(attention=None, next_skip=False):
            """conv2d's stats_groups / next_skip_stats for a producer, from what reads its output:
            the attention block after it, else an up ResBlock's norm over cat([y, next skip]),
            else a norm over y alone (a ResBlock's norm1 or conv_norm_out). The producer then
            finishes that norm's group statistics, so that no norm is a launch of its own."""
            if attention is not None and attention.fused:
                return dict(stats_groups=attention.group_norm.num_groups)
            if next_skip:
                return dict(stats_groups=groups, next_skip_stats=skips[-1][1])
            return dict(stats_groups=groups)

        def attend(block, h, stats, **after):    # "fused" attention folds into the conv path
            return block.forward_conv(h, stats, **after) if block.fused else (block(h), None)

        h, stats = conv2d(x, self.conv_in.weight, self.conv_in.bias, return_stats=True,
                          **finish())
        skips.append((h, stats))
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                attention = block.attentions[i] if block.attentions is not None else None
                h, stats = resnet.forward_conv(h, stats, temb, **finish(attention))
                if attention is not None:
                    h, stats = attend(attention, h, stats, **finish())
                skips.append((h, stats))
            if block.downsamplers is not None:
                down = block.downsamplers[0]
                padding = (0, 1, 0, 1) if down.padding == 0 else down.conv.padding
                h, stats = conv2d(h, down.conv.weight, down.conv.bias, stride=2,
                                  padding=padding, return_stats=True, **finish())
                skips.append((h, stats))
        mid = self.mid_block
        h, stats = mid.resnets[0].forward_conv(h, stats, temb, **finish(mid.attentions[0]))
        if mid.attentions[0] is not None:
            h, stats = attend(mid.attentions[0], h, stats, **finish())
        h, stats = mid.resnets[1].forward_conv(h, stats, temb, **finish(next_skip=True))
        for b, block in enumerate(self.up_blocks):
            for i, resnet in enumerate(block.resnets):
                skip, skip_stats = skips.pop()
                # read next by: another ResBlock of this block or the next block (with a skip),
                # the upsampling (raw: no statistics needed) or conv_norm_out
                if i + 1 < len(block.resnets) or (block.upsamplers is None
                                                  and b + 1 < len(self.up_blocks)):
                    after = finish(next_skip=True)
                elif block.upsamplers is not None:
                    after = {}
                else:
                    after = finish()
                attention = block.attentions[i] if block.attentions is not None else None
                h, stats = resnet.forward_conv(h, stats, temb, skip, skip_stats,
                                               **(finish(attention) if attention is not None
                                                  else after))
                if attention is not None:
                    h, stats = attend(attention, h, stats, **after)
            if block.upsamplers is not None:
                up = block.upsamplers[0].conv
                h, stats = conv2d(h, up.weight, up.bias, upsample=True, return_stats=True,
                                  **(finish(next_skip=True) if skips else {}))
        gn = self.conv_norm_out
        return conv2d(h, self.conv_out.weight, self.conv_out.bias,
                      norm=(gn.weight, gn.bias, gn.num_groups, gn.eps), norm_stats=stats,
                      silu=True)
