"""A Flax (NHWC) port of diffusers' ``AutoencoderKL``: the image <-> latent map of latent diffusion.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", arXiv:2112.10752) trains a KL-regularised autoencoder once, then runs diffusion on its
latents, ``2 ** (len(block_out_channels) - 1)`` times smaller per side (8 for Stable Diffusion):

    encode: x [B, H, W, 3] in [-1, 1] -> Encoder -> quant_conv -> (mean, logvar) [B, h, w, 2 L]
    decode: z [B, h, w, L] -> post_quant_conv -> Decoder -> image [B, H, W, 3] (about [-1, 1])

The diffusion model sees ``scaling_factor * z`` (0.18215 for SD 1.x / 2.x), so sampling ends
with ``decode(latents / scaling_factor)``, as diffusers' pipelines do.

Encoder: conv_in, per level ``layers_per_block`` ResNets and a stride-2 convolution (padded
bottom/right), a mid block (ResNet, single-head self-attention over all pixels, ResNet), then
GroupNorm-SiLU-conv_out. The decoder mirrors it with ``layers_per_block + 1`` ResNets per level
and nearest x2 upsampling. GroupNorm eps is 1e-6 everywhere, statistics in float32; the
attention softmax is float32.

Parameter names mirror the PyTorch module names with ``.N`` written ``_N``; the pre-2023 names of
the mid-block attention (``query``, ``key``, ``value``, ``proj_attn``) load too.

Example:
    >>> import jax, jax.numpy as jnp
    >>> vae = AutoencoderKL(block_out_channels=(16, 32), norm_num_groups=8,
    ...                     down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    >>> x = jnp.zeros((1, 16, 16, 3))
    >>> params = vae.init(jax.random.key(0), x)["params"]
    >>> vae.apply({"params": params}, x, method="encode").shape
    (1, 8, 8, 4)
    >>> vae.apply({"params": params}, jnp.zeros((1, 8, 8, 4)), method="decode").shape
    (1, 16, 16, 3)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import hf_config
from jaxdiff.models.diffusers_layers import ACTIVATIONS, BlockOptions, DownBlock, GroupNorm, MidBlock, UpBlock, conv
from jaxdiff.models.state_dicts import (
    param_shapes,
    params_from_state_dict,
    params_to_state_dict,
    rename_legacy_attention,
)

__all__ = [
    "AutoencoderKL",
    "rename_legacy_vae_attention",
    "vae_param_shapes",
    "vae_params_from_torch",
    "vae_params_to_torch",
]

_EPS = 1e-6  # diffusers' Encoder / Decoder hard-code it
LIST_MODULES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out")


class _Tower(nn.Module):
    """What the encoder and the decoder share: their levels' widths and depth, the mid block, the head."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    add_attention: bool
    opts: BlockOptions

    def _mid_block(self, h: jax.Array) -> jax.Array:
        """``UNetMidBlock2D`` without time embedding: ResNet, single-head attention, ResNet."""
        return MidBlock(self.block_out_channels[-1], self.add_attention, 1.0, self.opts.groups, self.opts,
                        name="mid_block")(h)

    def _head(self, h: jax.Array) -> jax.Array:
        """GroupNorm, activation, ``conv_out``."""
        opts = self.opts
        h = GroupNorm(opts.groups, opts.eps, opts.dtype, opts.param_dtype, name="conv_norm_out")(h)
        return conv(self.out_channels, 3, "conv_out", opts.dtype, opts.param_dtype)(ACTIVATIONS[opts.act](h))


class _Encoder(_Tower):
    """conv_in, per level ``DownEncoderBlock2D`` (ResNets, bottom/right-padded stride-2 conv), mid, head."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chans, opts = self.block_out_channels, self.opts
        h = conv(chans[0], 3, "conv_in", opts.dtype, opts.param_dtype)(x.astype(opts.dtype))
        for i, c in enumerate(chans):
            h, _ = DownBlock(c, self.layers_per_block, add_downsample=i < len(chans) - 1, downsample_padding=0,
                             opts=opts, name=f"down_blocks_{i}")(h)
        return self._head(self._mid_block(h))


class _Decoder(_Tower):
    """conv_in, mid, per level ``UpDecoderBlock2D`` (ResNets, nearest x2 and a conv), head."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        rev, opts = tuple(reversed(self.block_out_channels)), self.opts
        h = conv(rev[0], 3, "conv_in", opts.dtype, opts.param_dtype)(z.astype(opts.dtype))
        h = self._mid_block(h)
        for i, c in enumerate(rev):
            h = UpBlock(c, self.layers_per_block + 1, add_upsample=i < len(rev) - 1, opts=opts,
                        name=f"up_blocks_{i}")(h)
        return self._head(h)


