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
The layers and blocks are shared with the Stable Diffusion ports (:mod:`jaxdiff.models.diffusers_layers`),
the config handling with them too (:mod:`jaxdiff.models.hf_config`).

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

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import hf_config
from jaxdiff.models.diffusers_layers import (
    ACTIVATIONS,
    BlockOptions,
    DownBlock,
    GroupNorm,
    MidBlock,
    SelfAttentionLayers,
    TimestepEmbedding,
    UpBlock,
    conv,
    timestep_embedding,
)

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


class DiffusersUNet2D(hf_config.ConfigMixin, nn.Module):
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

    config_class_name = "UNet2DModel"
    jaxdiff_options = ("dtype", "param_dtype", "remat")

    # ------------------------------------------------------------------ config helpers
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
        return hf_config.module_from_config(cls, config, overrides)

    def validate(self) -> None:
        """Raise ``ValueError`` if the configuration uses something this module does not implement."""
        hf_config.check_block_types(self, SUPPORTED_DOWN_BLOCK_TYPES, SUPPORTED_UP_BLOCK_TYPES,
                                    SUPPORTED_MID_BLOCK_TYPES)
        choices = {
            "time_embedding_type": (self.time_embedding_type, ("positional", "fourier", "learned")),
            "resnet_time_scale_shift": (self.resnet_time_scale_shift, ("default", "scale_shift")),
            "downsample_type": (self.downsample_type, ("conv",)),
            "upsample_type": (self.upsample_type, ("conv",)),
            "act_fn": (self.act_fn, tuple(ACTIVATIONS)),
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

    def _attention(self, block_type: str, attention_type: str, channels: int,
                   opts: BlockOptions) -> SelfAttentionLayers | None:
        """The self-attention layers of an ``Attn*`` block, None for a plain one."""
        if hf_config.strip_unetres(block_type) != attention_type:
            return None
        return SelfAttentionLayers(self._head_dim(channels), opts)

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
        opts = BlockOptions(
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
        emb = TimestepEmbedding(self.time_embed_dim, jnp.float32, self.param_dtype, name="time_embedding")(t_emb)
        has_class_embedding = self.class_embed_type is not None or self.num_class_embeds is not None
        if has_class_embedding and class_labels is None:
            raise ValueError("class_labels must be given to a class-conditional model")
        if not has_class_embedding and class_labels is not None:
            raise ValueError("class_labels given but the model has no class embedding")
        if class_labels is not None:
            if self.class_embed_type == "timestep":
                c = timestep_embedding(jnp.broadcast_to(class_labels, (batch,)), chans[0],
                                       flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
                c = TimestepEmbedding(self.time_embed_dim, jnp.float32, self.param_dtype,
                                       name="class_embedding")(c)
            elif self.class_embed_type == "identity":
                c = class_labels
            else:
                c = nn.Embed(self.num_class_embeds, self.time_embed_dim, param_dtype=self.param_dtype,
                             name="class_embedding")(class_labels)
            emb = emb + c.astype(jnp.float32)

        # Down path.
        h = conv(chans[0], 3, "conv_in", self.dtype, self.param_dtype)(x.astype(self.dtype))
        skips = [h]
        for i, block_type in enumerate(self.down_block_types):
            h, block_skips = DownBlock(
                chans[i], self.layers_per_block, add_downsample=i < len(chans) - 1,
                downsample_padding=self.downsample_padding, opts=opts,
                attention=self._attention(block_type, "AttnDownBlock2D", chans[i], opts), name=f"down_blocks_{i}",
            )(h, emb)
            skips.extend(block_skips)

        if self.mid_block_type is not None:
            h = MidBlock(
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
            h = UpBlock(
                rev[i], n_skip, add_upsample=i < len(chans) - 1, opts=opts,
                attention=self._attention(block_type, "AttnUpBlock2D", rev[i], opts), name=f"up_blocks_{i}",
            )(h, tuple(block_skips), emb)

        h = GroupNorm(self.norm_num_groups, self.norm_eps, self.dtype, self.param_dtype, name="conv_norm_out")(h)
        h = conv(self.out_channels, 3, "conv_out", self.dtype, self.param_dtype)(nn.silu(h))
        h = h.astype(jnp.float32)
        if self.time_embedding_type == "fourier":
            h = h / t.astype(jnp.float32)[:, None, None, None]
        return h
