"""A Flax (NHWC) port of diffusers' ``UNet2DConditionModel``: the denoiser of latent diffusion.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", arXiv:2112.10752) runs the diffusion process in the latent space of an autoencoder and
conditions the U-Net on text through cross-attention: every attention layer of the U-Net is a
small transformer over the ``H*W`` positions whose second attention takes its keys and values
from the text encoder's hidden states (``context``, ``[B, T, cross_attention_dim]``). This is the
network of Stable Diffusion 1.x and 2.x; :mod:`jaxdiff.text_to_image` loads whole pipelines.

Architecture (``C_i = block_out_channels[i]``)::

    emb = MLP(sinusoid(t, C_0))                       # Dense(4 C_0) -> SiLU -> Dense, float32
    h = conv_in(x); skips = [h]
    down block i: (ResNet(emb) -> [SpatialTransformer(context)]) x layers_per_block, each
                  output pushed; then a stride-2 conv (pushed) unless i is the last block
    mid: ResNet, SpatialTransformer, ResNet
    up block i:   (concat(h, skips.pop()) -> ResNet -> [SpatialTransformer]) x (layers + 1),
                  then nearest x2 + conv unless i is the last block
    out = conv_out(SiLU(GroupNorm(h)))

    SpatialTransformer(h, c) = h + proj_out(blocks(proj_in(GroupNorm(h))))   # eps 1e-6
    block(z, c) = z + attn1(LN(z));  z + attn2(LN(z), c);  z + W2 GEGLU(W1 LN(z))

``GEGLU(u) = a * gelu(b)`` with ``[a, b] = u`` split in halves (exact erf GELU; Shazeer 2020).
``proj_in`` / ``proj_out`` are 1x1 convolutions, or linear layers with ``use_linear_projection``
(SD 2.x); the two compute the same map, stored differently. ``attention_head_dim`` is, as in
diffusers, the *number of heads* of each block (int or one per block); each head has
``C_i / heads`` channels. Attention logits and softmax are always float32 (so
``upcast_attention`` changes nothing here) through :func:`jaxdiff.models.unet.multihead_attention`
(cuDNN flash attention on GPU where it applies, a cache-blocked kernel on CPU).

The parameter tree mirrors the PyTorch module names with ``.N`` written ``_N``, so
:func:`unet_cond_params_from_torch` / :func:`unet_cond_params_to_torch` convert by renaming.

Example:
    >>> import jax, jax.numpy as jnp
    >>> model = UNet2DCondition(block_out_channels=(32, 64), layers_per_block=1,
    ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
    ...     attention_head_dim=2, norm_num_groups=8)
    >>> x, c = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2, 7, 16))
    >>> params = model.init(jax.random.key(0), x, 10, c)["params"]
    >>> model.apply({"params": params}, x, jnp.array([10, 500]), c).shape
    (2, 8, 8, 4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import hf_config
from jaxdiff.models.diffusers_layers import (
    ACTIVATIONS,
    BlockOptions,
    DownBlock,
    GroupNorm,
    TimestepEmbedding,
    UpBlock,
    conv,
    timestep_embedding,
)
from jaxdiff.models.state_dicts import param_shapes, params_from_state_dict, params_to_state_dict
from jaxdiff.models.unet import multihead_attention

__all__ = [
    "SUPPORTED_DOWN_BLOCK_TYPES",
    "SUPPORTED_MID_BLOCK_TYPES",
    "SUPPORTED_UP_BLOCK_TYPES",
    "UNet2DCondition",
    "unet_cond_param_shapes",
    "unet_cond_params_from_torch",
    "unet_cond_params_to_torch",
]

SUPPORTED_DOWN_BLOCK_TYPES: tuple[str, ...] = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_UP_BLOCK_TYPES: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
SUPPORTED_MID_BLOCK_TYPES: tuple[str | None, ...] = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)

# diffusers options this port implements only at their default value: anything else raises.
_DEFAULT_ONLY: dict[str, Any] = {
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "num_attention_heads": None,  # diffusers itself rejects it (heads come from attention_head_dim)
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}
# diffusers options that only reach block types this port does not build (SimpleCrossAttn,
# ResnetDownsample, K-blocks): accepted and ignored.
_UNUSED_KEYS = frozenset(
    {"resnet_skip_time_act", "resnet_out_scale_factor", "mid_block_only_cross_attention",
     "addition_embed_type_num_heads"}
)
LIST_MODULES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
                "transformer_blocks", "to_out", "net")


def _per_block(value: Any, n: int, name: str) -> tuple[Any, ...]:
    if isinstance(value, tuple):
        if len(value) != n:
            raise ValueError(f"{name}={list(value)} must have one entry per block ({n})")
        return value
    return (value,) * n


class _Attention(nn.Module):
    """Multi-head attention of ``x`` [B, N, C] over ``context`` [B, T, Dc] (``x`` itself if None).

    ``to_q`` / ``to_k`` / ``to_v`` without bias, ``to_out_0`` with bias; logits scaled by
    ``head_dim ** -0.5``, computed and normalised in float32.
    """

    heads: int
    head_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        b, n, c = x.shape
        inner = self.heads * self.head_dim

        def dense(features: int, name: str, bias: bool) -> nn.Dense:
            return nn.Dense(features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        q = dense(inner, "to_q", False)(x).reshape(b, n, self.heads, self.head_dim)
        k = dense(inner, "to_k", False)(context).reshape(b, context.shape[1], self.heads, self.head_dim)
        v = dense(inner, "to_v", False)(context).reshape(b, context.shape[1], self.heads, self.head_dim)
        h = multihead_attention(q, k, v, scale=self.head_dim**-0.5).reshape(b, n, inner)
        return dense(c, "to_out_0", True)(h)


class _TransformerBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock``: self-attention, cross-attention, GEGLU MLP, pre-LN."""

    heads: int
    head_dim: int
    only_cross_attention: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype,
                                param_dtype=self.param_dtype, name=name)

        def attention(name: str) -> _Attention:
            return _Attention(self.heads, self.head_dim, self.dtype, self.param_dtype, name=name)

        x = x + attention("attn1")(norm("norm1")(x), context if self.only_cross_attention else None)
        x = x + attention("attn2")(norm("norm2")(x), context)
        return x + _FeedForward(self.dtype, self.param_dtype, name="ff")(norm("norm3")(x))


