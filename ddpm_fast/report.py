"""What `ddpm-fast info` reports, as plain data: the versions, the devices (each GPU's
architecture and limits), the native build, what each op and the fast runner's U-Net run on
each device here (after the DDPM_FAST_BACKEND override and what is built) beside the kernel
table with its evidence, the DDPM_FAST_* settings in force, and a model folder's scheduler
class and settings."""
from __future__ import annotations

import os
import warnings
from pathlib import Path


def default_model_path() -> Path:
    """The digits model shipped in the package (ddpm_fast/assets/digits)."""
    return Path(__file__).parent / "assets" / "digits"


def environment_report(model=None) -> dict:
    """Everything `ddpm-fast info` prints, for `model` (default: the shipped model): a dict that
    json.dumps writes as it is."""
    import platform

    import torch

    from . import __version__, _native
    from .fast import default_dtype

    info = {"ddpm_fast": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "native": _native.build_info(), "default_model": str(default_model_path()),
            "fast_mode_dtype": {"cpu": str(default_dtype(torch.device("cpu"))).split(".")[-1],
                                "cuda": "bfloat16"}}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["gpus"] = gpu_report(info["native"])
    info["kernels"] = kernel_report()
    info["settings"] = {k: v for k, v in sorted(os.environ.items())
                        if k.startswith("DDPM_FAST_") or k == "TRITON_INTERPRET"}
    model = Path(model) if model else default_model_path()
    info["model"] = str(model)
    info["scheduler"] = scheduler_settings(model)
    return info


def gpu_report(native: dict) -> list:
    """Each visible GPU: its name and architecture, SMs, memory, the shared memory one block may
    use (what the conv launcher sizes its tiles by), and what the native module has for it:
    SASS compiled for that architecture, the PTX of an older one that the driver compiles at
    first use, or nothing (the Triton and torch implementations then run)."""
    import torch

    built = sorted(int(a) for a in str(native.get("cuda_archs", "")).split(",") if a.strip())
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        arch = props.major * 10 + props.minor
        if not native.get("cuda") or not built or arch < built[0]:
            native_code = "none (Triton and torch kernels run)"
        elif arch in built:
            native_code = f"SASS for sm_{arch}"
        else:
            older = max(a for a in built if a <= arch)
            native_code = f"PTX of sm_{older}, compiled by the driver at first use"
        gpus.append({
            "index": i, "name": props.name, "arch": f"sm_{arch}",
            "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2 ** 30, 1),
            "shared_memory_per_block": getattr(props, "shared_memory_per_block_optin",
                                               props.shared_memory_per_block),
            "native_kernels": native_code})
    return gpus


def kernel_report() -> dict:
    """What each op and the fast runner's U-Net run on each device type here (after the
    DDPM_FAST_BACKEND override and what is built), beside the kernel table with its evidence.
    An override that cannot run here is shown as "error: …", not raised."""
    import torch

    from .ops import backend

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    running = {}
    for dev in devices:
        device = torch.device(dev)
        row = {}
        for op in backend.IMPLEMENTATIONS:
            try:
                row[op] = backend.select(op, device)
            except (RuntimeError, ValueError) as e:        # an override that cannot run here
                row[op] = f"error: {e}"
        row["unet"] = backend.unet_setting(device)          # any batch size
        limits = [c.max_batch for c in backend.UNET_TABLE.get(dev, ()) if c.max_batch]
        if limits:                                          # smaller batches' own settings
            row["unet_up_to_batch"] = {n: backend.unet_setting(device, n) for n in limits}
        running[dev] = row
    return {"running": running, "table": backend.table_report()}


def scheduler_settings(path) -> dict:
    """The scheduler class (_class_name: DDPMScheduler or DDIMScheduler) and every setting a
    model folder's scheduler config gives (defaults filled in), or {"error": why it is refused}.
    A folder without a scheduler config also gets "assumed": the warning saying what it assumed."""
    from .checkpoints import ASSUMED_SCHEDULER, CheckpointError, load_scheduler_config
    from .schedulers import describe

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            name, settings, _ = describe(load_scheduler_config(path))
    except CheckpointError as e:
        return {"error": str(e)}
    assumed = {"assumed": str(w.message) for w in caught if ASSUMED_SCHEDULER in str(w.message)}
    return {**assumed, "_class_name": name, **settings}
