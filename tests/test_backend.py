"""The one kernel-choice table (ddpm_fast/ops/backend.py): complete, justified, and obeyed."""
import pytest
import torch

from conftest import TRITON
from ddpm_fast.ops import backend
from ddpm_fast.ops.backend import (IMPLEMENTATIONS, TABLE, UNET_SETTINGS, UNET_TABLE, Choice,
                                   select, unet_setting, use_backend)


def test_every_op_has_a_justified_choice_per_device():
    for op, impls in IMPLEMENTATIONS.items():
        for device in ("cpu", "cuda"):
            choice = TABLE[(op, device)]
            assert choice.impl in impls, (op, device)
            assert len(choice.evidence) > 20, (op, device)
    for device, rules in UNET_TABLE.items():
        assert all(c.impl in UNET_SETTINGS and c.evidence for c in rules)
        # ascending batch limits, the last entry serving any batch
        limits = [c.max_batch for c in rules]
        assert limits[-1] is None and limits[:-1] == sorted(limits[:-1]), (device, limits)
    assert {r["op"] for r in backend.table_report()} == set(IMPLEMENTATIONS) | {"unet"}


def test_override_and_fallbacks():
    cpu = torch.device("cpu")
    with use_backend("torch"):
        assert all(select(op, cpu) == "torch" for op in IMPLEMENTATIONS)
    with use_backend("native"):       # ops without native code run torch's (SDPA, oneDNN)
        assert select("attention", cpu) == "torch" and select("conv2d", cpu) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("cuda"):
            pass
    assert unet_setting(cpu) in UNET_SETTINGS


@pytest.mark.skipif(not TRITON, reason="triton is a Linux-only test extra")
def test_ops_read_the_table(monkeypatch):
    """Changing the table entry changes what conv2d runs: the Triton kernel writes one
    statistics partial per output tile, the torch reference one per image."""
    from ddpm_fast.ops.conv2d import conv2d

    x = torch.randn(1, 16, 16, 16)
    w = torch.randn(16, 16, 3, 3)
    _, stats = conv2d(x, w, return_stats=True)
    assert stats.shape[1] == 1                                   # the table: torch on CPU
    monkeypatch.setitem(TABLE, ("conv2d", "cpu"), Choice("triton", "test"))
    _, stats = conv2d(x, w, return_stats=True)
    assert stats.shape[1] > 1                                    # now the Triton kernel


def test_fast_runner_reads_the_unet_setting(monkeypatch):
    from ddpm_fast.fast import FastRunner
    from ddpm_fast.unet import UNet2DModel

    unet = UNet2DModel("tiny").eval()
    monkeypatch.setitem(UNET_TABLE, "cpu", (Choice("conv", "test"),))
    runner = FastRunner(unet, "cpu", dtype=torch.float32)
    assert runner.setting == "conv" and runner.unet.kernels == "conv"
    assert FastRunner(unet, "cpu", dtype=torch.float32, kernels="reference").unet.kernels == \
        "reference"
    with pytest.raises(ValueError, match="kernels must be one of"):
        FastRunner(unet, "cpu", kernels="cudnn")


def test_group_norm_native_is_cpu_only(monkeypatch):
    """No CUDA GroupNorm (it lost to Triton at every measured shape): even where the CUDA
    kernels are built, GroupNorm on a GPU never selects "native"."""
    monkeypatch.setattr(backend, "native_available", lambda device: True)
    monkeypatch.setattr(backend, "triton_available", lambda device: False)
    cuda = torch.device("cuda")
    assert select("group_norm", cuda) == "torch"
    with use_backend("native"):
        assert select("group_norm", cuda) == "torch"
        assert select("ddpm_step", cuda) == "native"


def test_auto_falls_back_through_our_kernels_before_torch(monkeypatch):
    """A table choice that cannot run here falls back to our other kernel on a GPU (the CUDA
    step without the native module: the Triton one), to torch on the CPU (Triton there is the
    test interpreter)."""
    monkeypatch.setattr(backend, "native_available", lambda device: False)
    monkeypatch.setattr(backend, "triton_available", lambda device: True)
    assert select("ddpm_step", torch.device("cuda")) == "triton"
    assert select("ddpm_step", torch.device("cpu")) == "torch"
    assert select("attention", torch.device("cuda")) == "torch"     # the table's choice runs


