"""The fast runner: the same sampler as sampling.py, run as fast as the device allows.

- Weights cast once (bf16 by default on GPUs and on CPUs with native bf16 convolutions, else
  fp32) and laid out channels_last, each attention block's q/k/v projections stacked into one
  GEMM; the sampler state x_t stays fp32.
- Time path precomputed: the time MLP and every ResBlock's time projection depend on t only, so
  their outputs for every step of the run are one table [steps, Σ channels]; a step reads its
  row by a device-side step index (22 small GEMMs per step fewer on the CIFAR model).
- The sampler update is the fused ddpm_step op with in-kernel Philox noise keyed by
  (seed, image index): no host arithmetic, no host random numbers. Dynamic thresholding and
  learned variances, which the kernel does not fuse, take ddpm_step_general instead (torch ops,
  the same Philox noise, still no host sync, so still one graph).
- On CUDA one step (U-Net + update + step-index increment) is captured once per batch shape as a
  CUDA graph and replayed for every step; nothing touches the host inside the loop.
- The U-Net's kernels are the kernel table's choice for the device and the batch size
  (ops/backend.py UNET_TABLE): where one setting wins at small batches and another at large
  ones, each batch size runs its own variant of the model, built at its first use.
- cuDNN's benchmark mode is on while the runner works on CUDA: a run repeats the same
  convolution shapes hundreds of times, so timing the candidate algorithms once (at warm-up,
  before capture) is paid back many times. The global flag is restored afterwards. Timing can
  pick other algorithms in another process, so images may differ in their last bits from run
  to run; with torch.use_deterministic_algorithms(True) or cudnn.deterministic set, or
  autotune_convs=False, it stays off.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from typing import Optional, Sequence

import torch

from .ops.backend import UNET_SETTINGS, UNET_TABLE, unet_setting
from .ops.ddpm_step import ddpm_step_general, ddpm_step_out
from .ops.philox import _philox_normal_op as philox_normal_op
from .ops.philox import key_tensor, philox_normal
from .ops.solver_step import solver_step_
from .sampling import WATCH_EVERY, check_finite
from .schedule import COEF_COLS, LEARNED_VARIANCES
from .solvers import table as col
from .solvers.table import limit_prediction
from .unet import TimeProjections, UNet2DModel


@functools.lru_cache(maxsize=None)
def mkldnn_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU (AVX-512 with BW/VL/DQ, or
    AMX / AVX-NE-CONVERT); an AVX2-only CPU has no bf16 path in oneDNN."""
    try:
        return (torch.backends.mkldnn.is_available()
                and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs, and on CPUs where oneDNN runs bf16 convolutions natively: measured 2.07x
    fp32's step on a 2-core Zen 4 EPYC (CIFAR-10, batch 8, 291 vs 601 ms), with samples that
    track fp32's (tests/test_pipeline.py). fp32 elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if mkldnn_bf16() else torch.float32


def default_autotune(device: torch.device) -> bool:
    """cuDNN benchmark mode by default on CUDA, unless the caller asked for deterministic
    algorithms (benchmark mode's choice can change from process to process)."""
    return (torch.device(device).type == "cuda"
            and not torch.are_deterministic_algorithms_enabled()
            and not torch.backends.cudnn.deterministic)


@contextlib.contextmanager
def cudnn_benchmark(on: bool):
    """torch.backends.cudnn.benchmark set to `on` inside, the caller's value restored after."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def mkldnn_packing_available() -> bool:
    """Whether torch has oneDNN's prepacked-weight convolution ops (x86 CPU builds do; they are
    what Inductor's CPU freezing emits)."""
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))
    except (AttributeError, RuntimeError):
        return False


