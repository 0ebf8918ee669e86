"""The sample-quality gate on the shipped digits model. Thresholds come from measured runs
(256 samples, CPU, seed 0; real digits: confident 0.80, entropy 3.31, Fréchet 0.44):
  reference DDPM 1000 steps: 0.79 / 3.31 / 1.05    fast DDPM 100 steps: 0.81 / 3.28 / 1.12
  fast DDIM 50 steps:        0.73 / 3.29 / 0.72    untrained model:     0.05 / 2.77 / 36.2
(fast mode runs bf16 on CPUs with native bf16 convolutions, fp32 elsewhere: 0.80 / 3.27 / 1.14
and 0.74 / 3.29 / 0.77 in fp32.)
(The Fréchet distance of 128 samples runs higher than of 256: fewer samples, noisier covariance:
reference DDPM 1000 steps on 128 samples scores 0.77 / 3.27 / 1.79, a tenth inside the bound.)
The reference gate runs DDPM at 100 steps from a torch generator (diffusers' noise, so other
images than fast mode's Philox ones): 0.84 / 3.31 / 0.74 (256 samples, 25 s against the 119 s
of 1000 steps on 128, on one core). The 1000-step chain runs the same loop
over ten times the rows; that it equals diffusers' step for step is
test_pipeline.py::test_reference_equals_diffusers_full_chain, and its quality (512 samples,
Fréchet 0.70) is benchmarks/solver_quality.py's, in the README.
A sampler bug that damages images must fail the gate (tested with a broken step table)."""
import pytest
import torch

from conftest import TRITON
import ddpm_fast
from ddpm_fast.cli import default_model_path
from ddpm_fast.images import unit_to_uint8
from ddpm_fast.ops.backend import use_backend
from ddpm_fast.schedule import SIGMA
from ddpm_fast.training import DIGITS_CONFIG
from ddpm_fast.unet import UNet2DModel

pytest.importorskip("sklearn")
from ddpm_fast.quality import real_scores, score  # noqa: E402

GATE = dict(confident=0.6, entropy=3.0, frechet=2.0)


def passes(s) -> bool:
    return (s.confident >= GATE["confident"] and s.entropy >= GATE["entropy"]
            and s.frechet <= GATE["frechet"])


def _sample(pipe, n, **kw):
    noise = ({"seed": 0} if pipe.mode == "fast" else
             {"generator": torch.Generator().manual_seed(0)})
    x = pipe(batch_size=n, output_type="pt", **noise, **kw).images
    return score(unit_to_uint8(x))


def test_real_digits_pass():
    assert passes(real_scores())


@pytest.mark.parametrize("mode, kw, n", [
    ("reference", dict(num_inference_steps=100), 256),
    ("fast", dict(num_inference_steps=100), 256),
    ("fast", dict(num_inference_steps=50, sampler="ddim"), 256),
])
def test_shipped_model_passes(mode, kw, n):
    pipe = ddpm_fast.DDPMPipeline.from_pretrained(default_model_path(), mode=mode)
    s = _sample(pipe, n, **kw)
    assert passes(s), s


@pytest.mark.skipif(not TRITON, reason="triton is a Linux-only test extra; not installed here")
def test_shipped_model_on_triton_backend_samples_as_the_gated_backend():
    """The Triton sampler step and Philox noise (interpreter on CPU) sample the shipped model as
    the default backend does, whose samples pass the gate above: equal images imply equal
    scores, at a sixteenth of the cost of scoring 128 interpreted samples (177 s here). DDIM
    with η = 0.5, so that fresh noise enters every step; measured bit-identical on this CPU. The
    U-Net keeps torch ops (its Triton kernels are checked against the reference elsewhere).
    8 images: the step kernel runs one program an image, so the interpreter's cost is per image
    (8 images: 9 s, 16: 18 s), and noise is keyed per image the same way for any count."""
    pipe = ddpm_fast.DDPMPipeline.from_pretrained(default_model_path(), mode="fast")
    pipe.runner.unet.set_kernels("reference")
    images = {}
    for backend in ("triton", "auto"):
        with use_backend(backend):
            images[backend] = pipe(batch_size=8, seed=0, output_type="pt", sampler="ddim",
                                   num_inference_steps=30, eta=0.5).images
    assert images["triton"].std() > 0.1                      # images, not a constant
    assert (images["triton"] - images["auto"]).abs().max().item() <= 1e-5


def test_untrained_model_fails():
    # an untrained U-Net's samples are far from every bound: 0.05 / 2.77 / 36.2 (256 samples,
    # 100 steps), 0.08 / 2.88 / 36.1 with the 128 samples and 20 steps run here
    torch.manual_seed(0)
    pipe = ddpm_fast.DDPMPipeline(UNet2DModel(DIGITS_CONFIG).eval(), mode="fast")
    assert not passes(_sample(pipe, 128, num_inference_steps=20))


def test_sampler_bug_fails(monkeypatch):
    # tripling σ (a plausible variance bug) must be caught
    pipe = ddpm_fast.DDPMPipeline.from_pretrained(default_model_path(), mode="fast")
    table = type(pipe.schedule).step_table

    def broken(*a, **k):
        t = table(*a, **k)
        t[:, SIGMA] *= 3
        return t

    monkeypatch.setattr(type(pipe.schedule), "step_table", broken)
    # far outside the gate with 128 samples and 50 steps as with 256 and 100: measured
    # 0.24 / 3.09 / 15.3 (128 samples: 0.27 / 3.05 / 17.0 with 100 steps)
    assert not passes(_sample(pipe, 128, num_inference_steps=50))