def test_every_environment_variable_is_documented():
    """Each DDPM_FAST_* setting the package or its build reads has a row in the README's table
    (DDPM_FAST_WITH_CUDA is a C++ macro, not a setting)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = [*root.joinpath("ddpm_fast").rglob("*.py"), root / "setup.py"]
    read = {name for f in sources for name in re.findall(r"DDPM_FAST_[A-Z_]+", f.read_text())}
    documented = set(re.findall(r"^\| `(DDPM_FAST_[A-Z_]+)", (root / "README.md").read_text(),
                                re.MULTILINE))
    assert "DDPM_FAST_CONV_SPLITK" in read
    assert read - {"DDPM_FAST_WITH_CUDA"} <= documented, read - documented


def test_fast_runner_picks_the_unet_setting_per_batch(monkeypatch):
    """A table entry with max_batch serves batches up to it: here "conv" for one or two images,
    the reference kernels above. Each batch size's graph (or eager step) runs its own variant of
    the model, built once, and the images are the reference runner's either way; explicit
    kernels hold for every batch."""
    from ddpm_fast.fast import FastRunner
    from ddpm_fast.schedule import Schedule
    from ddpm_fast.unet import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel("tiny").eval()
    monkeypatch.setitem(UNET_TABLE, "cpu", (Choice("conv", "test", max_batch=2),
                                            Choice("reference", "test")))
    assert unet_setting(torch.device("cpu"), 2) == "conv"
    assert unet_setting(torch.device("cpu"), 3) == unet_setting(torch.device("cpu")) == "reference"
    runner = FastRunner(unet, "cpu", dtype=torch.float32)
    assert runner.setting == "reference" and runner.unet.kernels == "reference"
    assert runner.variant_unet(1).kernels == "conv" and runner.variant_unet(3) is runner.unet
    assert runner.variant_unet(2) is runner.variant_unet(1)          # built once
    s = Schedule.linear()
    ts = s.timesteps(100)[-2:]
    table = s.step_table(ts)
    reference = FastRunner(unet, "cpu", dtype=torch.float32, kernels="reference")
    for batch in (1, 3):
        got, want = runner.sample(table, ts, batch, seed=4), reference.sample(table, ts, batch, 4)
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item(), batch
    assert reference.variant_unet(1) is reference.unet            # explicit: one variant


def test_decide_unet_writes_entries_the_table_reads(monkeypatch, tmp_path, capsys):
    """benchmarks/decide_unet.py: per batch the faster of fast-inductor and fast-conv; its
    UNET_TABLE entries, put in the table, give each measured batch its winner."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.decide_unet import best_per_batch, main, table_entries

    ms = {1: (1.10, 0.45), 16: (1.6, 0.9), 64: (3.46, 3.6), 256: (10.7, 12.0)}   # inductor, conv
    rows = [{"provider": p, "config": "cifar10", "batch": b, "step_ms_median": t}
            for b, pair in ms.items() for p, t in zip(("fast-inductor", "fast-conv"), pair)]
    rows.append({"provider": "fast-conv", "config": "cifar10", "batch": 512, "error": "OOM"})
    best = best_per_batch(rows, "cifar10")
    assert {b: v["setting"] for b, v in best.items()} == {1: "conv", 16: "conv", 64: "inductor",
                                                         256: "inductor"}
    entries = table_entries(best, "test")
    assert entries == [("conv", 16, "test"), ("inductor", None, "test")]
    monkeypatch.setitem(UNET_TABLE, "cuda", tuple(Choice(s, e, m) for s, m, e in entries))
    from ddpm_fast.ops.backend import unet_choice

    assert all(unet_choice("cuda", b).impl == v["setting"] for b, v in best.items())
    out = tmp_path / "t.json"
    out.write_text(json.dumps({"environment": {"device": "GPU X"}, "results": rows}))
    assert main([str(out)]) == 0
    assert "Choice('conv', 'GPU X: " in capsys.readouterr().out
