"""The fused conv2d op per U-Net layer kind (CIFAR-10's, or --layers 256) against what stock
PyTorch runs for the same math: eager (GroupNorm → SiLU → cuDNN conv → adds), and with
--with-compile torch.compile of it (Inductor fuses the norm and the adds around cuDNN's
convolution). bf16, channels_last, CUDA-graph replays timed.

    python benchmarks/conv2d_layers.py --device cuda --batch 1 64 256
    python benchmarks/conv2d_layers.py --device cuda --layers 256 --batch 4
    python benchmarks/conv2d_layers.py --smoke      # CPU, Triton interpreter, tiny sizes

Every provider is checked against the op's fp32 reference before it is timed. The JSON (device
named) is what the kernel-choice table cites per shape.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass(frozen=True)
class Layer:
    """One kind of convolution in the U-Net, with what is folded around it."""
    cin: int
    cout: int
    size: int                 # input H = W
    skip: int = 0             # channels of the concatenated skip input
    norm: bool = True         # GroupNorm(32) + SiLU on the input
    temb: bool = False
    residual: bool = False
    shortcut: tuple = ()      # channels of the 1×1 shortcut's input parts: (block input, skip)
    stride: int = 1
    upsample: bool = False
    k: int = 3


CIFAR_LAYERS = {
    "conv_in 3→128 @32": Layer(3, 128, 32, norm=False),
    "res.conv1 128 @32 +temb": Layer(128, 128, 32, temb=True),
    "res.conv2 128 @32 +residual": Layer(128, 128, 32, residual=True),
    "down 128 @32 s2": Layer(128, 128, 32, norm=False, stride=2),
    "res.conv1 128→256 @16 +temb": Layer(128, 256, 16, temb=True),
    "res.conv2 256 @16 +shortcut128": Layer(256, 256, 16, shortcut=(128,)),
    "res.conv2 256 @8 +residual": Layer(256, 256, 8, residual=True),
    "res.conv2 256 @4 +residual": Layer(256, 256, 4, residual=True),
    "up.conv1 256+256 @8 +temb": Layer(256, 256, 8, skip=256, temb=True),
    "up.conv2 256 @8 +shortcut256+256": Layer(256, 256, 8, shortcut=(256, 256)),
    "up 256 @8→16": Layer(256, 256, 8, norm=False, upsample=True),
    "up.conv1 256+128 @32 +temb": Layer(256, 128, 32, skip=128, temb=True),
    "conv_out 128→3 @32": Layer(128, 3, 32),
}
# The 256-px model (diffusers' ddpm-church/bedroom layout): what it adds to CIFAR's kinds — 256×256
# maps (512 tiles of statistics per image), 512 channels, and the 512 + 512 concatenation.
LAYERS_256 = {
    "conv_in 3→128 @256": Layer(3, 128, 256, norm=False),
    "res.conv1 128 @256 +temb": Layer(128, 128, 256, temb=True),
    "res.conv2 128 @256 +residual": Layer(128, 128, 256, residual=True),
    "down 128 @256 s2": Layer(128, 128, 256, norm=False, stride=2),
    "res.conv1 128→256 @64 +temb": Layer(128, 256, 64, temb=True),
    "res.conv2 256 @64 +shortcut128": Layer(256, 256, 64, shortcut=(128,)),
    "res.conv1 256→512 @16 +temb": Layer(256, 512, 16, temb=True),
    "res.conv2 512 @16 +shortcut256": Layer(512, 512, 16, shortcut=(256,)),
    "res.conv2 512 @8 +residual": Layer(512, 512, 8, residual=True),
    "up.conv1 512+512 @8 +temb": Layer(512, 512, 8, skip=512, temb=True),
    "up.conv2 512 @8 +shortcut512+512": Layer(512, 512, 8, shortcut=(512, 512)),
    "up 512 @8→16": Layer(512, 512, 8, norm=False, upsample=True),
    "up.conv1 512+256 @16 +temb": Layer(512, 512, 16, skip=256, temb=True),
    "up.conv1 128+128 @256 +temb": Layer(128, 128, 256, skip=128, temb=True),
    "conv_out 128→3 @256": Layer(128, 3, 256),
}
LAYER_SETS = {"cifar10": CIFAR_LAYERS, "256": LAYERS_256}
SMOKE_LAYERS = {
    "res.conv1 32 @8 +temb": Layer(32, 32, 8, temb=True),
    "up.conv2 32 @4 +shortcut32+16": Layer(32, 32, 4, shortcut=(32, 16)),
    "up 16 @4→8": Layer(16, 16, 4, norm=False, upsample=True),
    "down 32 @8 s2": Layer(32, 32, 8, norm=False, stride=2),
}


def make_inputs(layer: Layer, batch: int, device, dtype, seed: int = 0) -> dict:
    """conv2d keyword arguments for one layer, weights in the fast runner's layout."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    def act(c, size):
        return randn(batch, c, size, size).to(dtype).contiguous(memory_format=torch.channels_last)

    def weight(cout, cin, k):
        w = randn(cout, cin, k, k, scale=(cin * k * k) ** -0.5).to(dtype)
        return w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)   # [KH, KW, Cin, Cout]

    c = layer.cin + layer.skip
    out_size = layer.size * (2 if layer.upsample else 1) // layer.stride
    args = dict(x=act(layer.cin, layer.size), weight=weight(layer.cout, c, layer.k),
                bias=randn(layer.cout).to(dtype))
    if layer.skip:
        args["skip"] = act(layer.skip, layer.size)
    if layer.norm:
        groups = 32 if c % 32 == 0 else 8
        args.update(norm=(1 + 0.1 * randn(c), 0.1 * randn(c), groups, 1e-6), silu=True)
    if layer.temb:
        args["temb"] = randn(1, layer.cout).to(dtype)
    if layer.residual:
        args["residual"] = act(layer.cout, out_size)
    if layer.shortcut:
        parts = tuple(act(ch, out_size) for ch in layer.shortcut)
        args["shortcut"] = (parts[0] if len(parts) == 1 else parts,
                            weight(layer.cout, sum(layer.shortcut), 1), randn(layer.cout).to(dtype))
    if layer.upsample:
        args["upsample"] = True
    if layer.stride == 2:
        args["stride"], args["padding"] = 2, (0, 1, 0, 1)
    return args


