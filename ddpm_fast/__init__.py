"""ddpm_fast: DDPM training and sampling (Ho et al. 2020) as fast as the hardware allows."""
from ._native import build_info
from .checkpoints import CheckpointError, load_unet, save_pretrained
from .pipeline import DDPMPipeline, ImagePipelineOutput, accelerate
from .sampling import ddim_sample, ddpm_sample
from .schedule import Schedule
from .unet import PRESETS, UNet2DModel, UNetConfig

__version__ = "0.1.0"
__all__ = ["DDPMPipeline", "ImagePipelineOutput", "accelerate", "UNet2DModel", "UNetConfig",
           "PRESETS", "Schedule", "ddpm_sample", "ddim_sample", "load_unet", "save_pretrained",
           "CheckpointError", "build_info"]
