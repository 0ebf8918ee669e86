"""Fused ops: each a torch.library custom op with a fake implementation, a torch reference, and
dispatch to the native (C++/CUDA) or Triton kernels. See ddpm_fast/ops/backend.py for the choice."""
from .attention import attention, attention_reference
from .ddpm_step import ddpm_step, ddpm_step_out, ddpm_step_reference
from .group_norm import group_norm, group_norm_reference
from .philox import philox_normal, philox_normal_reference, philox4x32_10_reference

__all__ = ["attention", "attention_reference", "ddpm_step", "ddpm_step_out", "ddpm_step_reference",
           "group_norm", "group_norm_reference", "philox_normal", "philox_normal_reference",
           "philox4x32_10_reference"]
