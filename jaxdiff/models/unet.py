"""The denoising U-Net of *Learn Generative AI with PyTorch* (ch. 15), in Flax Linen, NHWC.

The network predicts the noise ``eps`` added to an image ``x_t`` at timestep ``t`` (Ho et al.,
2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239). ``UNet()`` with its defaults
is exactly the book's flowers model, ``UNet(3, hidden_dims=[128, 256, 512, 1024], image_size=64)``:
133,417,219 parameters, the same maths, and PyTorch weights load into it with
:func:`jaxdiff.models.unet_params_from_torch`.

Architecture (widths ``d_0, ..., d_{L-1}`` = ``hidden_dims``, ``L >= 2``)::

    temb = MLP(sinusoidal(t, d_0))          # Dense(4 d_0) -> SiLU -> Dense(4 d_0), float32
    x = r = conv3x3(x)                       # width d_0
    down stage i = 0 .. L-2 (width d_i):
        x = RB(x); push x;  x = RB(x); x = Attn(x) if i in attention_stages; push x
        x = space_to_depth(2x2) + conv1x1 -> d_{i+1}   (halves H, W)   if i <  L-2
        x = conv3x3 -> d_{i+1}                          (same size)     if i == L-2
    mid: RB, Attn, RB at width d_{L-1}
    up stage j = 0 .. L-2 (c = d_{L-1-j} in, s = d_{L-2-j} out):
        x = RB(cat(x, pop())) -> c, twice;  x = Attn(x) if j in attention_stages
        x = nearest x2 + conv3x3 -> s   if j < L-2,   conv3x3 -> s   if j == L-2
    out = conv1x1(RB(cat(x, r)))            # width in_channels -> out_channels

``RB`` is the book's residual block: ``h = SiLU(GN(conv3x3(x)))``,
``h += Dense(SiLU(SiLU(temb)))`` (the book applies SiLU twice; kept for exactness),
``h = SiLU(GN(conv3x3(h)))``, ``return h + (conv1x1(x) if widths differ else x)``;
GroupNorm with ``norm_groups`` groups. ``Attn`` is ``x + conv1x1(MHA(LN(x)))``: a channel
LayerNorm with a gain and no bias, ``heads`` x ``head_dim`` scaled dot-product attention over
the pixels (row-major tokens), q scaled by ``head_dim ** -0.5``. By the book's rule attention runs
in down stage ``L-2`` (the lowest resolution), in the middle, and in up stage ``L-2`` (the
highest resolution). The images are halved ``L-2`` times, so H and W must be multiples of
``2 ** (L-2)``.

Options beyond the book, all off by default: class/context conditioning (``num_classes``),
a computation ``dtype`` such as bfloat16 (params stay float32), ``remat`` (gradient
checkpointing of the residual blocks), ``attention_query_chunk`` (memory-bounded attention at
high resolution, same maths), ``attention_stages``, and the attention implementation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

ATTENTION_IMPLS = ("xla", "cudnn", "cpu_fast", "auto")


def sinusoidal_embedding(t: jax.typing.ArrayLike, dim: int) -> Array:
    """The book's sinusoidal timestep embedding, always computed in float32.

    ``freq_i = exp(-ln(10000) * i / (dim/2 - 1))`` for ``i = 0 .. dim/2 - 1`` and
    ``emb = [sin(t * freq), cos(t * freq)]`` (sines first). ``t`` is cast to float32 first, never
    rounded in a low-precision dtype (bf16 would turn 750 into 752).

    Args:
      t: timesteps, shape ``[B]`` (integer or float).
      dim: embedding width, even and at least 4.

    Returns:
      float32 array ``[B, dim]``.

    Example:
      >>> sinusoidal_embedding(jnp.array([0, 999]), 128).shape
      (2, 128)
    """
    if dim % 2 or dim < 4:
        raise ValueError(f"sinusoidal_embedding: dim must be even and >= 4, got {dim}.")
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * (-math.log(10000.0) / (half - 1)))
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def _resolve_attention_impl(impl: str | None) -> str:
    if impl is None:
        return "cpu_fast" if jax.default_backend() == "cpu" else "auto"
    if impl not in ATTENTION_IMPLS:
        raise ValueError(
            f"attention_impl={impl!r} is not one of {ATTENTION_IMPLS} or None (choose by backend)."
        )
    return impl


# Pairs of (batch, head) per chunk of the CPU attention kernel, as a budget in bytes for one
# [chunk, T, T] float32 block: blocks that stay in cache. Measured on a 2-core x86 CPU at T=256
# (small book model, batch 32): a train step takes 127 ms with 1-4 MiB blocks in both passes,
# 134-140 ms with an 8-64 MiB forward block.
_CHUNK_BYTES = 4 * 2**20


def _pair_chunk(pairs: int, tokens_q: int, tokens_k: int) -> int:
    """The largest divisor of ``pairs`` whose [chunk, Tq, Tk] float32 block fits the budget."""
    fit = max(_CHUNK_BYTES // (4 * tokens_q * tokens_k), 1)
    return max(d for d in range(1, min(fit, pairs) + 1) if pairs % d == 0)


def _over_chunks(fn, chunk: int, *args):
    """``fn`` over the leading axis of ``args`` in chunks of ``chunk`` (one loop, no copies)."""
    n = args[0].shape[0]
    if chunk >= n:
        return fn(*args)
    split = lambda a: a.reshape(n // chunk, chunk, *a.shape[1:])  # noqa: E731
    out = jax.lax.map(lambda xs: fn(*xs), tuple(split(a) for a in args))
    return jax.tree.map(lambda a: a.reshape(n, *a.shape[2:]), out)


def _attention_block_fwd(q: Array, k: Array, v: Array) -> tuple[Array, Array]:
    """Softmax attention of pre-scaled ``q`` [N, Tq, D] over ``k, v`` [N, Tk, D] -> (out, lse)."""
    logits = jnp.einsum("nqd,nkd->nqk", q, k)
    shift = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - shift)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("nqk,nkd->nqd", weights, v) / total
    return out, shift + jnp.log(total)


def _attention_block_bwd(q, k, v, out, lse, d_out):
    """Gradients of :func:`_attention_block_fwd`'s ``out`` from its saved log-sum-exp.

    With ``P = softmax(q k^T)``: ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``,
    ``dQ = dS K``, ``dK = dS^T Q`` (Dao et al. 2022, "FlashAttention", arXiv:2205.14135, sec. B).
    ``P^T`` and ``dS^T`` are recomputed from ``K Q^T`` rather than transposed, so every product is
    a plain (batched) matrix product: measured faster on XLA:CPU than transposing [T, T] blocks.
    """
    delta = jnp.sum(d_out * out, axis=-1, keepdims=True)  # [N, Tq, 1]
    p = jnp.exp(jnp.einsum("nqd,nkd->nqk", q, k) - lse)
    ds = p * (jnp.einsum("nqd,nkd->nqk", d_out, v) - delta)
    dq = jnp.einsum("nqk,nkd->nqd", ds, k)
    lse_t, delta_t = jnp.swapaxes(lse, -1, -2), jnp.swapaxes(delta, -1, -2)
    p_t = jnp.exp(jnp.einsum("nkd,nqd->nkq", k, q) - lse_t)
    dv = jnp.einsum("nkq,nqd->nkd", p_t, d_out)
    ds_t = p_t * (jnp.einsum("nkd,nqd->nkq", v, d_out) - delta_t)
    dk = jnp.einsum("nkq,nqd->nkd", ds_t, q)
    return dq, dk, dv


@jax.custom_vjp
def _cpu_attention(q: Array, k: Array, v: Array) -> Array:
    return _cpu_attention_fwd(q, k, v)[0]


def _cpu_attention_fwd(q, k, v):
    chunk = _pair_chunk(q.shape[0], q.shape[1], k.shape[1])
    out, lse = _over_chunks(_attention_block_fwd, chunk, q, k, v)
    return out, (q, k, v, out, lse)


def _cpu_attention_bwd(residuals, d_out):
    q, k = residuals[0], residuals[1]
    chunk = _pair_chunk(q.shape[0], q.shape[1], k.shape[1])
    return _over_chunks(_attention_block_bwd, chunk, *residuals, d_out)


_cpu_attention.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)


def heads_major_attention(q: Array, k: Array, v: Array, scale: float = 1.0) -> Array:
    """``softmax(scale q k^T) v`` per (batch, head) for heads-major ``[B, heads, T, D]`` inputs;
    the CPU implementation behind ``impl="cpu_fast"``.

    Float32 throughout (the inputs are cast), output in ``v``'s dtype. A custom VJP saves only
    q, k, v, the output and the per-row log-sum-exp, never the ``[T, T]`` weights, and the
    forward and backward passes run over chunks of (batch, head) pairs whose ``[T, T]`` blocks
    fit in cache (FlashAttention's recomputation, Dao et al. 2022, at the granularity of whole
    heads). Same maths as :func:`jax.nn.dot_product_attention`, different rounding.

    Example:
      >>> q = k = v = jnp.ones((2, 4, 16, 8))
      >>> heads_major_attention(q, k, v).shape
      (2, 4, 16, 8)
    """
    b, h = q.shape[:2]
    flat = lambda a: a.astype(jnp.float32).reshape(b * h, *a.shape[2:])  # noqa: E731
    out = _cpu_attention(flat(q) * scale, flat(k), flat(v))
    return out.reshape(b, h, *out.shape[1:]).astype(v.dtype)


def _group_stats(x3: Array, groups: int) -> tuple[Array, Array]:
    """Per (sample, group) mean and 1/std of ``x3`` [B, P, C] (biased variance, eps 1e-5)."""
    b, p, c = x3.shape
    n = p * (c // groups)
    mean = jnp.sum(x3, axis=1).reshape(b, groups, -1).sum(-1) / n
    mean_sq = jnp.sum(jnp.square(x3), axis=1).reshape(b, groups, -1).sum(-1) / n
    return mean, jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + 1e-5)


def _per_channel(a: Array, channels: int) -> Array:
    """[B, groups] -> [B, C]: each group's value repeated over its channels."""
    return jnp.repeat(a, channels // a.shape[-1], axis=-1)


def _gn_affine(x3: Array, scale: Array, bias: Array, mean: Array, rstd: Array) -> tuple[Array, Array]:
    """``(a [B, C], z [B, P, C])`` with ``z = a x + shift``: the normalisation and the affine in one."""
    c = x3.shape[-1]
    a = _per_channel(rstd, c) * scale
    shift = bias - _per_channel(mean, c) * a
    return a, x3 * a[:, None] + shift[:, None]


def _gn_silu_fwd(x, scale, bias, groups):
    b, h, w, c = x.shape
    x3 = x.reshape(b, h * w, c)
    mean, rstd = _group_stats(x3, groups)
    _, z = _gn_affine(x3, scale, bias, mean, rstd)
    return (z * jax.nn.sigmoid(z)).reshape(x.shape), (x, scale, bias, mean, rstd)


def _gn_silu_bwd(groups, residuals, dy):
    x, scale, bias, mean, rstd = residuals
    b, h, w, c = x.shape
    n = h * w * (c // groups)
    x3 = x.reshape(b, h * w, c)
    mean_c, rstd_c = _per_channel(mean, c), _per_channel(rstd, c)
    a, z = _gn_affine(x3, scale, bias, mean, rstd)
    sig = jax.nn.sigmoid(z)
    dz = dy.reshape(x3.shape) * sig * (1 + z * (1 - sig))  # SiLU'(z) = s (1 + z (1 - s))
    sum_dz = jnp.sum(dz, axis=1)  # [B, C]
    sum_dz_xhat = rstd_c * (jnp.sum(dz * x3, axis=1) - mean_c * sum_dz)
    # dx = rstd (g - mean_group(g) - xhat mean_group(g xhat)), g = scale dz, xhat = (x - mean) rstd
    mean_g = (scale * sum_dz).reshape(b, groups, -1).sum(-1) / n
    mean_g_xhat = (scale * sum_dz_xhat).reshape(b, groups, -1).sum(-1) / n
    coef_x = _per_channel(jnp.square(rstd) * mean_g_xhat, c)
    const = _per_channel(jnp.square(rstd) * mean_g_xhat * mean - rstd * mean_g, c)
    dx = a[:, None] * dz - coef_x[:, None] * x3 + const[:, None]
    return dx.reshape(x.shape), jnp.sum(sum_dz_xhat, 0), jnp.sum(sum_dz, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gn_silu(x, scale, bias, groups):
    return _gn_silu_fwd(x, scale, bias, groups)[0]


_gn_silu.defvjp(_gn_silu_fwd, _gn_silu_bwd)


def group_norm_silu(x: Array, scale: Array, bias: Array, groups: int) -> Array:
    """``SiLU(GroupNorm(x))`` over ``x`` [B, H, W, C] in float32, with a hand-written gradient.

    GroupNorm (Wu & He, 2018, arXiv:1803.08494) with ``groups`` groups, biased variance and eps
    1e-5 (PyTorch's and the book's), the per-channel ``scale`` and ``bias`` of ``nn.GroupNorm``,
    then SiLU. The custom VJP computes the normalisation's gradient from two per-channel sums
    (of ``dz`` and ``dz * x``) instead of autodiff's chain of broadcasts: on XLA:CPU about 1.5-2x
    faster forward+backward measured alone, a few percent of a whole U-Net's train step.
    Float32 out.

    Example:
      >>> x = jnp.ones((2, 4, 4, 16))
      >>> group_norm_silu(x, jnp.ones(16), jnp.zeros(16), 8).shape
      (2, 4, 4, 16)
    """
    if x.shape[-1] % groups:
        raise ValueError(f"group_norm_silu: {x.shape[-1]} channels are not divisible by {groups} groups.")
    f32 = jnp.float32
    return _gn_silu(x.astype(f32), scale.astype(f32), bias.astype(f32), groups)


def multihead_attention(
    q: Array, k: Array, v: Array, *, scale: float, impl: str | None = None,
    query_chunk_size: int | None = None,
) -> Array:
    """Softmax attention ``softmax(scale q k^T) v`` over tokens, per head.

    Args:
      q, k, v: ``[B, T, heads, head_dim]``.
      scale: multiplies the logits (the book: ``head_dim ** -0.5``).
      impl: ``"xla"`` or ``"cudnn"`` force :func:`jax.nn.dot_product_attention` with that
        implementation; ``"auto"`` lets it choose (cuDNN flash attention on GPU where it applies);
        ``"cpu_fast"`` is :func:`heads_major_attention` (a cache-blocked kernel with a custom
        gradient, faster on CPU); ``None`` picks ``"cpu_fast"`` on CPU and ``"auto"`` elsewhere.
      query_chunk_size: if set and smaller than the number of tokens T (and dividing it), the
        queries are processed in chunks of this size, each under ``jax.checkpoint``, so the
        ``[T, T]`` logits never exist at once, in the forward or the backward pass (memory
        ``T * chunk`` instead of ``T * T``, at the cost of recomputing the logits once in the
        backward pass). Same maths.

    Returns:
      ``[B, T, heads, head_dim]`` in the dtype of ``v``. Logits and the softmax are float32.
    """
    impl = _resolve_attention_impl(impl)
    tokens = q.shape[1]
    if query_chunk_size is not None and query_chunk_size < tokens:
        if tokens % query_chunk_size:
            raise ValueError(
                f"query_chunk_size={query_chunk_size} must divide the number of tokens {tokens}."
            )
        chunks = einops.rearrange(q, "b (n c) h d -> n b c h d", c=query_chunk_size)
        attend = jax.checkpoint(
            lambda q_chunk: multihead_attention(q_chunk, k, v, scale=scale, impl=impl)
        )
        out = jax.lax.map(attend, chunks)
        return einops.rearrange(out, "n b c h d -> b (n c) h d")
    if impl != "cpu_fast":
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, implementation=None if impl == "auto" else impl
        )
    qh, kh, vh = (einops.rearrange(a, "b t h d -> b h t d") for a in (q, k, v))
    out = heads_major_attention(qh, kh, vh, scale)
    return einops.rearrange(out, "b h t d -> b t h d")


class _GroupNormParams(nn.Module):
    """The parameters of an ``nn.GroupNorm`` (``scale`` ones, ``bias`` zeros), returned."""

    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, channels: int) -> tuple[Array, Array]:
        return (self.param("scale", nn.initializers.ones, (channels,), self.param_dtype),
                self.param("bias", nn.initializers.zeros_init(), (channels,), self.param_dtype))


class ResidualBlock(nn.Module):
    """The book's time-conditioned residual block (see the module docstring)."""

    features: int
    norm_groups: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> Array:
        # x: [B, H, W, C_in], temb: [B, E]
        conv = functools.partial(
            nn.Conv, self.features, (3, 3), padding="SAME", dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        def norm_silu(h: Array, name: str) -> Array:
            scale, bias = _GroupNormParams(param_dtype=self.param_dtype, name=name)(h.shape[-1])
            return group_norm_silu(h, scale, bias, self.norm_groups).astype(self.dtype)

        h = norm_silu(conv(name="conv1")(x), "norm1")
        temb = nn.silu(nn.silu(temb))
        temb = nn.Dense(
            self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="time_proj"
        )(temb)
        h = h + temb[:, None, None, :]
        h = norm_silu(conv(name="conv2")(h), "norm2")
        if x.shape[-1] != self.features:
            x = nn.Dense(
                self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                name="residual_conv",
            )(x)
        return h + x.astype(self.dtype)


class _DenseParams(nn.Module):
    """The parameters of an ``nn.Dense`` (same names, shapes and initialisers), returned for use
    in einsums: ``(kernel [in, features], bias [features] or None)``."""

    features: int
    use_bias: bool = True
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, in_features: int) -> tuple[Array, Array | None]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (in_features, self.features), self.param_dtype)
        bias = (self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
                if self.use_bias else None)
        return kernel, bias


