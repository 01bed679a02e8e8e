"""Denoising networks.

``UNet`` is the book's U-Net (Learn Generative AI with PyTorch, ch. 15); the PyTorch weight
converters load and export its state dict with plain numpy. ``DiffusersUNet2D``,
``UNet2DCondition`` and ``AutoencoderKL`` are ports of diffusers' ``UNet2DModel``,
``UNet2DConditionModel`` and ``AutoencoderKL`` (Stable Diffusion's U-Net and VAE).
"""

from jaxdiff.models.torch_weights import (
    unet_config_from_torch,
    unet_params_from_torch,
    unet_params_to_torch,
    unet_torch_shapes,
)
from jaxdiff.models.unet import (
    AttentionBlock,
    ResidualBlock,
    UNet,
    group_norm_silu,
    heads_major_attention,
    multihead_attention,
    sinusoidal_embedding,
)

__all__ = [
    "AttentionBlock",
    "AutoencoderKL",
    "DiffusersUNet2D",
    "ResidualBlock",
    "UNet",
    "UNet2DCondition",
    "group_norm_silu",
    "heads_major_attention",
    "multihead_attention",
    "sinusoidal_embedding",
    "unet_cond_params_from_torch",
    "unet_cond_params_to_torch",
    "unet_config_from_torch",
    "unet_params_from_torch",
    "unet_params_to_torch",
    "unet_torch_shapes",
    "vae_params_from_torch",
    "vae_params_to_torch",
]
from jaxdiff.models.diffusers_unet import DiffusersUNet2D  # noqa: E402
from jaxdiff.models.unet_cond import (  # noqa: E402
    UNet2DCondition,
    unet_cond_params_from_torch,
    unet_cond_params_to_torch,
)
from jaxdiff.models.vae import AutoencoderKL, vae_params_from_torch, vae_params_to_torch  # noqa: E402