class PackedConv2d(torch.nn.Conv2d):
    """A CPU inference Conv2d whose weight oneDNN reorders into its own blocked layout once, at
    the first call, instead of at every call. The packed copy serves any input size and layout
    (the fast runner's channels_last U-Net gave bit-identical outputs; tests allow bf16
    rounding); it is not refreshed, so use it on frozen weights only (the fast runner's private
    copy). Grad mode and torch.compile take the plain convolution."""

    @staticmethod
    def can_wrap(conv: torch.nn.Module) -> bool:
        """A plain Conv2d with zero padding given as numbers (not "same"/"valid")."""
        return (type(conv) is torch.nn.Conv2d and conv.padding_mode == "zeros"
                and isinstance(conv.padding, tuple))

    @classmethod
    def wrap(cls, conv: torch.nn.Conv2d) -> "PackedConv2d":
        if not cls.can_wrap(conv):
            raise ValueError(f"cannot prepack {conv}")
        conv.__class__ = cls          # same parameters, names and state_dict; new forward
        conv.packed_weight = None
        conv.conv_args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() or x.device.type != "cpu" or torch.compiler.is_compiling()
                or (x.dtype == torch.bfloat16 and not mkldnn_bf16())):
            return super().forward(x)
        if self.packed_weight is None:
            self.packed_weight = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, *self.conv_args, list(x.shape))
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed_weight, self.bias,
                                                       *self.conv_args, "none", [], "")


def pack_convolutions(model: torch.nn.Module) -> torch.nn.Module:
    """Every Conv2d of a CPU model that can be prepacked made a PackedConv2d (in place)."""
    for m in model.modules():
        if PackedConv2d.can_wrap(m):
            PackedConv2d.wrap(m)
    return model


def gemm_layout(model: torch.nn.Module) -> torch.nn.Module:
    """Every convolution weight re-laid in place as [KH, KW, Cin, Cout] memory, and every
    attention projection as [Cin, Cout] (shapes and values unchanged): the layout the conv2d
    op's implicit GEMM reads its B tiles from, output channels contiguous. torch's own
    convolutions and linear layers take it too, by strides."""
    from .unet import Attention

    def relaid(w):
        return w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1) if w.dim() == 4 \
            else w.t().contiguous().t()

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.data = relaid(m.weight.data)
            elif isinstance(m, Attention):
                m.to_out[0].weight.data = relaid(m.to_out[0].weight.data)
                if m.qkv_weight is not None:
                    m.qkv_weight = relaid(m.qkv_weight)
    return model


# Bumped whenever any module in the process registers a parameter, buffer or submodule
# (assignment, load_state_dict(assign=True), new modules): the tree walk of WeightsWatch is
# redone only then, so the per-call check is a pass over a cached list of tensors.
_registrations = [0]


def _count_registration(*args):
    _registrations[0] += 1


for _register in ("register_module_parameter_registration_hook",
                  "register_module_buffer_registration_hook",
                  "register_module_module_registration_hook"):
    getattr(torch.nn.modules.module, _register)(_count_registration)


