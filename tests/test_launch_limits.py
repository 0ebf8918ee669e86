"""What every kernel launch must satisfy, checked where no kernel can run: grids within CUDA's limits
at the largest batch `batch_size="auto"` may choose, and no pointer of another device handed over.

The Triton launchers run on meta tensors with their kernels replaced by recorders, so the launch
arithmetic (grid, tiles, buffer shapes) is what a GPU would get."""
import pytest
import torch

pytest.importorskip("triton")

from ddpm_fast.memory import MAX_AUTO_BATCH  # noqa: E402

GRID_YZ_LIMIT = 65_535          # CUDA's grid-Y and grid-Z maximum (grid-X: 2³¹ − 1)


class Recorder:
    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.grids.append(tuple(grid))


def _record(monkeypatch, module, *names):
    recorder = Recorder()
    for name in names:
        monkeypatch.setattr(module, name, recorder)
    return recorder


def _assert_within_limits(grids):
    assert grids
    for grid in grids:
        assert all(g >= 1 for g in grid), grid
        assert grid[0] < 2 ** 31 and all(g <= GRID_YZ_LIMIT for g in grid[1:]), grid


def _meta(*shape, dtype=torch.bfloat16, channels_last=True):
    t = torch.empty(*shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def test_auto_batch_bound_is_what_these_tests_use():
    assert MAX_AUTO_BATCH >= 4096


@pytest.mark.parametrize("shape", [(MAX_AUTO_BATCH, 128, 32, 32), (MAX_AUTO_BATCH, 512, 8, 8)])
def test_group_norm_grid(monkeypatch, shape):
    from ddpm_fast.kernels.triton import group_norm as gn

    rec = _record(monkeypatch, gn, "_gn_partial_kernel", "_gn_apply_kernel")
    x = _meta(*shape)
    c = shape[1]
    gn.group_norm(torch.empty_like(x), x, _meta(c, dtype=torch.float32),
                  _meta(c, dtype=torch.float32), 32, 1e-6, True, None, True)
    _assert_within_limits(rec.grids)


def test_attention_grid(monkeypatch):
    from ddpm_fast.kernels.triton import attention as at

    rec = _record(monkeypatch, at, "_attention_kernel")
    q = _meta(MAX_AUTO_BATCH, 256, 512)
    at.attention(torch.empty_like(q), q, q, q, 512 ** -0.5)
    _assert_within_limits(rec.grids)


def test_conv2d_and_norm_affine_grids(monkeypatch):
    from ddpm_fast.kernels.triton import conv2d as cv

    rec = _record(monkeypatch, cv, "_conv2d_kernel", "_norm_affine_kernel")
    monkeypatch.setattr(cv, "INTERPRET", False)
    n = MAX_AUTO_BATCH
    x, skip = _meta(n, 256, 16, 16), _meta(n, 256, 16, 16)
    weight = _meta(256, 512, 3, 3)
    stats = [_meta(n, 4, 256, 3, dtype=torch.float32)] * 2
    scale, shift = cv.norm_affine(stats, _meta(512, dtype=torch.float32),
                                  _meta(512, dtype=torch.float32), 32, 1e-6)
    y = _meta(n, 256, 16, 16)
    out_stats, groups = cv.conv2d(y, x, weight, None, stride=1, pad=(1, 1, 1, 1),
                                  upsample=False, skip=skip, scale=scale, shift=shift, silu=True,
                                  temb=None, residual=None, shortcut=None, return_stats=True,
                                  stats_groups=32)    # the per-image finish: tickets for n images
    assert out_stats.shape[0] == n and out_stats.shape[2:] == (256, 3)
    assert groups.shape == (n, 32, 3)
    _assert_within_limits(rec.grids)


def test_ops_refuse_tensors_on_another_device():
    """'meta' stands in for a second device: the error names the argument, before any launch."""
    from ddpm_fast.ops import attention, group_norm
    from ddpm_fast.ops.philox import _philox_normal_op, key_tensor

    x = torch.randn(2, 32, 4, 4)
    with pytest.raises(RuntimeError, match="weight is on meta"):
        group_norm(x, torch.ones(32, device="meta"), torch.zeros(32), 8, 1e-6, True)
    with pytest.raises(RuntimeError, match="add is on meta"):
        group_norm(x, torch.ones(32), torch.zeros(32), 8, 1e-6, True,
                   torch.zeros(2, 32, device="meta"))
    q = torch.randn(2, 16, 8)
    with pytest.raises(RuntimeError, match="devices differ"):
        attention(q, q.to("meta"), q, 0.3)
    with pytest.raises(RuntimeError, match="step is on meta"):
        _philox_normal_op(key_tensor(1), torch.zeros(1, dtype=torch.int64, device="meta"), 2, 8)
    from ddpm_fast.ops import ddpm_step
    from ddpm_fast.schedule import Schedule

    s = Schedule.linear()
    table = s.step_table(s.timesteps(5))
    x = torch.randn(1, 3, 4, 4)
    step, key = torch.tensor([0]), torch.tensor([0, 0])
    for name, args in (("coef", (x, x, table.to("meta"), step, key, None, True)),
                       ("step", (x, x, table, step.to("meta"), key, None, True)),
                       ("key", (x, x, table, step, key.to("meta"), None, True)),
                       ("noise", (x, x, table, step, key, x.to("meta"), True))):
        with pytest.raises(RuntimeError, match=f"{name} is on meta"):
            ddpm_step(*args)


def test_launches_run_under_the_tensors_device(monkeypatch):
    """Kernels launch on the current device: the ops make it the tensor's (`--device cuda:1`
    outside torchrun). Checked here with a stand-in tensor and a recording device switch."""
    from types import SimpleNamespace

    from ddpm_fast import _native

    entered = []

    class Switch:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Switch)
    with _native.on_device(SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _native.on_device(torch.zeros(1)):          # CPU: nothing to switch
        pass
    assert len(entered) == 1


def test_ops_launch_inside_the_device_switch(monkeypatch):
    """Every op's launch happens inside _native.on_device of its tensor (recorded on the CPU,
    where the switch is a no-op: the order of events is what is checked)."""
    import contextlib

    from ddpm_fast import _native
    from ddpm_fast.kernels.triton import group_norm as gn
    from ddpm_fast.ops import group_norm
    from ddpm_fast.ops.backend import use_backend

    events = []

    @contextlib.contextmanager
    def switch(t):
        events.append(("enter", t.device))
        yield
        events.append(("exit", t.device))

    launched = gn.group_norm
    monkeypatch.setattr(_native, "on_device", switch)
    monkeypatch.setattr(gn, "group_norm", lambda *a: (events.append(("launch",)), launched(*a)))
    x = torch.randn(1, 8, 2, 2)
    with use_backend("triton"):
        group_norm(x, torch.ones(8), torch.zeros(8), 2, 1e-6, False)
    assert events == [("enter", x.device), ("launch",), ("exit", x.device)]
