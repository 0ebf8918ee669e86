import os

# Under pytest-xdist (pyproject's addopts run two workers, one a core): one torch thread a worker,
# and in what its tests start. Two workers of two threads on two cores oversubscribe them, and
# OpenMP's spinning waits then cost several times the work. Set before torch is imported.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

if XDIST_WORKER:
    torch.set_num_threads(1)

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. The flag must be set before
# any kernel module is imported (ddpm_fast imports them lazily, on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ddpm_fast.unet import PRESETS, UNetConfig  # noqa: E402

def triton_backends() -> list:
    """["triton"] wherever the test extra installs Triton (Linux: pyproject's marker), so that a
    broken install fails the run here instead of silently dropping the Triton coverage."""
    import platform

    if platform.system() != "Linux":
        return []                       # the extra is Linux-only: nothing to test here
    import triton  # noqa: F401        (an ImportError here is a broken test environment)

    from ddpm_fast.ops.backend import triton_available

    if not triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        raise RuntimeError("triton imports but cannot run: TRITON_INTERPRET=1 must be set on CPU")
    return ["triton"]


TRITON = triton_backends()

# Tolerances per dtype, in one place (absolute, for values of order 1).
TOL = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def diffusers_kwargs(cfg: UNetConfig) -> dict:
    d = cfg.to_dict()
    d.pop("_class_name")
    return d


@pytest.fixture
def tiny_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**diffusers_kwargs(PRESETS["tiny"])).eval()


@pytest.fixture(scope="module")
def single_torch_thread():
    """One torch thread for a module of tiny-tensor tests: a second only contends with other
    processes on a 2-core machine (under xdist each worker has one already)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def redraw_step_noise(g, before, shape, stochastic: bool):
    """Teacher forcing of a diffusers step that took generator g: the noise z it drew, drawn
    again from g's state `before` the step (None for a plan that draws none), with g left where
    diffusers' step left it (asserted)."""
    after = g.get_state()
    g.set_state(before)
    z = torch.randn(shape, generator=g) if stochastic else None
    assert torch.equal(g.get_state(), after), "diffusers' step drew other noise"
    return z


def pytest_addoption(parser):
    parser.addoption("--aot", action="store_true",
                     help="also run the ahead-of-time GPU compile checks (tests marked aot: "
                          "about 900 Triton compiles for sm_80-90, read from "
                          "benchmarks/results/aot_kernels_usage.json where a kernel has not "
                          "changed; .ci/run runs them after the suite)")


def pytest_configure(config):
    config.addinivalue_line("markers", "aot: ahead-of-time GPU compiles; run with --aot")


# The longest tests (seconds on one core of the 2-core machine: 65, 43, 25, 23, 20, 20): started
# first, so that under xdist neither worker is left running one of them while the other is idle
SLOW_FIRST = ("test_pipeline.py::test_bf16_fast_path_tracks_fp32",
              "test_conv2d.py::test_unet_conv_kernels_equal_reference[triton",
              "test_quality.py::test_shipped_model_passes",
              "test_pipeline.py::test_reference_equals_diffusers_full_chain",
              "test_conv2d.py::test_fast_runner_conv_kernels_sample_like_the_reference_kernels")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not any(s in item.nodeid for s in SLOW_FIRST))   # stable
    if not config.getoption("--aot"):
        skip = pytest.mark.skip(reason="ahead-of-time GPU compiles: run with --aot "
                                       "(.ci/run does)")
        for item in items:
            if item.get_closest_marker("aot") is not None:
                item.add_marker(skip)
    _group_shared_fixtures(config, items)


def _group_shared_fixtures(config, items):
    """Under xdist's loadgroup distribution (pyproject's addopts) the tests that share a module-
    or class-scoped fixture run on one worker, so that it is made once, not once a worker; every
    other test goes to whichever worker is free."""
    if config.getoption("dist", default=None) != "loadgroup":       # xdist absent or off
        return
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info is not None else ()
        if any(d[-1].scope in ("module", "class", "package") for d in defs if d):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
