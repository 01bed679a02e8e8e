"""Denoising networks.

``UNet`` is the book's U-Net (Learn Generative AI with PyTorch, ch. 15); the PyTorch weight
converters load and export its state dict with plain numpy.
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
    "DiffusersUNet2D",
    "ResidualBlock",
    "UNet",
    "group_norm_silu",
    "heads_major_attention",
    "multihead_attention",
    "sinusoidal_embedding",
    "unet_config_from_torch",
    "unet_params_from_torch",
    "unet_params_to_torch",
    "unet_torch_shapes",
]
from jaxdiff.models.diffusers_unet import DiffusersUNet2D  # noqa: E402