class AttentionBlock(nn.Module):
    """``x + conv1x1(MHA(LN(x)))`` over the pixels, as the book (see module docstring).

    Parameters: ``norm_scale [C]``, ``to_qkv/kernel [C, 3 * heads * head_dim]`` (output channel
    ``s * heads * head_dim + n * head_dim + d`` is q, k, v for ``s = 0, 1, 2``, head ``n``) and
    ``to_out/{kernel [heads * head_dim, C], bias [C]}``: those of the book's 1x1 convolutions.
    With the CPU kernel (``"cpu_fast"``) q, k and v are projected straight into the heads-major
    layout it works in, and the output projection contracts heads and channels in one product.
    """

    heads: int = 4
    head_dim: int = 32
    attention_impl: str | None = None
    query_chunk_size: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        tokens, heads, head_dim = h * w, self.heads, self.head_dim
        inner = heads * head_dim
        # Channel LayerNorm with a gain and no bias, biased variance, eps 1e-5, in float32.
        gain = self.param("norm_scale", nn.initializers.ones, (c,), self.param_dtype)
        xf = x.astype(jnp.float32).reshape(b, tokens, c)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        normed = ((xf - mean) * jax.lax.rsqrt(var + 1e-5) * gain).astype(self.dtype)

        w_qkv, _ = _DenseParams(3 * inner, use_bias=False, param_dtype=self.param_dtype,
                                name="to_qkv")(c)
        w_out, b_out = _DenseParams(c, param_dtype=self.param_dtype, name="to_out")(inner)
        w_qkv, w_out = w_qkv.astype(self.dtype), w_out.astype(self.dtype)
        scale = head_dim**-0.5
        impl = _resolve_attention_impl(self.attention_impl)
        chunk = self.query_chunk_size
        if impl == "cpu_fast" and (chunk is None or chunk >= tokens):
            w_qkv = w_qkv.reshape(c, 3, heads, head_dim)
            q, k, v = (jnp.einsum("btc,chd->bhtd", normed, w_qkv[:, i]) for i in range(3))
            out = heads_major_attention(q, k, v, scale)  # [B, heads, T, head_dim]
            out = jnp.einsum("bhtd,hdc->btc", out, w_out.reshape(heads, head_dim, c))
        else:
            q, k, v = einops.rearrange(
                normed @ w_qkv, "b t (three n d) -> three b t n d", three=3, n=heads
            )
            out = multihead_attention(q, k, v, scale=scale, impl=impl, query_chunk_size=chunk)
            out = out.reshape(b, tokens, inner) @ w_out  # [B, T, heads, head_dim] -> [B, T, C]
        out = out + b_out.astype(self.dtype)
        return x.astype(self.dtype) + out.reshape(b, h, w, c)


