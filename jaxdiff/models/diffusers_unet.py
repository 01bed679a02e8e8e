"""A Flax (NHWC) re-implementation of diffusers' ``UNet2DModel``.

diffusers removed its Flax code and never had a JAX ``UNet2DModel``; this module provides one so
that pretrained DDPM checkpoints such as ``google/ddpm-cat-256`` (and models trained with the
diffusers tutorials) run in JAX with the exact same maths. Weights are converted by
:mod:`jaxdiff.pretrained`, which also reads and writes the diffusers folder layout.

The parameter tree mirrors the PyTorch module names, with ``.N`` list indices written as ``_N``
(``down_blocks.0.resnets.1.conv1.weight`` lives at
``params["down_blocks_0"]["resnets_1"]["conv1"]["kernel"]``), so the conversion is mechanical.

Supported building blocks: ``DownBlock2D``, ``AttnDownBlock2D``, ``UpBlock2D``, ``AttnUpBlock2D``
and the ``UNetMidBlock2D`` (with or without attention); positional, Gaussian-Fourier and learned
time embeddings; the ``default`` and ``scale_shift`` ResNet time conditioning; optional class
embeddings (``num_class_embeds``, ``class_embed_type`` ``"timestep"`` / ``"identity"``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> model = DiffusersUNet2D.from_config({
    ...     "in_channels": 1, "out_channels": 1, "block_out_channels": (32, 64, 64),
    ...     "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    ...     "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")})
    >>> x = jnp.zeros((2, 28, 28, 1))
    >>> params = model.init(jax.random.key(0), x, jnp.array([10, 500]))["params"]
    >>> model.apply({"params": params}, x, jnp.array([10, 500])).shape
    (2, 28, 28, 1)
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.unet import multihead_attention

__all__ = [
    "DiffusersUNet2D",
    "SUPPORTED_DOWN_BLOCK_TYPES",
    "SUPPORTED_MID_BLOCK_TYPES",
    "SUPPORTED_UP_BLOCK_TYPES",
    "timestep_embedding",
]

SUPPORTED_DOWN_BLOCK_TYPES: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D")
SUPPORTED_UP_BLOCK_TYPES: tuple[str, ...] = ("UpBlock2D", "AttnUpBlock2D")
SUPPORTED_MID_BLOCK_TYPES: tuple[str | None, ...] = ("UNetMidBlock2D", None)

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
}

# Config keys that only matter to diffusers' bookkeeping, never to the network.
_IGNORED_CONFIG_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})


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


def _conv(features: int, kernel: int, name: str, dtype: Any, param_dtype: Any, stride: int = 1,
          padding: Any = None) -> nn.Conv:
    pad = kernel // 2 if padding is None else padding
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype,
                   param_dtype=param_dtype, name=name)


class _GroupNorm(nn.Module):
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


class _TimestepEmbedding(nn.Module):
    """Two linear layers with a SiLU between them (``linear_1`` / ``linear_2``)."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
        x = nn.silu(x)
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(x)


class _FourierProjection(nn.Module):
    """Gaussian Fourier features of ``log(t)``; the frequencies ``weight`` are frozen."""

    features: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        w = self.param("weight", nn.initializers.normal(self.scale), (self.features,), jnp.float32)
        w = jax.lax.stop_gradient(w)  # requires_grad=False in diffusers
        proj = jnp.log(t.astype(jnp.float32))[:, None] * w[None, :] * (2.0 * math.pi)
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class _ResnetBlock(nn.Module):
    """GroupNorm-act-conv twice, time embedding added (or scale/shift) between, 1x1 shortcut."""

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
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.act]
        def norm(name: str) -> _GroupNorm:
            return _GroupNorm(self.groups, self.eps, self.dtype, self.param_dtype, name=name)

        h = _conv(self.out_channels, 3, "conv1", self.dtype, self.param_dtype)(act(norm("norm1")(x)))
        width = 2 * self.out_channels if self.time_scale_shift == "scale_shift" else self.out_channels
        temb = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="time_emb_proj")(act(temb))
        temb = temb[:, None, None, :]
        if self.time_scale_shift == "scale_shift":
            scale, shift = jnp.split(temb, 2, axis=-1)
            h = norm("norm2")(h) * (1.0 + scale) + shift
        else:
            h = norm("norm2")(h + temb)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(act(h))
        h = _conv(self.out_channels, 3, "conv2", self.dtype, self.param_dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype, self.param_dtype)(x)
        return (x + h) / self.output_scale_factor