class _FeedForward(nn.Module):
    """``ff``: ``net_0`` (the GEGLU projection, ``net_0/proj``) then ``net_2`` (back to width)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        inner = 4 * dim
        u = _Proj(2 * inner, self.dtype, self.param_dtype, name="net_0")(x)
        hidden, gate = jnp.split(u, 2, axis=-1)
        h = hidden * nn.gelu(gate, approximate=False)
        return nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class _Proj(nn.Module):
    """A linear layer one level down (``net_0/proj``), as diffusers' ``GEGLU`` module holds it."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)


class _SpatialTransformer(nn.Module):
    """diffusers' ``Transformer2DModel`` on continuous inputs: ``h + proj_out(blocks(proj_in(GN(h))))``."""

    heads: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    only_cross_attention: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        if c % self.heads:
            raise ValueError(f"{c} channels are not divisible by {self.heads} attention heads")
        head_dim = c // self.heads

        def proj(name: str) -> nn.Module:
            if self.use_linear_projection:
                return nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
            return conv(c, 1, name, self.dtype, self.param_dtype)

        h = GroupNorm(self.groups, 1e-6, self.dtype, self.param_dtype, name="norm")(x)
        h = proj("proj_in")(h).reshape(b, hgt * wid, c)  # [B, HW, C]
        for i in range(self.num_layers):
            h = _TransformerBlock(self.heads, head_dim, self.only_cross_attention, self.dtype, self.param_dtype,
                                  name=f"transformer_blocks_{i}")(h, context)
        h = proj("proj_out")(h.reshape(b, hgt, wid, c))
        return h + x


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Opts(BlockOptions):
    """What every ResNet / transformer of the network shares."""

    use_linear_projection: bool

    def transformer(self, heads: int, num_layers: int, only_cross: bool, name: str) -> _SpatialTransformer:
        return _SpatialTransformer(heads, num_layers, self.groups, self.use_linear_projection, only_cross,
                                   self.dtype, self.param_dtype, name=name)


