"""Read a sample-throughput JSON (benchmarks/sample_throughput.py) and say which U-Net setting
the kernel table should give each batch size: the fastest of the fast-mode candidates per
batch, its margin over the runner-up and over stock torch.compile, and the UNET_TABLE entries
(ddpm_fast/ops/backend.py) that encode it, with the JSON as their evidence.

    python benchmarks/decide_unet.py benchmarks/results/sample_throughput_conv_<GPU>_<date>.json

Candidates: fast-inductor ("inductor") and fast-conv ("conv"); fast-conv-pdl counts as "conv"
with DDPM_FAST_PDL=1 and is reported, not chosen (PDL is an environment switch, not a setting).
A batch size whose candidates all failed is left out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SETTINGS = {"fast-inductor": "inductor", "fast-conv": "conv"}


def best_per_batch(rows: list[dict], config: str) -> dict[int, dict]:
    """batch → {setting, ms, runner_up, runner_up_ms, compile_ms, pdl_ms} over the rows that ran."""
    timed = [r for r in rows if r.get("config") == config and "step_ms_median" in r]
    out = {}
    for batch in sorted({r["batch"] for r in timed}):
        at = {r["provider"]: r["step_ms_median"] for r in timed if r["batch"] == batch}
        ranked = sorted((ms, SETTINGS[p]) for p, ms in at.items() if p in SETTINGS)
        if not ranked:
            continue
        out[batch] = {"setting": ranked[0][1], "ms": ranked[0][0],
                      "runner_up": ranked[1][1] if len(ranked) > 1 else None,
                      "runner_up_ms": ranked[1][0] if len(ranked) > 1 else None,
                      "compile_ms": at.get("compile"), "pdl_ms": at.get("fast-conv-pdl")}
    return out


def table_entries(best: dict[int, dict], evidence: str) -> list[tuple[str, int | None, str]]:
    """(setting, max_batch, evidence) entries: consecutive batch sizes with the same winner
    merge; the largest measured batch's winner serves every larger batch (max_batch None)."""
    entries: list[list] = []
    for batch, b in sorted(best.items()):
        if entries and entries[-1][0] == b["setting"]:
            entries[-1][1] = batch
        else:
            entries.append([b["setting"], batch])
    entries[-1][1] = None
    return [(setting, limit, evidence) for setting, limit in entries]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path)
    p.add_argument("--config", default="cifar10")
    a = p.parse_args(argv)
    try:
        data = json.loads(a.json.read_text())
    except (OSError, ValueError) as e:
        p.error(f"cannot read {a.json}: {e}")
    best = best_per_batch(data.get("results", []), a.config)
    if not best:
        print(f"no fast-inductor or fast-conv timings for {a.config} in {a.json}")
        return 1
    device = data.get("environment", {}).get("device", "unknown device")
    print(f"{device}, {a.config}: ms per step (median)")
    for batch, b in best.items():
        line = f"  batch {batch:4d}: {b['setting']:9s} {b['ms']:8.3f}"
        if b["runner_up"]:
            line += f"  ({b['runner_up_ms'] / b['ms']:.2f}x {b['runner_up']})"
        if b["compile_ms"]:
            line += f"  {b['compile_ms'] / b['ms']:.2f}x stock compile"
        if b["pdl_ms"]:
            line += f"  conv+PDL {b['pdl_ms']:.3f}"
        print(line)
    print("UNET_TABLE entries:")
    for setting, limit, evidence in table_entries(best, f"{device}: {a.json.as_posix()}"):
        limit_arg = f", max_batch={limit}" if limit is not None else ""
        print(f"    Choice({setting!r}, {evidence!r}{limit_arg}),")
    return 0


if __name__ == "__main__":
    sys.exit(main())