class _SpatialAttention(nn.Module):
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
            h = _GroupNorm(self.norm_groups, self.eps, self.dtype, self.param_dtype, name="group_norm")(h)
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


class _Downsample(nn.Module):
    """Stride-2 3x3 convolution; ``padding=0`` pads only bottom/right by one, as diffusers does."""

    channels: int
    padding: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding,) * 2,) * 2
        return _conv(self.channels, 3, "conv", self.dtype, self.param_dtype, stride=2, padding=pad)(x)


class _Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, "conv", self.dtype, self.param_dtype)(x)


_RematResnetBlock = nn.remat(_ResnetBlock)
_RematSpatialAttention = nn.remat(_SpatialAttention)


@dataclasses.dataclass(frozen=True)
class _BlockOptions:
    """Options shared by every ResNet / attention layer of the network."""

    groups: int
    eps: float
    act: str
    time_scale_shift: str
    dropout: float
    deterministic: bool
    remat: bool
    dtype: Any
    param_dtype: Any

    def resnet(self, out_channels: int, name: str, output_scale_factor: float = 1.0) -> nn.Module:
        cls = _RematResnetBlock if self.remat else _ResnetBlock
        return cls(out_channels, self.groups, self.eps, act=self.act, time_scale_shift=self.time_scale_shift,
                   output_scale_factor=output_scale_factor, dropout=self.dropout,
                   deterministic=self.deterministic, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def attention(self, head_dim: int, norm_groups: int | None, name: str,
                  rescale_output_factor: float = 1.0) -> nn.Module:
        cls = _RematSpatialAttention if self.remat else _SpatialAttention
        return cls(head_dim, norm_groups, self.eps, rescale_output_factor=rescale_output_factor,
                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class DiffusersUNet2D(nn.Module):
    """diffusers' ``UNet2DModel`` in Flax Linen, channels-last.

    The attribute names and defaults are those of ``UNet2DModel``'s ``config.json``, so
    :meth:`from_config` / :meth:`to_config` round-trip a diffusers config. ``dtype`` is the compute
    dtype (parameters stay ``param_dtype``, float32 by default); ``remat`` rematerialises every ResNet
    and attention layer in the backward pass to save activation memory.

    Call signature: ``model.apply({"params": params}, x, t, class_labels=None, train=False)`` with
    ``x`` ``[B, H, W, in_channels]`` and ``t`` a scalar or ``[B]`` (integer or float) timestep; the
    result is the ``[B, H, W, out_channels]`` float32 model output (noise prediction for DDPM
    checkpoints). ``H`` and ``W`` must be divisible by ``2 ** (len(block_out_channels) - 1)``.
    With ``train=True`` and ``dropout > 0`` pass ``rngs={"dropout": key}``.

    Example:
        >>> model = DiffusersUNet2D(in_channels=1, out_channels=1, block_out_channels=(32, 32),
        ...                         down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        ...                         up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
        >>> x = jnp.ones((1, 8, 8, 1))
        >>> params = model.init(jax.random.key(0), x, 3)["params"]
        >>> model.apply({"params": params}, x, 3).shape
        (1, 8, 8, 1)
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None
    # jaxdiff options (not part of the diffusers config).
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    # ------------------------------------------------------------------ config helpers
    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        """The attribute names that belong to the diffusers ``config.json``."""
        local = {"dtype", "param_dtype", "remat", "parent", "name"}
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in local)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> DiffusersUNet2D:
        """Build the module from a diffusers ``UNet2DModel`` ``config.json`` dictionary.

        Bookkeeping keys (``_class_name``, ``_diffusers_version``, ...) are ignored; keys that
        ``UNet2DModel`` does not take are ignored with a warning (as diffusers does); unsupported
        block types and options raise ``ValueError``.

        Args:
            config: the parsed ``config.json``.
            **overrides: jaxdiff options such as ``dtype=jnp.bfloat16`` or ``remat=True`` (or any
                config key to override).

        Example:
            >>> DiffusersUNet2D.from_config({"block_out_channels": [64, 128], "norm_num_groups": 32,
            ...     "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            ...     "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}, remat=True).remat
            True
        """
        class_name = config.get("_class_name", "UNet2DModel")
        if class_name != "UNet2DModel":
            raise ValueError(f"expected a UNet2DModel config, got _class_name={class_name!r}")
        known = set(cls.config_keys())
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in config.items():
            if key in _IGNORED_CONFIG_KEYS:
                continue
            if key not in known:
                unknown.append(key)
                continue
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        if unknown:  # diffusers ignores them too (old and newer configs carry extra keys)
            warnings.warn(f"ignoring config keys UNet2DModel does not take: {sorted(unknown)}", stacklevel=2)
        kwargs.update(overrides)
        module = cls(**kwargs)
        module.validate()
        return module

    def to_config(self) -> dict[str, Any]:
        """The diffusers ``config.json`` dictionary of this module (``_class_name`` included)."""
        config: dict[str, Any] = {"_class_name": "UNet2DModel"}
        for key in self.config_keys():
            value = getattr(self, key)
            config[key] = list(value) if isinstance(value, tuple) else value
        return config

    def validate(self) -> None:
        """Raise ``ValueError`` if the configuration uses something this module does not implement."""
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"block_out_channels {self.block_out_channels}, down_block_types {self.down_block_types} and "
                f"up_block_types {self.up_block_types} must have the same length"
            )
        for kind, types, supported in (
            ("down", self.down_block_types, SUPPORTED_DOWN_BLOCK_TYPES),
            ("up", self.up_block_types, SUPPORTED_UP_BLOCK_TYPES),
        ):
            for block_type in types:
                if _strip_unetres(block_type) not in supported:
                    raise ValueError(
                        f"unsupported {kind} block type {block_type!r}; DiffusersUNet2D supports {supported}"
                    )
        if self.mid_block_type not in SUPPORTED_MID_BLOCK_TYPES:
            raise ValueError(
                f"unsupported mid block type {self.mid_block_type!r}; supported: {SUPPORTED_MID_BLOCK_TYPES}"
            )
        choices = {
            "time_embedding_type": (self.time_embedding_type, ("positional", "fourier", "learned")),
            "resnet_time_scale_shift": (self.resnet_time_scale_shift, ("default", "scale_shift")),
            "downsample_type": (self.downsample_type, ("conv",)),
            "upsample_type": (self.upsample_type, ("conv",)),
            "act_fn": (self.act_fn, tuple(_ACTIVATIONS)),
            "class_embed_type": (self.class_embed_type, (None, "timestep", "identity")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"unsupported {key}={value!r}; DiffusersUNet2D supports {allowed}")
        if self.time_embedding_type == "learned" and not self.num_train_timesteps:
            raise ValueError("time_embedding_type='learned' needs num_train_timesteps")

    def _check_inputs(self, x: jax.Array) -> None:
        if x.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C] (NHWC), got shape {x.shape}")
        _, h, w, c = x.shape
        if c != self.in_channels:
            raise ValueError(
                f"x has {c} channels but in_channels={self.in_channels}; pass NHWC images "
                "(a PyTorch NCHW array needs x.transpose(0, 2, 3, 1))"
            )
        factor = 2 ** (len(self.block_out_channels) - 1)
        if h % factor or w % factor:
            raise ValueError(
                f"image size {h}x{w}: with {len(self.block_out_channels)} blocks H and W must be "
                f"multiples of {factor}"
            )

    # ------------------------------------------------------------------ network
    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding fed to every ResNet block."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def _head_dim(self, channels: int) -> int:
        return self.attention_head_dim if self.attention_head_dim is not None else channels

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array | int | float,
        class_labels: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        """Predict the model output (noise for DDPM checkpoints) for ``x`` at timestep ``t``.

        Args:
            x: ``[B, H, W, in_channels]`` noisy images.
            t: scalar or ``[B]`` timesteps.
            class_labels: ``[B]`` integer labels (``[B, time_embed_dim]`` for ``"identity"``) when the
                model is class-conditional.
            train: enables dropout (needs a ``"dropout"`` rng when ``dropout > 0``).

        Returns:
            ``[B, H, W, out_channels]`` float32 output.
        """
        self.validate()
        self._check_inputs(x)
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        if self.center_input_sample:
            x = 2.0 * x - 1.0
        chans = self.block_out_channels
        opts = _BlockOptions(
            groups=self.norm_num_groups, eps=self.norm_eps, act=self.act_fn,
            time_scale_shift=self.resnet_time_scale_shift, dropout=self.dropout, deterministic=not train,
            remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype,
        )

        # Time (and class) embedding.
        if self.time_embedding_type == "fourier":
            t_emb = _FourierProjection(chans[0], name="time_proj")(t)
        elif self.time_embedding_type == "learned":
            t_emb = nn.Embed(self.num_train_timesteps, chans[0], param_dtype=self.param_dtype,
                             name="time_proj")(t.astype(jnp.int32))
        else:
            t_emb = timestep_embedding(
                t, chans[0], flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
            )
        # The time (and class) embedding MLPs are tiny: they run in float32 whatever ``dtype`` is.
        emb = _TimestepEmbedding(self.time_embed_dim, jnp.float32, self.param_dtype, name="time_embedding")(t_emb)
        has_class_embedding = self.class_embed_type is not None or self.num_class_embeds is not None
        if has_class_embedding and class_labels is None:
            raise ValueError("class_labels must be given to a class-conditional model")
        if not has_class_embedding and class_labels is not None:
            raise ValueError("class_labels given but the model has no class embedding")
        if class_labels is not None:
            if self.class_embed_type == "timestep":
                c = timestep_embedding(jnp.broadcast_to(class_labels, (batch,)), chans[0],
                                       flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
                c = _TimestepEmbedding(self.time_embed_dim, jnp.float32, self.param_dtype,
                                       name="class_embedding")(c)
            elif self.class_embed_type == "identity":
                c = class_labels
            else:
                c = nn.Embed(self.num_class_embeds, self.time_embed_dim, param_dtype=self.param_dtype,
                             name="class_embedding")(class_labels)
            emb = emb + c.astype(jnp.float32)

        # Down path.
        h = _conv(chans[0], 3, "conv_in", self.dtype, self.param_dtype)(x.astype(self.dtype))
        skips = [h]
        for i, block_type in enumerate(self.down_block_types):
            with_attention = _strip_unetres(block_type) == "AttnDownBlock2D"
            h, block_skips = _DownBlock(
                chans[i], self.layers_per_block, with_attention, self._head_dim(chans[i]),
                add_downsample=i < len(chans) - 1, downsample_padding=self.downsample_padding,
                opts=opts, name=f"down_blocks_{i}",
            )(h, emb)
            skips.extend(block_skips)

        if self.mid_block_type is not None:
            h = _MidBlock(
                self._head_dim(chans[-1]), self.add_attention, self.mid_block_scale_factor,
                attn_groups=(self.attn_norm_num_groups if self.attn_norm_num_groups is not None
                             else (self.norm_num_groups if self.resnet_time_scale_shift == "default" else None)),
                opts=opts, name="mid_block",
            )(h, emb)

        # Up path: block i consumes layers_per_block + 1 skips, from the last.
        rev = tuple(reversed(chans))
        for i, block_type in enumerate(self.up_block_types):
            n_skip = self.layers_per_block + 1
            block_skips, skips = skips[-n_skip:], skips[:-n_skip]
            with_attention = _strip_unetres(block_type) == "AttnUpBlock2D"
            h = _UpBlock(
                rev[i], with_attention, self._head_dim(rev[i]), add_upsample=i < len(chans) - 1,
                opts=opts, name=f"up_blocks_{i}",
            )(h, tuple(block_skips), emb)

        h = _GroupNorm(self.norm_num_groups, self.norm_eps, self.dtype, self.param_dtype, name="conv_norm_out")(h)
        h = _conv(self.out_channels, 3, "conv_out", self.dtype, self.param_dtype)(nn.silu(h))
        h = h.astype(jnp.float32)
        if self.time_embedding_type == "fourier":
            h = h / t.astype(jnp.float32)[:, None, None, None]
        return h


class _DownBlock(nn.Module):
    """``DownBlock2D`` / ``AttnDownBlock2D``: ResNets (each followed by attention) then a stride-2 conv."""

    out_channels: int
    num_layers: int
    with_attention: bool
    head_dim: int
    add_downsample: bool
    downsample_padding: int
    opts: _BlockOptions

    @nn.compact
    def __call__(self, h: jax.Array, emb: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for j in range(self.num_layers):
            h = self.opts.resnet(self.out_channels, f"resnets_{j}")(h, emb)
            if self.with_attention:
                h = self.opts.attention(self.head_dim, self.opts.groups, f"attentions_{j}")(h)
            skips.append(h)
        if self.add_downsample:
            h = _Downsample(self.out_channels, self.downsample_padding, self.opts.dtype, self.opts.param_dtype,
                            name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class _MidBlock(nn.Module):
    """``UNetMidBlock2D``: ResNet, (attention, ResNet)."""

    head_dim: int
    add_attention: bool
    output_scale_factor: float
    attn_groups: int | None
    opts: _BlockOptions

    @nn.compact
    def __call__(self, h: jax.Array, emb: jax.Array) -> jax.Array:
        channels = h.shape[-1]
        h = self.opts.resnet(channels, "resnets_0", self.output_scale_factor)(h, emb)
        if self.add_attention:
            h = self.opts.attention(self.head_dim, self.attn_groups, "attentions_0", self.output_scale_factor)(h)
        return self.opts.resnet(channels, "resnets_1", self.output_scale_factor)(h, emb)


class _UpBlock(nn.Module):
    """``UpBlock2D`` / ``AttnUpBlock2D``: concat a skip, ResNet (and attention), repeat; then upsample."""

    out_channels: int
    with_attention: bool
    head_dim: int
    add_upsample: bool
    opts: _BlockOptions

    @nn.compact
    def __call__(self, h: jax.Array, skips: Sequence[jax.Array], emb: jax.Array) -> jax.Array:
        for j, skip in enumerate(reversed(skips)):
            h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
            h = self.opts.resnet(self.out_channels, f"resnets_{j}")(h, emb)
            if self.with_attention:
                h = self.opts.attention(self.head_dim, self.opts.groups, f"attentions_{j}")(h)
        if self.add_upsample:
            h = _Upsample(self.out_channels, self.opts.dtype, self.opts.param_dtype, name="upsamplers_0")(h)
        return h


def _strip_unetres(block_type: str) -> str:
    """diffusers accepts ``UNetRes``-prefixed aliases of the block names."""
    return block_type[len("UNetRes"):] if block_type.startswith("UNetRes") else block_type
