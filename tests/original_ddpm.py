"""An independent re-statement of the original DDPM U-Net (Ho et al. 2020, the TensorFlow code's
architecture as its PyTorch port names it), used only to check that original checkpoints convert
to our diffusers-named U-Net with identical outputs. Written from the paper's description:
sinusoidal time embedding (sin | cos), ResNet blocks with a time projection, single-head
attention with 1×1-convolution q/k/v, TF-style (0, 1, 0, 1) padding before stride-2 downsampling.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def norm(ch):
    return nn.GroupNorm(32, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, temb):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb, cout)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.norm = norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(b, c, hh * ww) for m in (self.q, self.k, self.v))
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c ** -0.5, dim=2)
        out = torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Model(nn.Module):
    def __init__(self, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), in_ch=3):
        super().__init__()
        self.ch, temb = ch, ch * 4
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb), nn.Linear(temb, temb)])
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, skip, cin = nn.ModuleList(), [ch], ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(cin, ch * mult, temb))
                cin = ch * mult
                if i in attn_levels:
                    level.attn.append(AttnBlock(cin))
                skip.append(cin)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(cin)
                skip.append(cin)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = ResnetBlock(cin, cin, temb), AttnBlock(cin)
        self.mid.block_2 = ResnetBlock(cin, cin, temb)
        self.up = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(cin + skip.pop(), ch * ch_mult[i], temb))
                cin = ch * ch_mult[i]
                if i in attn_levels:
                    level.attn.append(AttnBlock(cin))
            if i != 0:
                level.upsample = Upsample(cin)
            self.up.insert(0, level)            # up[i] is resolution level i
        self.norm_out, self.conv_out = norm(cin), nn.Conv2d(cin, in_ch, 3, padding=1)

    def forward(self, x, t):
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](timestep_embedding(t, self.ch))))
        hs = [self.conv_in(x)]
        for level in self.down:
            for j, blk in enumerate(level.block):
                h = blk(hs[-1], temb)
                hs.append(level.attn[j](h) if len(level.attn) else h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for level in reversed(self.up):
            for j, blk in enumerate(level.block):
                h = blk(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
