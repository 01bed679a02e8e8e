"""Flax (NHWC) layers shared by jaxdiff's ports of diffusers' networks.

:class:`~jaxdiff.models.DiffusersUNet2D` (``UNet2DModel``), :class:`~jaxdiff.models.UNet2DCondition`
(``UNet2DConditionModel``) and :class:`~jaxdiff.models.AutoencoderKL` are built from the same
diffusers pieces, written once here with diffusers' parameter names (``.N`` written ``_N``):

* :class:`ResnetBlock` (``ResnetBlock2D``): ``shortcut(x) + conv2(act(GN(conv1(act(GN(x))) + temb)))``;
  without a time embedding (the VAE's) the ``+ temb`` and its ``time_emb_proj`` drop out;
* :class:`SpatialAttention`: the residual self-attention over the ``H*W`` positions of the
  ``Attn*`` blocks and the mid blocks;
* :class:`Downsample` / :class:`Upsample`, :class:`TimestepEmbedding`, :func:`timestep_embedding`;
* the blocks :class:`DownBlock` (``DownBlock2D``, ``AttnDownBlock2D``, ``CrossAttnDownBlock2D``,
  ``DownEncoderBlock2D``), :class:`UpBlock` (``UpBlock2D``, ``AttnUpBlock2D``,
  ``CrossAttnUpBlock2D``, ``UpDecoderBlock2D``) and :class:`MidBlock` (``UNetMidBlock2D``): the
  attention layer of a block is whatever its :class:`AttentionLayers` builds (self-attention
  here, the text-conditioned transformers of :mod:`jaxdiff.models.unet_cond`).

GroupNorm statistics and attention logits / softmax are float32 whatever the compute ``dtype``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.unet import multihead_attention

__all__ = [
    "ACTIVATIONS",
    "AttentionLayers",
    "BlockOptions",
    "DownBlock",
    "Downsample",
    "GroupNorm",
    "MidBlock",
    "ResnetBlock",
    "SelfAttentionLayers",
    "SpatialAttention",
    "TimestepEmbedding",
    "UpBlock",
    "Upsample",
    "conv",
    "timestep_embedding",
]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
}
"""diffusers' ``act_fn`` names."""


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    max_period: float = 10_000.0,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM / diffusers.

    Frequency ``k`` is ``max_period ** (-k / (dim // 2 - freq_shift))``; the output is
    ``[sin, cos]`` (``[cos, sin]`` when ``flip_sin_to_cos``), zero-padded when ``dim`` is odd.

    Args:
        timesteps: ``[B]`` timesteps.
        dim: embedding width.
        flip_sin_to_cos: put the cosines first.
        freq_shift: the ``downscale_freq_shift`` of diffusers.
        max_period: the longest period.

    Returns:
        ``[B, dim]`` float32 embedding.

    Example:
        >>> timestep_embedding(jnp.array([0.0, 1.0]), 4, flip_sin_to_cos=True).shape
        (2, 4)
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def conv(features: int, kernel: int, name: str, dtype: Any, param_dtype: Any, stride: int = 1,
         padding: Any = None) -> nn.Conv:
    """A square ``kernel`` convolution, padded ``kernel // 2`` on each side unless ``padding`` says."""
    pad = kernel // 2 if padding is None else padding
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype,
                   param_dtype=param_dtype, name=name)


class GroupNorm(nn.Module):
    """GroupNorm over the channel axis (NHWC), computed in float32 and cast to ``dtype``.

    Parameters ``scale`` / ``bias`` (torch ``weight`` / ``bias``).
    """

    groups: int
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by {self.groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        xf = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, c // self.groups)
        axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
        mean = jnp.mean(xf, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
        xf = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (xf * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class TimestepEmbedding(nn.Module):
    """Two linear layers with a SiLU between them (``linear_1`` / ``linear_2``)."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
        x = nn.silu(x)
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(x)


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D``: GroupNorm-act-conv twice, the time embedding between, 1x1 shortcut.

    ``temb`` is added before the second GroupNorm (``"default"``) or applied after it as
    ``(1 + scale, shift)`` (``"scale_shift"``); called without ``temb`` (the VAE's ResNets, which
    diffusers builds with ``temb_channels=None``) there is no ``time_emb_proj``.
    """

    out_channels: int
    groups: int
    eps: float
    act: str = "silu"
    time_scale_shift: str = "default"
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        act = ACTIVATIONS[self.act]

        def norm(name: str) -> GroupNorm:
            return GroupNorm(self.groups, self.eps, self.dtype, self.param_dtype, name=name)

        h = conv(self.out_channels, 3, "conv1", self.dtype, self.param_dtype)(act(norm("norm1")(x)))
        scale_shift = self.time_scale_shift == "scale_shift"
        if temb is None:
            if scale_shift:
                raise ValueError("time_scale_shift='scale_shift' needs a time embedding")
            h = norm("norm2")(h)
        else:
            width = 2 * self.out_channels if scale_shift else self.out_channels
            temb = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="time_emb_proj")(act(temb))
            temb = temb[:, None, None, :]
            if scale_shift:
                scale, shift = jnp.split(temb, 2, axis=-1)
                h = norm("norm2")(h) * (1.0 + scale) + shift
            else:
                h = norm("norm2")(h + temb)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(act(h))
        h = conv(self.out_channels, 3, "conv2", self.dtype, self.param_dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", self.dtype, self.param_dtype)(x)
        return (x + h) / self.output_scale_factor


class SpatialAttention(nn.Module):
    """Residual multi-head self-attention over the H*W positions (diffusers' legacy attention block)."""

    head_dim: int
    norm_groups: int | None
    eps: float
    rescale_output_factor: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        heads = c // self.head_dim
        if heads < 1:
            raise ValueError(f"attention_head_dim={self.head_dim} exceeds the {c} channels of the attention block")
        h = x
        if self.norm_groups is not None:
            h = GroupNorm(self.norm_groups, self.eps, self.dtype, self.param_dtype, name="group_norm")(h)
        h = h.reshape(b, hgt * wid, c)
        dense = lambda feats, name: nn.Dense(  # noqa: E731
            feats, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        inner = heads * self.head_dim
        q, k, v = (
            dense(inner, n)(h).reshape(b, hgt * wid, heads, self.head_dim) for n in ("to_q", "to_k", "to_v")
        )
        # Logits and softmax are float32 even for bf16 inputs (diffusers' upcast_softmax=True);
        # the implementation is chosen by backend, as for jaxdiff's own UNet.
        h = multihead_attention(q, k, v, scale=self.head_dim**-0.5).reshape(b, hgt * wid, inner)
        h = dense(c, "to_out_0")(h).reshape(b, hgt, wid, c)
        return (h + x) / self.rescale_output_factor


class Downsample(nn.Module):
    """Stride-2 3x3 convolution; ``padding=0`` pads only bottom/right by one, as diffusers does."""

    channels: int
    padding: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding,) * 2,) * 2
        return conv(self.channels, 3, "conv", self.dtype, self.param_dtype, stride=2, padding=pad)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.channels, 3, "conv", self.dtype, self.param_dtype)(x)


_RematResnetBlock = nn.remat(ResnetBlock)
_RematSpatialAttention = nn.remat(SpatialAttention)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockOptions:
    """Options shared by every ResNet / attention layer of a network.

    ``remat`` rematerialises each layer in the backward pass (activation memory for compute).
    """

    groups: int
    eps: float
    act: str = "silu"
    time_scale_shift: str = "default"
    dropout: float = 0.0
    deterministic: bool = True
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def resnet(self, out_channels: int, name: str, output_scale_factor: float = 1.0) -> nn.Module:
        """A :class:`ResnetBlock` with these options."""
        cls = _RematResnetBlock if self.remat else ResnetBlock
        return cls(out_channels, self.groups, self.eps, act=self.act, time_scale_shift=self.time_scale_shift,
                   output_scale_factor=output_scale_factor, dropout=self.dropout,
                   deterministic=self.deterministic, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def attention(self, head_dim: int, norm_groups: int | None, name: str,
                  rescale_output_factor: float = 1.0) -> nn.Module:
        """A :class:`SpatialAttention` with these options."""
        cls = _RematSpatialAttention if self.remat else SpatialAttention
        return cls(head_dim, norm_groups, self.eps, rescale_output_factor=rescale_output_factor,
                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class AttentionLayers(Protocol):
    """Builds and runs the attention layer ``index`` (``attentions_<index>``) of a block."""

    def apply_layer(self, index: int, name: str, h: jax.Array, context: jax.Array | None) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class SelfAttentionLayers:
    """The attention layers of ``AttnDownBlock2D`` / ``AttnUpBlock2D``: :class:`SpatialAttention`."""

    head_dim: int
    opts: BlockOptions

    def apply_layer(self, index: int, name: str, h: jax.Array, context: jax.Array | None) -> jax.Array:
        del index, context  # one self-attention layer, the same at every position of the block
        return self.opts.attention(self.head_dim, self.opts.groups, name)(h)


class DownBlock(nn.Module):
    """A down block: ``num_layers`` ResNets (each followed by an attention layer when ``attention``
    is given), then a stride-2 convolution (``add_downsample``).

    Returns the output and the skips the up path concatenates (every layer's output, then the
    downsampled one). ``DownBlock2D``, ``AttnDownBlock2D``, ``CrossAttnDownBlock2D`` and, called
    without ``emb``, the VAE encoder's ``DownEncoderBlock2D``.
    """

    out_channels: int
    num_layers: int
    add_downsample: bool
    downsample_padding: int
    opts: BlockOptions
    attention: AttentionLayers | None = None

    @nn.compact
    def __call__(self, h: jax.Array, emb: jax.Array | None = None, context: jax.Array | None = None
                 ) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for j in range(self.num_layers):
            h = self.opts.resnet(self.out_channels, f"resnets_{j}")(h, emb)
            if self.attention is not None:
                h = self.attention.apply_layer(j, f"attentions_{j}", h, context)
            skips.append(h)
        if self.add_downsample:
            h = Downsample(self.out_channels, self.downsample_padding, self.opts.dtype, self.opts.param_dtype,
                           name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    """An up block: ``num_layers`` times (concatenate the last unused skip, ResNet, attention layer
    when ``attention`` is given), then nearest x2 upsampling and a convolution (``add_upsample``).

    ``UpBlock2D``, ``AttnUpBlock2D``, ``CrossAttnUpBlock2D`` and, called without ``skips`` and
    ``emb``, the VAE decoder's ``UpDecoderBlock2D``.
    """

    out_channels: int
    num_layers: int
    add_upsample: bool
    opts: BlockOptions
    attention: AttentionLayers | None = None

    @nn.compact
    def __call__(self, h: jax.Array, skips: Sequence[jax.Array] | None = None, emb: jax.Array | None = None,
                 context: jax.Array | None = None) -> jax.Array:
        if skips is not None and len(skips) != self.num_layers:
            raise ValueError(f"an up block of {self.num_layers} layers takes {self.num_layers} skips, got {len(skips)}")
        for j in range(self.num_layers):
            if skips is not None:
                h = jnp.concatenate([h, skips[-1 - j].astype(h.dtype)], axis=-1)
            h = self.opts.resnet(self.out_channels, f"resnets_{j}")(h, emb)
            if self.attention is not None:
                h = self.attention.apply_layer(j, f"attentions_{j}", h, context)
        if self.add_upsample:
            h = Upsample(self.out_channels, self.opts.dtype, self.opts.param_dtype, name="upsamplers_0")(h)
        return h


class MidBlock(nn.Module):
    """``UNetMidBlock2D``: ResNet, (self-attention, ResNet); ``emb`` None for the VAE's."""

    head_dim: int
    add_attention: bool
    output_scale_factor: float
    attn_groups: int | None
    opts: BlockOptions

    @nn.compact
    def __call__(self, h: jax.Array, emb: jax.Array | None = None) -> jax.Array:
        channels = h.shape[-1]
        h = self.opts.resnet(channels, "resnets_0", self.output_scale_factor)(h, emb)
        if self.add_attention:
            h = self.opts.attention(self.head_dim, self.attn_groups, "attentions_0", self.output_scale_factor)(h)
        return self.opts.resnet(channels, "resnets_1", self.output_scale_factor)(h, emb)
