"""Likelihood of a DDPM: the variational bound in bits per dimension (Ho et al. 2020, eq. 5 and
section 3.3), the paper's NLL metric, as the original implementation computes it
(diffusion_utils_2.py: normal_kl, discretized_gaussian_log_likelihood with its tanh CDF)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .sampling import q_sample
from .schedule import Schedule


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The normal CDF as the original DDPM code computes it (diffusion_utils_2.py
    approx_standard_normal_cdf): 0.5 (1 + tanh(√(2/π) (x + 0.044715 x³)))."""
    return 0.5 * (1.0 + torch.tanh((2.0 / math.pi) ** 0.5 * (x + 0.044715 * x.pow(3))))


def standard_normal_cdf(x):
    """The exact normal CDF, 0.5 (1 + erf(x/√2))."""
    return 0.5 * (1.0 + torch.erf(x / 2 ** 0.5))


def _discretized_gaussian_log_likelihood(x, mean, log_scale, exact_cdf: bool = False):
    """log p(x) of 8-bit data in [-1, 1] under a Gaussian discretised to bins of width 2/255,
    the outermost bins extended to ±∞ (Ho et al. 2020, section 3.3). The CDF is the original
    code's tanh approximation (discretized_gaussian_log_likelihood there), so that the numbers
    reproduce its implementation; exact_cdf=True uses erf instead."""
    cdf = standard_normal_cdf if exact_cdf else approx_standard_normal_cdf
    centred, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (centred + 1 / 255))
    cdf_min = cdf(inv_std * (centred - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


@torch.no_grad()
def bits_per_dim(unet, schedule: Schedule, x0: torch.Tensor, variance: str = "fixed_large",
                 clip: bool = True, num_terms: Optional[int] = None, generator=None,
                 exact_cdf: bool = False) -> dict:
    """The variational bound L_vlb = L_T + Σ_{t>1} L_{t−1} + L_0 in bits per dimension, per image
    (Ho et al. 2020, eq. 5; the paper's NLL metric). x0: 8-bit images scaled to [-1, 1].
    num_terms: evaluate that many KL terms (the smallest t exactly, the rest evenly spaced and
    scaled: an estimate, for speed); None evaluates all T − 1 of them. The decoder term L_0
    uses the original code's tanh approximation of the normal CDF; exact_cdf=True the exact
    (erf) one. Returns per-image tensors: total, prior, decoder, kl."""
    if schedule.prediction_type != "epsilon":
        raise ValueError(f"bits_per_dim needs an ε-predicting model; the scheduler's "
                         f"prediction_type is {schedule.prediction_type!r}")
    if variance not in ("fixed_large", "fixed_small"):   # the *_log forms are the same σ²
        if variance not in ("fixed_large_log", "fixed_small_log"):
            raise ValueError(f"bits_per_dim supports the fixed variances; variance_type "
                             f"{variance!r} (a learned σ²) is not implemented for the bound")
        variance = variance.removesuffix("_log")
    device, f64 = x0.device, torch.float64
    n_t = schedule.num_timesteps
    x0 = x0.to(torch.float64)
    abar = schedule.on(device, "alphas_cumprod", f64)
    post_var = schedule.on(device, "posterior_variance", f64)
    post_logvar = schedule.on(device, "posterior_log_variance_clipped", f64)
    c1 = schedule.on(device, "posterior_mean_coef1", f64)
    c2 = schedule.on(device, "posterior_mean_coef2", f64)
    betas = schedule.betas.to(device, f64)
    model_logvar = (torch.log(torch.cat([post_var[1:2], betas[1:]])) if variance == "fixed_large"
                    else post_logvar)
    dims = x0[0].numel()
    ln2 = torch.log(torch.tensor(2.0, dtype=f64))

    def term(t: int):
        """(mean over dims, in nats) of L_{t-1} for t ≥ 1 (KL) or L_0 for t = 0 (decoder)."""
        noise = torch.randn(x0.shape, generator=generator, dtype=f64, device=device)
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
        xt = q_sample(schedule, x0, tt, noise)
        eps = unet(xt.to(unet.dtype), tt).to(f64)
        x0_pred = (xt - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        if clip:
            x0_pred = x0_pred.clamp(-schedule.clip_range, schedule.clip_range)
        mean = c1[t] * x0_pred + c2[t] * xt
        if t == 0:
            ll = _discretized_gaussian_log_likelihood(x0, mean, 0.5 * model_logvar[t],
                                                      exact_cdf)
            return -ll.flatten(1).mean(1)
        kl = _normal_kl(c1[t] * x0 + c2[t] * xt, post_logvar[t], mean, model_logvar[t])
        return kl.flatten(1).mean(1)

    if num_terms is None or num_terms >= n_t - 1:
        kl = sum(term(t) for t in range(1, n_t))
    else:
        # the terms are largest and change fastest at small t: those are summed exactly, the
        # rest estimated from evenly spaced samples (stratified, scaled to their count)
        exact = min(32, n_t - 1, max(num_terms // 2, 1))
        kl = sum(term(t) for t in range(1, exact + 1))
        rest = n_t - 1 - exact
        k = max(num_terms - exact, 1)
        if rest > 0:
            samples = torch.linspace(exact + 1, n_t - 1, k).round().long().tolist()
            kl = kl + sum(term(t) for t in samples) * (rest / len(samples))
    decoder = term(0)
    prior = _normal_kl(abar[-1].sqrt() * x0, torch.log(1 - abar[-1]),
                       torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).mean(1)
    to_bits = 1 / ln2
    return {"total": (kl + decoder + prior) * to_bits, "prior": prior * to_bits,
            "decoder": decoder * to_bits, "kl": kl * to_bits, "dims": dims}


def mean_bits_per_dim(unet, schedule: Schedule, x0: torch.Tensor, batch_size: int,
                      variance: str = "fixed_large", num_terms: Optional[int] = None,
                      generator=None, exact_cdf: bool = False) -> dict:
    """bits_per_dim averaged over the images x0 (model space, on the CPU or the model's device),
    `batch_size` at a time: {"total", "prior", "decoder", "kl": floats, "images": count}.
    x0 is first put on the 8-bit grid the discrete decoder L_0 assumes."""
    device = next(unet.parameters()).device
    x0 = ((x0 + 1) * 127.5).round() / 127.5 - 1
    parts = [bits_per_dim(unet, schedule, chunk.to(device), variance=variance,
                          num_terms=num_terms, generator=generator, exact_cdf=exact_cdf)
             for chunk in x0.split(batch_size)]
    result = {k: float(torch.cat([p[k] for p in parts]).mean())
              for k in ("total", "prior", "decoder", "kl")}
    result["images"] = int(x0.shape[0])
    return result