def _stage_set(stages: Sequence[int]) -> tuple[int, ...]:
    """Stage indices as a sorted tuple of distinct ints."""
    return tuple(sorted(set(int(i) for i in stages)))


class UNet(nn.Module):
    """The book's denoising U-Net (ch. 15), NHWC; defaults reproduce it exactly.

    Attributes:
      in_channels: image channels in (3 for RGB, 1 for digits).
      out_channels: channels of the predicted noise; ``None`` means ``in_channels``.
      hidden_dims: stage widths ``d_0 .. d_{L-1}``, ``L >= 2``, each a multiple of
        ``norm_groups``. Images are halved ``L - 2`` times.
      attention_stages: indices ``i`` in ``0 .. L-2`` of the down stage and of the up stage that
        end with self-attention (both ``down i`` and ``up i``, the book's indexing); ``None``
        means the book's rule ``(L - 2,)``: down stage L-2 (lowest resolution) and up stage L-2
        (full resolution). The middle always has attention.
      up_attention_stages: indices ``j`` of the up stages that end with self-attention, when
        they should differ from ``attention_stages`` (``None``: the same indices, the book's
        rule). Up stage ``j`` works at the resolution of down stage ``L - 2 - j``, so the book's
        rule puts the up path's attention at full resolution; ``(0,)`` with
        ``attention_stages=(L - 2,)`` keeps every attention block at the lowest resolution
        (``configs/digits.py``: 64 instead of 256 tokens, a 1.18x faster train step).
      time_emb_dim: width of the sinusoidal embedding (the MLP is 4x wider); ``None`` means
        ``hidden_dims[0]`` as the book (128 for the flowers model).
      num_classes: if set, the model takes a context ``c`` ``[B, num_classes]`` (one-hot labels
        or any mix; integer labels ``[B]`` are one-hot encoded, and an out-of-range label such
        as -1 encodes to zeros). The context goes through ``Dense(no bias) -> SiLU ->
        Dense(no bias)`` and is **added** to the time embedding. The zero vector (and ``c=None``)
        is the null context for classifier-free guidance: it adds exactly zero.
      norm_groups: GroupNorm groups (8).
      heads, head_dim: attention heads and width per head (4 x 32).
      attention_impl: ``None`` (by backend), ``"auto"``, ``"xla"``, ``"cudnn"`` or
        ``"cpu_fast"``; see :func:`multihead_attention`.
      attention_query_chunk: if set, attention over more tokens than this runs in query chunks
        of this size, each checkpointed (see :func:`multihead_attention`): the same maths with
        ``T x chunk`` instead of ``T x T`` logits. At 64x64 (4,096 tokens) the full logits
        dominate training memory; 1024 halves the compiled peak of ``UNet()`` at batch 4.
      dtype: computation dtype (e.g. ``jnp.bfloat16``). Norms, softmax and the time embedding
        run in float32; the output is float32.
      param_dtype: parameter dtype (float32).
      remat: rematerialise (gradient-checkpoint) the residual blocks (``nn.remat``). At high
        resolution the attention logits dominate memory: combine with ``attention_query_chunk``.

    Example:
      >>> model = UNet(in_channels=1, hidden_dims=(32, 64, 128))
      >>> x, t = jnp.zeros((2, 16, 16, 1)), jnp.array([3, 977])
      >>> variables = jax.jit(model.init)(jax.random.key(0), x, t)
      >>> model.apply(variables, x, t).shape
      (2, 16, 16, 1)
    """

    in_channels: int = 3
    out_channels: int | None = None
    hidden_dims: Sequence[int] = (128, 256, 512, 1024)
    attention_stages: Sequence[int] | None = None
    up_attention_stages: Sequence[int] | None = None
    time_emb_dim: int | None = None
    num_classes: int | None = None
    norm_groups: int = 8
    heads: int = 4
    head_dim: int = 32
    attention_impl: str | None = None
    attention_query_chunk: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    # ---- configuration helpers (pure functions of the attributes) ----
    @property
    def num_halvings(self) -> int:
        """How many times the image is halved: ``len(hidden_dims) - 2``."""
        return max(len(self.hidden_dims) - 2, 0)

    @property
    def resolved_attention_stages(self) -> tuple[int, ...]:
        if self.attention_stages is None:
            return (len(self.hidden_dims) - 2,)
        return _stage_set(self.attention_stages)

    @property
    def resolved_up_attention_stages(self) -> tuple[int, ...]:
        if self.up_attention_stages is None:
            return self.resolved_attention_stages
        return _stage_set(self.up_attention_stages)

    @property
    def resolved_time_emb_dim(self) -> int:
        return self.hidden_dims[0] if self.time_emb_dim is None else self.time_emb_dim

    def check_config(self) -> None:
        """Raise ``ValueError`` for settings the network cannot be built with."""
        dims = tuple(self.hidden_dims)
        if len(dims) < 2:
            raise ValueError(
                f"hidden_dims={dims}: need at least 2 widths (the book uses 4, e.g. "
                "(128, 256, 512, 1024)); each width after the first adds a stage."
            )
        bad = [d for d in dims if d % self.norm_groups]
        if bad:
            raise ValueError(
                f"hidden_dims={dims}: widths {bad} are not divisible by norm_groups="
                f"{self.norm_groups} (GroupNorm groups); use multiples of {self.norm_groups} "
                "or change norm_groups."
            )
        for name, stages in (("attention_stages", self.resolved_attention_stages),
                             ("up_attention_stages", self.resolved_up_attention_stages)):
            if any(i < 0 or i > len(dims) - 2 for i in stages):
                raise ValueError(
                    f"{name}={tuple(getattr(self, name))}: stage indices must lie in "
                    f"0..{len(dims) - 2} for hidden_dims of length {len(dims)}."
                )
        temb = self.resolved_time_emb_dim
        if temb % 2 or temb < 4:
            raise ValueError(f"time_emb_dim={temb} must be even and >= 4.")
        _resolve_attention_impl(self.attention_impl)  # raises for an unknown name

    def _check_inputs(self, x: Array, t: Array) -> None:
        if x.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C] (NHWC), got shape {x.shape}.")
        b, h, w, c = x.shape
        if c != self.in_channels:
            raise ValueError(
                f"x has {c} channels but in_channels={self.in_channels}; pass NHWC images "
                f"(NCHW arrays need x.transpose(0, 2, 3, 1)) or set in_channels={c}."
            )
        factor = 2**self.num_halvings
        if h % factor or w % factor:
            raise ValueError(
                f"image size {h}x{w} cannot be halved {self.num_halvings} times "
                f"(hidden_dims={tuple(self.hidden_dims)} has {len(self.hidden_dims)} widths, so "
                f"H and W must be multiples of 2**{self.num_halvings} = {factor}); resize/pad the "
                "images or use fewer hidden_dims."
            )
        chunk = self.attention_query_chunk
        if chunk is not None:
            stage_sizes = {(h * w) // 4**i for i in range(self.num_halvings + 1)}
            bad = sorted(n for n in stage_sizes if n > chunk and n % chunk)
            if chunk < 1 or bad:
                raise ValueError(
                    f"attention_query_chunk={chunk} must be a positive divisor of the token "
                    f"counts it chunks (H*W at each stage: {sorted(stage_sizes)}); e.g. a power "
                    "of two."
                )
        if t.shape != (b,):
            raise ValueError(f"t must have shape [B] = ({b},), got {t.shape}.")

    def _context(self, c: jax.typing.ArrayLike | None, batch: int) -> Array | None:
        if self.num_classes is None:
            if c is not None:
                raise ValueError(
                    "a context c was passed but num_classes is None; set UNet(num_classes=K) "
                    "to build a conditional model."
                )
            return None
        if c is None:
            return jnp.zeros((batch, self.num_classes), jnp.float32)
        c = jnp.asarray(c)
        if c.ndim == 1 and jnp.issubdtype(c.dtype, jnp.integer):
            c = jax.nn.one_hot(c, self.num_classes, dtype=jnp.float32)
        if c.shape != (batch, self.num_classes):
            raise ValueError(
                f"context c must be integer labels [B] or [B, num_classes] = "
                f"({batch}, {self.num_classes}), got shape {c.shape}."
            )
        return c.astype(jnp.float32)

    @nn.compact
    def __call__(
        self, x: jax.typing.ArrayLike, t: jax.typing.ArrayLike,
        c: jax.typing.ArrayLike | None = None,
    ) -> Array:
        """Predict the noise.

        Args:
          x: noisy images ``[B, H, W, in_channels]``.
          t: timesteps ``[B]`` (a scalar is broadcast).
          c: optional context (only with ``num_classes``), see the class docstring.

        Returns:
          float32 ``[B, H, W, out_channels]``.
        """
        self.check_config()
        x = jnp.asarray(x)
        t = jnp.asarray(t)
        if t.ndim == 0 and x.ndim == 4:
            t = jnp.broadcast_to(t, x.shape[:1])
        self._check_inputs(x, t)
        dims = tuple(self.hidden_dims)
        last = len(dims) - 2
        attn_stages = self.resolved_attention_stages
        up_attn_stages = self.resolved_up_attention_stages
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        res_cls = nn.remat(ResidualBlock) if self.remat else ResidualBlock
        # Attention blocks are not rematerialised: recomputing their [T, T] logits in the
        # backward pass raised XLA's compiled peak (2.9 -> 3.8 GiB temp for UNet() at batch 4,
        # 64x64, CPU); attention_query_chunk is what bounds their memory.

        def res(features: int, name: str) -> nn.Module:
            return res_cls(features, norm_groups=self.norm_groups, name=name, **kw)

        def attn(name: str) -> nn.Module:
            return AttentionBlock(
                heads=self.heads, head_dim=self.head_dim, attention_impl=self.attention_impl,
                query_chunk_size=self.attention_query_chunk, name=name, **kw,
            )

        # Time embedding in float32 (FIELD.md: never round t or the embedding in bf16).
        temb_dim = self.resolved_time_emb_dim
        temb = sinusoidal_embedding(t, temb_dim)
        temb = nn.Dense(4 * temb_dim, dtype=jnp.float32, param_dtype=self.param_dtype,
                        name="time_mlp_0")(temb)
        temb = nn.Dense(4 * temb_dim, dtype=jnp.float32, param_dtype=self.param_dtype,
                        name="time_mlp_1")(nn.silu(temb))
        context = self._context(c, x.shape[0])
        if context is not None:
            # No biases and SiLU(0) = 0: the zero (null) context adds exactly nothing.
            cemb = nn.Dense(4 * temb_dim, use_bias=False, dtype=jnp.float32,
                            param_dtype=self.param_dtype, name="context_mlp_0")(context)
            cemb = nn.Dense(4 * temb_dim, use_bias=False, dtype=jnp.float32,
                            param_dtype=self.param_dtype, name="context_mlp_1")(nn.silu(cemb))
            temb = temb + cemb

        h = nn.Conv(dims[0], (3, 3), padding="SAME", name="init_conv", **kw)(x.astype(self.dtype))
        r = h
        skips = []
        for i in range(len(dims) - 1):
            h = res(dims[i], f"down_{i}_res_0")(h, temb)
            skips.append(h)
            h = res(dims[i], f"down_{i}_res_1")(h, temb)
            if i in attn_stages:
                h = attn(f"down_{i}_attn")(h)
            skips.append(h)
            if i < last:
                # Space-to-depth 2x2; new channel index = c * 4 + p1 * 2 + p2 (the book's order).
                h = einops.rearrange(h, "b (h p1) (w p2) c -> b h w (c p1 p2)", p1=2, p2=2)
                h = nn.Dense(dims[i + 1], name=f"down_{i}_downsample", **kw)(h)
            else:
                h = nn.Conv(dims[i + 1], (3, 3), padding="SAME", name=f"down_{i}_downsample",
                            **kw)(h)

        h = res(dims[-1], "mid_res_0")(h, temb)
        h = attn("mid_attn")(h)
        h = res(dims[-1], "mid_res_1")(h, temb)

        for j in range(len(dims) - 1):
            width, skip_width = dims[-1 - j], dims[-2 - j]
            for k in range(2):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(width, f"up_{j}_res_{k}")(h, temb)
            if j in up_attn_stages:
                h = attn(f"up_{j}_attn")(h)
            if j < last:
                h = einops.repeat(h, "b h w c -> b (h p1) (w p2) c", p1=2, p2=2)
            h = nn.Conv(skip_width, (3, 3), padding="SAME", name=f"up_{j}_upsample", **kw)(h)

        h = res(dims[0], "out_res")(jnp.concatenate([h, r], axis=-1), temb)
        out_channels = self.in_channels if self.out_channels is None else self.out_channels
        out = nn.Dense(out_channels, name="conv_out", **kw)(h)
        return out.astype(jnp.float32)