def torch_composite(x, weight, bias, *, stride=1, padding=None, upsample=False, skip=None,
                    norm=None, silu=False, temb=None, residual=None, shortcut=None):
    """The same math as stock PyTorch runs it in the U-Net (cuDNN convolution)."""
    u = x if skip is None else torch.cat([x, skip], 1)
    if norm is not None:
        u = F.group_norm(u, norm[2], norm[0].to(u.dtype), norm[1].to(u.dtype), norm[3])
    if silu:
        u = F.silu(u)
    if upsample:
        u = F.interpolate(u, scale_factor=2.0, mode="nearest")
    if padding == (0, 1, 0, 1):
        y = F.conv2d(F.pad(u, padding), weight, bias, stride)
    else:
        y = F.conv2d(u, weight, bias, stride, padding=weight.shape[-1] // 2)
    if temb is not None:
        y = y + temb[:, :, None, None]
    if residual is not None:
        y = y + residual
    if shortcut is not None:
        sc_in, sc_w, sc_b = shortcut
        sc_in = sc_in if isinstance(sc_in, torch.Tensor) else torch.cat(sc_in, 1)
        y = y + F.conv2d(sc_in, sc_w, sc_b)
    return y


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--layers", choices=sorted(LAYER_SETS), default="cifar10",
                   help="the U-Net whose layer kinds are timed")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--with-compile", action="store_true",
                   help="also time torch.compile of the composite (one compile per layer and "
                        "batch: minutes; the whole-model comparison is sample_throughput.py's)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, Triton interpreter, tiny layers: checks the script, times nothing")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        a.device, a.batch, a.reps = "cpu", [2], 1
    device = torch.device(a.device)
    if device.type != "cuda" and not a.smoke:
        sys.exit("conv2d_layers: timing needs a CUDA device (use --smoke to check the script)")

    from benchmarks.kernels import bench
    from benchmarks.sample_throughput import environment, write_json
    from ddpm_fast.ops.backend import use_backend
    from ddpm_fast.ops.conv2d import conv2d

    dtype = torch.float32 if a.smoke else torch.bfloat16
    layers = SMOKE_LAYERS if a.smoke else LAYER_SETS[a.layers]
    compiled = torch.compile(torch_composite) if a.with_compile else None
    rows = []
    for batch in a.batch:
        for name, layer in layers.items():
            args = make_inputs(layer, batch, device, dtype)
            with use_backend("torch"):
                ref = conv2d(**as_float(args))
            providers = {"ours": lambda: conv2d(**args, return_stats=True)[0],
                         "torch": lambda: torch_composite(**args)}
            if compiled is not None:
                providers["torch-compile"] = lambda: compiled(**args)
            row = {"layer": name, "batch": batch}
            for prov, fn in providers.items():
                with use_backend("triton" if prov == "ours" else "torch"):
                    err = (fn().float() - ref.float()).abs().max().item()
                    row[f"{prov}_max_err"] = err
                    row[f"{prov}_us"] = None if a.smoke else bench(fn, device, a.reps) * 1e6
            if not a.smoke:
                row["speedup_vs_torch"] = row["torch_us"] / row["ours_us"]
                line = (f"b{batch:<4} {name:34s} ours {row['ours_us']:8.1f} us  cuDNN+norm "
                        f"{row['torch_us']:8.1f} us  ×{row['speedup_vs_torch']:.2f}")
                if compiled is not None:
                    row["speedup_vs_compile"] = row["torch-compile_us"] / row["ours_us"]
                    line += f"  compile {row['torch-compile_us']:8.1f} us"
                print(line)
            else:
                print(f"b{batch:<4} {name:34s} max |err| ours {row['ours_max_err']:.2e}")
            rows.append(row)
    if not a.smoke:
        env = environment(device)
        slug = env["device"].replace(" ", "_").replace("/", "_")
        suffix = "" if a.layers == "cifar10" else f"_{a.layers}px"
        out = a.out or Path(__file__).parent / "results" / f"conv2d_layers{suffix}_{slug}.json"
        write_json(out, {"environment": env, "dtype": str(dtype), "layers": a.layers,
                         "rows": rows})
        print(f"saved {out}")
    return 0


def as_float(value):
    """Every tensor in (nested) arguments as fp32: the op's fp32 reference inputs."""
    if torch.is_tensor(value):
        return value.float()
    if isinstance(value, dict):
        return {k: as_float(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(as_float(v) for v in value)
    return value


if __name__ == "__main__":
    sys.exit(main())