@dataclasses.dataclass(frozen=True)
class _Transformers:
    """The attention layers of ``CrossAttn*`` blocks: a :class:`_SpatialTransformer` of ``depths[j]``
    transformer blocks at position ``j``, reading the text states ``context``."""

    heads: int
    depths: tuple[int, ...]
    only_cross: bool
    opts: _Opts

    def apply_layer(self, index: int, name: str, h: jax.Array, context: jax.Array | None) -> jax.Array:
        return self.opts.transformer(self.heads, self.depths[index], self.only_cross, name)(h, context)


def _layers_of(value: int | tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Transformer depth for each of a block's ``num_layers`` attention layers."""
    if isinstance(value, tuple):
        if len(value) != num_layers:
            raise ValueError(f"transformer_layers_per_block entry {list(value)} needs {num_layers} values")
        return value
    return (value,) * num_layers


class _MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn`` (ResNet, then (transformer, ResNet) per layer) or, without
    attention, ``UNetMidBlock2D`` as ``UNet2DConditionModel`` builds it (one ResNet)."""

    with_attention: bool
    heads: int
    transformer_layers: tuple[int, ...]
    output_scale_factor: float
    opts: _Opts

    @nn.compact
    def __call__(self, h: jax.Array, emb: jax.Array, context: jax.Array) -> jax.Array:
        channels = h.shape[-1]
        h = self.opts.resnet(channels, "resnets_0", self.output_scale_factor)(h, emb)
        if not self.with_attention:
            return h
        for j, depth in enumerate(self.transformer_layers):
            h = self.opts.transformer(self.heads, depth, False, f"attentions_{j}")(h, context)
            h = self.opts.resnet(channels, f"resnets_{j + 1}", self.output_scale_factor)(h, emb)
        return h


class UNet2DCondition(hf_config.ConfigMixin, nn.Module):
    """diffusers' ``UNet2DConditionModel`` (Stable Diffusion's U-Net) in Flax Linen, channels-last.

    Attribute names and defaults are those of ``UNet2DConditionModel``'s ``config.json`` (SD 1.x
    defaults), so :meth:`from_config` / :meth:`to_config` round-trip a diffusers config. ``dtype``
    is the compute dtype (GroupNorm statistics, the time embedding and the attention softmax stay
    float32); ``param_dtype`` the parameters' dtype.

    Call: ``model.apply({"params": params}, x, t, context)`` with ``x`` ``[B, H, W, in_channels]``
    latents, ``t`` a scalar or ``[B]`` timestep (int or float) and ``context`` the text encoder's
    hidden states ``[B, T, cross_attention_dim]`` (a batch of 1 is broadcast); returns the
    ``[B, H, W, out_channels]`` float32 model output (noise or velocity, as the model was
    trained). ``H`` and ``W`` must be multiples of ``2 ** (len(block_out_channels) - 1)``.

    Latent diffusion: Rombach et al. 2022, arXiv:2112.10752.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[Any, ...] = 1
    reverse_transformer_layers_per_block: tuple[Any, ...] | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # jaxdiff options (not part of the diffusers config).
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    config_class_name = "UNet2DConditionModel"

    # ------------------------------------------------------------------ config helpers
    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> UNet2DCondition:
        """Build the module from a diffusers ``UNet2DConditionModel`` ``config.json`` dictionary.

        Options this port does not implement raise ``ValueError`` when set to anything but their
        default (class embeddings, SDXL's added embeddings, dual cross-attention, ...); keys
        ``UNet2DConditionModel`` does not take are ignored with a warning, as diffusers does.

        Example:
            >>> UNet2DCondition.from_config({"attention_head_dim": [5, 10, 20, 20],
            ...                              "use_linear_projection": True}).attention_head_dim
            (5, 10, 20, 20)
        """
        hf_config.check_class_name(config, cls.config_class_name)
        for key, value in config.items():
            if key in _DEFAULT_ONLY and value != _DEFAULT_ONLY[key]:
                raise ValueError(
                    f"UNet2DCondition does not implement {key}={value!r} (only {_DEFAULT_ONLY[key]!r}): "
                    "Stable Diffusion 1.x / 2.x text-to-image U-Nets are supported"
                )
        return hf_config.module_from_config(cls, config, overrides, skip=_UNUSED_KEYS | set(_DEFAULT_ONLY))

    def validate(self) -> None:
        """Raise ``ValueError`` if the configuration uses something this module does not implement."""
        hf_config.check_block_types(self, SUPPORTED_DOWN_BLOCK_TYPES, SUPPORTED_UP_BLOCK_TYPES,
                                    SUPPORTED_MID_BLOCK_TYPES)
        n = len(self.block_out_channels)
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"unsupported act_fn={self.act_fn!r}; UNet2DCondition supports 'silu'")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(f"unsupported resnet_time_scale_shift={self.resnet_time_scale_shift!r}")
        if self.norm_num_groups is None:
            raise ValueError("norm_num_groups=None is not supported")
        for name in ("attention_head_dim", "cross_attention_dim", "layers_per_block", "only_cross_attention",
                     "transformer_layers_per_block"):
            _per_block(getattr(self, name), n, name)

    def _check_inputs(self, x: jax.Array, context: jax.Array) -> None:
        if x.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C] (NHWC), got shape {x.shape}")
        _, h, w, c = x.shape
        if c != self.in_channels:
            raise ValueError(f"x has {c} channels but in_channels={self.in_channels}; pass NHWC latents")
        factor = 2 ** (len(self.block_out_channels) - 1)
        if h % factor or w % factor:
            raise ValueError(f"latent size {h}x{w}: H and W must be multiples of {factor}")
        if context.ndim != 3:
            raise ValueError(f"context must be [B, T, D] text hidden states, got shape {context.shape}")
        widths = set(_per_block(self.cross_attention_dim, len(self.block_out_channels), "cross_attention_dim"))
        if widths != {context.shape[-1]}:
            raise ValueError(f"context has width {context.shape[-1]} but cross_attention_dim={self.cross_attention_dim}")

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding fed to every ResNet block."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    # ------------------------------------------------------------------ network
    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array | int | float, context: jax.Array, *, train: bool = False
                 ) -> jax.Array:
        """The model output for latents ``x`` at timestep ``t`` given text states ``context``.

        Args:
            x: ``[B, H, W, in_channels]`` noisy latents.
            t: scalar or ``[B]`` timesteps.
            context: ``[B, T, D]`` (or ``[1, T, D]``) encoder hidden states.
            train: enables dropout (needs a ``"dropout"`` rng when ``dropout > 0``).

        Returns:
            ``[B, H, W, out_channels]`` float32.
        """
        self.validate()
        self._check_inputs(x, context)
        batch = x.shape[0]
        n = len(self.block_out_channels)
        chans = self.block_out_channels
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        context = jnp.broadcast_to(context, (batch, *context.shape[1:])).astype(self.dtype)
        heads = _per_block(self.attention_head_dim, n, "attention_head_dim")
        layers = _per_block(self.layers_per_block, n, "layers_per_block")
        only_cross = _per_block(self.only_cross_attention, n, "only_cross_attention")
        depth = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        up_depth = (tuple(reversed(depth)) if self.reverse_transformer_layers_per_block is None
                    else _per_block(self.reverse_transformer_layers_per_block, n, "reverse_transformer_layers_per_block"))
        opts = _Opts(groups=self.norm_num_groups, eps=self.norm_eps, act=self.act_fn,
                     time_scale_shift=self.resnet_time_scale_shift, dropout=self.dropout, deterministic=not train,
                     use_linear_projection=self.use_linear_projection, dtype=self.dtype,
                     param_dtype=self.param_dtype)

        if self.center_input_sample:
            x = 2.0 * x - 1.0
        # The time embedding is tiny: float32 whatever ``dtype`` is (timesteps never rounded).
        t_emb = timestep_embedding(t, chans[0], flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
        emb = TimestepEmbedding(self.time_embed_dim, jnp.float32, self.param_dtype, name="time_embedding")(t_emb)

        h = conv(chans[0], self.conv_in_kernel, "conv_in", self.dtype, self.param_dtype)(x.astype(self.dtype))
        skips = [h]
        for i, block_type in enumerate(self.down_block_types):
            attention = (_Transformers(heads[i], _layers_of(depth[i], layers[i]), only_cross[i], opts)
                         if hf_config.strip_unetres(block_type) == "CrossAttnDownBlock2D" else None)
            h, block_skips = DownBlock(
                chans[i], layers[i], add_downsample=i < n - 1, downsample_padding=self.downsample_padding,
                opts=opts, attention=attention, name=f"down_blocks_{i}",
            )(h, emb, context)
            skips.extend(block_skips)

        if self.mid_block_type is not None:
            h = _MidBlock(self.mid_block_type == "UNetMidBlock2DCrossAttn", heads[-1], _layers_of(depth[-1], 1),
                          self.mid_block_scale_factor, opts, name="mid_block")(h, emb, context)

        rev = tuple(reversed(chans))
        rev_heads, rev_layers, rev_only_cross = (tuple(reversed(v)) for v in (heads, layers, only_cross))
        for i, block_type in enumerate(self.up_block_types):
            n_skip = rev_layers[i] + 1
            block_skips, skips = skips[-n_skip:], skips[:-n_skip]
            attention = (_Transformers(rev_heads[i], _layers_of(up_depth[i], n_skip), rev_only_cross[i], opts)
                         if hf_config.strip_unetres(block_type) == "CrossAttnUpBlock2D" else None)
            h = UpBlock(
                rev[i], n_skip, add_upsample=i < n - 1, opts=opts, attention=attention, name=f"up_blocks_{i}",
            )(h, tuple(block_skips), emb, context)

        h = GroupNorm(self.norm_num_groups, self.norm_eps, self.dtype, self.param_dtype, name="conv_norm_out")(h)
        h = conv(self.out_channels, self.conv_out_kernel, "conv_out", self.dtype, self.param_dtype)(
            ACTIVATIONS[self.act_fn](h))
        return h.astype(jnp.float32)


def unet_cond_param_shapes(config: Mapping[str, Any] | UNet2DCondition) -> dict[str, Any]:
    """The parameter tree of a config as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    model = hf_config.as_module(UNet2DCondition, config)
    size = 2 ** (len(model.block_out_channels) - 1)
    cross = _per_block(model.cross_attention_dim, len(model.block_out_channels), "cross_attention_dim")
    if len(set(cross)) != 1:
        raise ValueError(f"per-block cross_attention_dim {list(cross)} is not supported (one text width)")
    x = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    c = jax.ShapeDtypeStruct((1, 1, cross[0]), jnp.float32)
    return param_shapes(model, x, t, c)


def unet_cond_params_from_torch(
    state_dict: Mapping[str, Any],
    config: Mapping[str, Any] | UNet2DCondition,
    *,
    strict: bool = True,
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Flax params from a diffusers ``UNet2DConditionModel`` state dict (numpy or torch arrays).

    Raises ``KeyError`` for missing (or, with ``strict``, unexpected) keys and ``ValueError`` for
    shape mismatches, naming them.

    Example:
        >>> params = unet_cond_params_from_torch(torch_unet.state_dict(), torch_unet.config)  # doctest: +SKIP
    """
    return params_from_state_dict(state_dict, unet_cond_param_shapes(config), list_modules=LIST_MODULES,
                                  strict=strict, dtype=dtype, what="UNet2DConditionModel")


def unet_cond_params_to_torch(
    params: Mapping[str, Any], config: Mapping[str, Any] | UNet2DCondition, *, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """The diffusers ``UNet2DConditionModel`` state dict (numpy arrays) of Flax params.

    Example:
        >>> sd = unet_cond_params_to_torch(params, model)                                   # doctest: +SKIP
        >>> torch_unet.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})   # doctest: +SKIP
    """
    return params_to_state_dict(params, unet_cond_param_shapes(config), list_modules=LIST_MODULES, dtype=dtype,
                                what="UNet2DConditionModel")