class AutoencoderKL(hf_config.ConfigMixin, nn.Module):
    """diffusers' ``AutoencoderKL`` (Stable Diffusion's VAE) in Flax Linen, channels-last.

    Attribute names and defaults are those of ``AutoencoderKL``'s ``config.json``. Methods, for
    ``vae.apply({"params": params}, ..., method=...)``:

    * ``"encode"``: images ``[B, H, W, in_channels]`` in [-1, 1] -> the mean of the latent
      distribution ``[B, H/f, W/f, latent_channels]`` (unscaled: multiply by ``scaling_factor``
      for the diffusion model), ``f = 2 ** (len(block_out_channels) - 1)``;
    * ``"encode_moments"``: ``(mean, logvar)``, ``logvar`` clipped to [-30, 20] as diffusers does
      (sample with ``mean + exp(logvar / 2) * noise``);
    * ``"decode"``: unscaled latents ``z`` -> images ``[B, H, W, out_channels]`` (float32);
    * ``__call__``: ``decode(encode(x))``.

    ``dtype`` is the compute dtype: GroupNorm statistics and the attention softmax stay float32.
    Latent diffusion: Rombach et al. 2022, arXiv:2112.10752.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # jaxdiff options (not part of the diffusers config).
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    config_class_name = "AutoencoderKL"

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> AutoencoderKL:
        """Build the module from a diffusers ``AutoencoderKL`` ``config.json`` dictionary.

        Example:
            >>> AutoencoderKL.from_config({"block_out_channels": [128, 256, 512, 512],
            ...     "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}).downscale
            8
        """
        return hf_config.module_from_config(cls, config, overrides)

    def validate(self) -> None:
        """Raise ``ValueError`` for configurations this port does not implement."""
        n = len(self.block_out_channels)
        if tuple(self.down_block_types) != ("DownEncoderBlock2D",) * n:
            raise ValueError(f"down_block_types {self.down_block_types}: only DownEncoderBlock2D, one per level")
        if tuple(self.up_block_types) != ("UpDecoderBlock2D",) * n:
            raise ValueError(f"up_block_types {self.up_block_types}: only UpDecoderBlock2D, one per level")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"unsupported act_fn={self.act_fn!r}; supported: {tuple(ACTIVATIONS)}")

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self) -> None:
        opts = BlockOptions(groups=self.norm_num_groups, eps=_EPS, act=self.act_fn, dtype=self.dtype,
                            param_dtype=self.param_dtype)
        common = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                      add_attention=self.mid_block_add_attention, opts=opts)
        self.encoder = _Encoder(out_channels=2 * self.latent_channels, **common)
        self.decoder = _Decoder(out_channels=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, 1, "quant_conv", self.dtype, self.param_dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, 1, "post_quant_conv", self.dtype, self.param_dtype)

    def encode_moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(mean, logvar)`` of the latent distribution of images ``x``, float32."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must be NHWC with {self.in_channels} channels, got shape {x.shape}")
        if x.shape[1] % self.downscale or x.shape[2] % self.downscale:
            raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not a multiple of {self.downscale}")
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, x: jax.Array) -> jax.Array:
        """The mean of the latent distribution of images ``x`` (unscaled), float32."""
        return self.encode_moments(x)[0]

    def decode(self, z: jax.Array) -> jax.Array:
        """Images ``[B, H, W, out_channels]`` (float32, about [-1, 1]) of unscaled latents ``z``."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"z must be NHWC with {self.latent_channels} channels, got shape {z.shape}")
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


def rename_legacy_vae_attention(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename the pre-2023 attention keys (``query``/``key``/``value``/``proj_attn``) to today's."""
    return rename_legacy_attention(state_dict)


def vae_param_shapes(config: Mapping[str, Any] | AutoencoderKL) -> dict[str, Any]:
    """The parameter tree of a config as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    model = hf_config.as_module(AutoencoderKL, config)
    return param_shapes(model, jax.ShapeDtypeStruct((1, model.downscale, model.downscale, model.in_channels),
                                                    jnp.float32))


def vae_params_from_torch(
    state_dict: Mapping[str, Any],
    config: Mapping[str, Any] | AutoencoderKL,
    *,
    strict: bool = True,
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Flax params from a diffusers ``AutoencoderKL`` state dict (old attention names accepted).

    Example:
        >>> params = vae_params_from_torch(torch_vae.state_dict(), torch_vae.config)  # doctest: +SKIP
    """
    return params_from_state_dict(rename_legacy_vae_attention(state_dict), vae_param_shapes(config),
                                  list_modules=LIST_MODULES, strict=strict, dtype=dtype, what="AutoencoderKL")


def vae_params_to_torch(
    params: Mapping[str, Any], config: Mapping[str, Any] | AutoencoderKL, *, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """The diffusers ``AutoencoderKL`` state dict (numpy arrays, today's names) of Flax params."""
    return params_to_state_dict(params, vae_param_shapes(config), list_modules=LIST_MODULES, dtype=dtype,
                                what="AutoencoderKL")