class WeightsWatch:
    """Whether a module's weights may have changed since the watch was made: each parameter
    and buffer stays the same object (in the same slot), on the same storage, at the same
    version counter (every in-place write bumps it: load_state_dict, optimizer and EMA steps;
    `.data =` and `.to()` change the storage; new Parameter objects fail the identity test),
    and no module of the process registered anything since (a submodule or a parameter
    assigned: the tree is walked again). Cheap enough for every sampling call: 0.05 ms on the
    shipped model (2-core CPU; 0.24 ms with the walk); holds the tensors only by reference
    from their own modules' slots."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.registrations = _registrations[0]
        self.slots = [(d, name, t, t.data_ptr(), t._version) for m in module.modules()
                      for d in (m._parameters, m._buffers)
                      for name, t in d.items() if t is not None]

    def unchanged(self, module: torch.nn.Module) -> bool:
        if module is not self.module:
            return False
        if self.registrations != _registrations[0]:
            # something registered somewhere: compare by walking the tree again
            fresh = WeightsWatch(module)
            if len(fresh.slots) != len(self.slots) or any(
                    a[1:2] != b[1:2] or a[2] is not b[2] or a[3:] != b[3:]
                    for a, b in zip(fresh.slots, self.slots)):
                return False
            self.registrations = fresh.registrations
            return True
        return all(d.get(name) is t and t.data_ptr() == ptr and t._version == version
                   for d, name, t, ptr, version in self.slots)


def check_plan(coef: torch.Tensor, timesteps: Sequence[int], cols: int = COEF_COLS) -> None:
    """A run reads row i of the step table at step i: refuse a table that does not have one
    float32 row of `cols` per timestep (COEF_COLS: Schedule.step_table's; a solver plan's:
    solvers.COLS), before anything runs (the kernels would otherwise poison the state with NaN
    at the first missing row)."""
    if coef.dim() != 2 or coef.shape[1] != cols or coef.dtype != torch.float32:
        raise ValueError(f"step table must be float32 [steps, {cols}] (Schedule.step_table or "
                         f"a solver plan), got {coef.dtype} {tuple(coef.shape)}")
    if coef.shape[0] != len(timesteps):
        raise ValueError(f"step table has {coef.shape[0]} rows for {len(timesteps)} timesteps: "
                         "build it from the same timesteps (Schedule.step_table(timesteps))")


class FastRunner:
    def __init__(self, unet: UNet2DModel, device=None, dtype: Optional[torch.dtype] = None,
                 channels_last: Optional[bool] = None, use_graphs: Optional[bool] = None,
                 compile: Optional[bool] = None, kernels: Optional[str] = None,
                 autotune_convs: Optional[bool] = None):
        if kernels is not None and kernels not in UNET_SETTINGS:
            raise ValueError(f"kernels must be one of {tuple(UNET_SETTINGS)}, got {kernels!r}")
        device = torch.device(device or unet.device)
        on_gpu = device.type == "cuda"
        self.device = device
        self.dtype = dtype or default_dtype(device)
        # channels_last on the CPU too: the U-Net's attention blocks hand back channels_last
        # views, so an NCHW model switched layout there and every later convolution cloned its
        # weight per call; one layout throughout measured 1.02-1.11x per step on the 2-core CPU
        # (CIFAR-10 batch 1 and 8, bf16 and fp32; benchmarks/sample_throughput.py)
        self.channels_last = True if channels_last is None else channels_last
        # cuDNN benchmark mode (see the module docstring); the CPU has no cuDNN
        self.autotune_convs = (default_autotune(device) if autotune_convs is None
                               else autotune_convs)
        self.use_graphs = on_gpu if use_graphs is None else use_graphs
        if self.use_graphs and not on_gpu:
            raise ValueError("CUDA graphs need a CUDA device")
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        base = copy.deepcopy(unet).to(device=device, dtype=self.dtype,
                                      memory_format=self.memory_format).eval()
        base.fuse_qkv()           # one GEMM per attention block for q, k and v
        # The U-Net setting: `kernels` (a key of backend.UNET_SETTINGS) for every batch, else
        # the kernel table's choice for this device and batch size with the measurements behind
        # it (ops/backend.py). An explicit compile=True leaves the torch ops to Inductor;
        # compile=False instead of the table's Inductor runs our fused kernels eagerly.
        self._kernels, self._compile = kernels, compile
        # a pristine copy to build other batch sizes' variants from, when the table has them
        per_batch = kernels is None and compile is None and \
            len(UNET_TABLE.get(device.type, ())) > 1
        self._pristine = copy.deepcopy(base) if per_batch else None
        self._default = self._variant_key(None)            # the any-batch variant
        self.setting = self._default[0]
        self._variants = {self._default: self._build(base, *self._default)}
        self.unet = self._variants[self._default][0]
        self._graphs: dict = {}

    @property
    def model(self):
        """What calls the any-batch variant's U-Net: itself, or its torch.compile."""
        return self._variants[self._default][1]

    def _variant_key(self, batch: Optional[int]) -> tuple[str, bool]:
        """(setting, torch.compile) for `batch` images (None: the table's any-batch entry)."""
        setting = self._kernels or unet_setting(self.device, batch)
        compile = self._compile
        if compile is None:
            compile = UNET_SETTINGS[setting][2]
        if self._kernels is None:
            setting = "inductor" if compile else ("fused" if setting == "inductor" else setting)
        return setting, compile

    def _build(self, unet: UNet2DModel, setting: str, compile: bool):
        """(U-Net with the setting's kernels and weight layouts, what calls it: itself or its
        torch.compile) — made from `unet` in place."""
        unet_kernels, attention_kernels, _ = UNET_SETTINGS[setting]
        if self.device.type == "cpu" and not compile and setting != "conv" and \
                mkldnn_packing_available():
            # oneDNN reorders a convolution's weight at every call unless it is prepacked:
            # measured 1.14x per CIFAR-10 step at batch 1 (bf16, 2-core CPU), 1.03x at batch 8
            pack_convolutions(unet)
        unet.set_kernels(unet_kernels, attention=attention_kernels)
        if setting == "conv":
            gemm_layout(unet)
        for norm in unet.fused_norms():           # the op's fp32 affine: cast once, not per call
            norm.float()
        return unet, torch.compile(unet, fullgraph=True) if compile else unet

    def variant(self, batch: int) -> tuple[str, bool]:
        """The key of the model variant that runs `batch` images, built at its first use."""
        key = self._variant_key(batch)
        if key not in self._variants:
            if self._pristine is None:      # one setting for all batches when built
                return self._default
            self._variants[key] = self._build(copy.deepcopy(self._pristine), *key)
        return key

    def variant_unet(self, batch: int) -> UNet2DModel:
        return self._variants[self.variant(batch)][0]

    def _unet(self, x: torch.Tensor, temb: TimeProjections, key: tuple) -> torch.Tensor:
        unet, model = self._variants[key]
        try:
            return model(x, None, temb=temb)
        except Exception as e:       # Inductor failed (at the first, warm-up call): go eager
            if model is unet:
                raise
            warnings.warn(f"torch.compile of the U-Net failed ({type(e).__name__}: {e}); "
                          "using the eager U-Net with the fused kernels")
            self._eager_fallback(key)
            return unet(x, None, temb=temb)

    def _eager_fallback(self, key: tuple) -> None:
        """The eager U-Net with our fused kernels, not the reference ops that compile chose
        (those were left for Inductor to fuse)."""
        unet = self._variants[key][0]
        unet.set_kernels("fused")
        for norm in unet.fused_norms():
            norm.float()
        self._variants[key] = (unet, unet)

    # ------------------------------------------------------------------ tables
    @torch.no_grad()
    def time_table(self, timesteps: Sequence[int]) -> torch.Tensor:
        """Every ResBlock's time projection for each timestep of a run: [steps, Σ out_ch], in
        the model dtype."""
        whole = all(float(t).is_integer() for t in timesteps)   # some solvers' are fractional
        t = torch.tensor(list(timesteps), dtype=torch.int64 if whole else torch.float32,
                         device=self.device)
        return self.unet.time_projections(self.unet.time_embed(t, len(timesteps))).rows

    # ------------------------------------------------------------------ one step
    def _step(self, state: dict) -> None:
        x, step = state["x"], state["step"]
        temb = TimeProjections(state["temb"].index_select(0, step))   # [1, Σ C], broadcast
        if state["rule"][0] == "solver":
            self._solver_step(state, temb)
            step.add_(1)
            return
        # one kernel: cast to the model dtype straight into the model's memory format
        inp = x.to(dtype=self.dtype, memory_format=self.memory_format)
        eps = self._unet(inp, temb, state["variant"])
        threshold, variance = state["rule"]
        if threshold is None and variance is None:     # the common case: the fused kernel
            ddpm_step_out(x, x, eps, state["coef"], step, state["key"], None, state["clip"])
        else:
            x.copy_(ddpm_step_general(x, eps, state["coef"], step, state["key"], None,
                                      state["clip"], threshold, variance))
        step.add_(1)

    def _solver_step(self, state: dict, temb: TimeProjections) -> None:
        """A few-step solver's step (solvers/table.py) on fixed buffers: the fused op
        (ops/solver_step.py), or torch ops where dynamic thresholding (a per-image quantile)
        takes part. The row, the Philox word and the noise stay on the device either way, so a
        CUDA graph captures it."""
        x, buffers = state["x"], state["buffers"]
        _, corrector, stochastic, threshold, keep = state["rule"]
        row = state["coef"].index_select(0, state["step"]).reshape(-1)
        inp = (x * row[col.C_IN]).to(dtype=self.dtype, memory_format=self.memory_format)
        out = self._unet(inp, temb, state["variant"])
        if threshold is None:            # the fused kernel (it reads out's first C channels)
            solver_step_(x, *buffers, out, state["coef"], state["step"], state["key"],
                         corrector, stochastic)
            return
        if keep is not None:
            out = out[:, :keep]
        m = row[col.P] * x + row[col.Q] * out.float()
        if threshold is not None:
            m = limit_prediction(m, threshold)
        x_last, m1, m2, m3 = buffers
        if corrector:
            x_c = (row[col.KX] * x + row[col.KL] * x_last + row[col.K0] * m + row[col.K1] * m1
                   + row[col.K2] * m2 + row[col.K3] * m3)
        else:
            x_c = x
        new = row[col.A] * x_c + row[col.B0] * m + row[col.B1] * m1 + row[col.B2] * m2
        if stochastic:
            word = row[col.WORD].to(torch.int64).reshape(1)
            z = philox_normal_op(state["key"], word, x.shape[0], x[0].numel()).view_as(x)
            new = new + row[col.S] * z
        if corrector:
            x_last.copy_(x_c)
        m3.copy_(m2)
        m2.copy_(m1)
        m1.copy_(m)
        x.copy_(new)

    def _state(self, batch, coef, temb, key, clip, rule) -> dict:
        c = self.unet.config
        shape = (batch, c.in_channels, c.sample_size, c.sample_size)
        state = {"x": torch.zeros(shape, device=self.device),
                 "step": torch.zeros(1, dtype=torch.int64, device=self.device),
                 "coef": coef, "temb": temb, "key": key, "clip": clip, "rule": rule,
                 "variant": self.variant(batch)}
        if rule[0] == "solver":          # x_last, m1, m2, m3 (solvers/table.py)
            state["buffers"] = [torch.zeros(shape, device=self.device) for _ in range(4)]
        return state

    def _warm_up(self, state: dict) -> None:
        """Two steps before capture (allocator, cuDNN plans, compilation), each from row 0 so
        that one- and two-row tables are never overrun; leaves the step index at 0."""
        for _ in range(2):
            state["step"].zero_()
            self._step(state)
        state["step"].zero_()

    def _graph_for(self, batch: int, coef: torch.Tensor, temb: torch.Tensor, key: torch.Tensor,
                   clip: bool, rule: tuple):
        """A captured step for this batch shape, table length and step rule. Its buffers are
        shaped like (and first filled from) this run's tables; later runs copy theirs in."""
        cache_key = (batch, coef.shape[0], clip, rule, self.dtype)
        if cache_key not in self._graphs:
            state = self._state(batch, coef.clone(), temb.clone(), key.clone(), clip, rule)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.no_grad():
                self._warm_up(state)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph), torch.no_grad():
                    self._step(state)
            except RuntimeError as e:
                raise RuntimeError(f"CUDA graph capture failed for batch {batch}: {e}; "
                                   "run with use_graphs=False for the eager path") from e
            self._graphs[cache_key] = (graph, state)
        return self._graphs[cache_key]

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def _prepare(self, coef: torch.Tensor, timesteps: Sequence[int], batch: int, key, clip: bool,
                 rule: tuple = (None, None)):
        """(state, run-one-step) for a run: the cached graph with this run's tables copied into
        its buffers, or eager steps when graphs are off or capture failed. rule: (threshold,
        learned variance), both None for the fused step."""
        from .solvers import COLS

        check_plan(coef, timesteps, COLS if rule[0] == "solver" else COEF_COLS)
        coef = coef.to(self.device)
        temb = self.time_table(timesteps)
        if self.use_graphs:
            try:
                graph, state = self._graph_for(batch, coef, temb, key, clip, rule)
            except RuntimeError as e:              # capture failed: the eager path still works
                warnings.warn(f"{e}; sampling without CUDA graphs")
            else:
                state["coef"].copy_(coef)
                state["temb"].copy_(temb)
                state["key"].copy_(key)
                return state, graph.replay
        state = self._state(batch, coef, temb, key, clip, rule)
        return state, lambda: self._step(state)

    @torch.no_grad()
    def sample(self, coef: torch.Tensor, timesteps: Sequence[int], batch: int, seed: int,
               first_image: int = 0, clip: bool = True, x_T: Optional[torch.Tensor] = None,
               num_train_timesteps: int = 1000, progress=None, *,
               threshold: Optional[tuple] = None, variance: Optional[str] = None
               ) -> torch.Tensor:
        """Run all rows of `coef` from x_T (Philox noise at step T unless given); returns x_0.
        threshold (ratio, max value): dynamic thresholding of x̂0; variance "learned" /
        "learned_range": σ from the U-Net's second half (`coef` built for it). Either takes
        the torch step (ddpm_step_general) instead of the fused kernel."""
        rule = (None if threshold is None else tuple(threshold),
                variance if variance in LEARNED_VARIANCES else None)
        c = self.unet.config
        shape = (batch, c.in_channels, c.sample_size, c.sample_size)
        if x_T is None:
            x_T = philox_normal(shape, seed, num_train_timesteps, first_image, self.device)
        with cudnn_benchmark(self.autotune_convs):
            state, run = self._prepare(coef, timesteps, batch,
                                       key_tensor(seed, first_image, self.device), clip, rule)
            state["x"].copy_(x_T)
            state["step"].zero_()
            for i in range(len(timesteps)):
                run()
                if (i + 1) % WATCH_EVERY == 0 or i == len(timesteps) - 1:
                    check_finite(state["x"], i, timesteps[i], first_image)
                if progress is not None:
                    progress(1)
        return state["x"].clone()

    @torch.no_grad()
    def sample_plan(self, plan, batch: int, seed: int, first_image: int = 0,
                    num_train_timesteps: int = 1000, progress=None) -> torch.Tensor:
        """A few-step solver's run (solvers/table.py Plan) from Philox x_T · init_noise_sigma,
        its noise keyed by (seed, image index) at each row's WORD: the same images as the
        reference loop given the same noise (pipeline._sample_plan)."""
        rule = ("solver", plan.corrector, plan.stochastic,
                None if plan.threshold is None else tuple(plan.threshold), plan.keep_channels)
        c = self.unet.config
        shape = (batch, c.in_channels, c.sample_size, c.sample_size)
        x_T = philox_normal(shape, seed, num_train_timesteps, first_image, self.device)
        with cudnn_benchmark(self.autotune_convs):
            state, run = self._prepare(plan.table, plan.timesteps, batch,
                                       key_tensor(seed, first_image, self.device), False, rule)
            state["x"].copy_(x_T * plan.init_noise_sigma)
            for buffer in state["buffers"]:      # no row reads a buffer before writing it,
                buffer.zero_()                   # but a NaN left by a last run would stay NaN
            state["step"].zero_()
            for i, t in enumerate(plan.timesteps):
                run()
                if (i + 1) % WATCH_EVERY == 0 or i == len(plan.timesteps) - 1:
                    check_finite(state["x"], i, t, first_image)
                if progress is not None:
                    progress(1)
        return state["x"].clone()

    def benchmark_step_fn(self, coef: torch.Tensor, timesteps: Sequence[int], batch: int,
                          clip: bool = True, *, threshold: Optional[tuple] = None,
                          variance: Optional[str] = None):
        """A callable running one step per call (for benchmarks/sample_throughput.py);
        threshold and variance as in sample."""
        rule = (None if threshold is None else tuple(threshold),
                variance if variance in LEARNED_VARIANCES else None)
        with cudnn_benchmark(self.autotune_convs):
            state, run = self._prepare(coef, timesteps, batch, key_tensor(0, 0, self.device),
                                       clip, rule)
        state["x"].normal_()
        n = len(timesteps)

        def step(i):
            if i % n == 0:
                state["step"].zero_()
            with torch.no_grad(), cudnn_benchmark(self.autotune_convs):
                run()

        return step
