"""The book's music Transformer (a GPT-style decoder) in Flax, and KV-cached generation.

Architecture (Vaswani et al. 2017, "Attention Is All You Need", decoder only, with pre-layer
norm as in GPT-2; applied to performance events as in Huang et al. 2018, "Music Transformer",
here with the book's learned absolute positions instead of relative attention)::

    h = dropout(wte[ids] + wpe[0..T-1])
    for each block:  h = h + attn(ln_1(h));  h = h + mlp(ln_2(h))
    logits = lm_head(ln_f(h))                          # no bias, not tied to wte

``attn`` is causal multi-head self-attention, ``softmax(q k^T / sqrt(d_head) + mask) v`` with
q, k, v from one ``c_attn`` projection (in that order, head i owning channels
``i d_head .. (i+1) d_head - 1``), then ``c_proj``; ``mlp`` is ``c_proj(gelu_tanh(c_fc(x)))``
with a 4x wider hidden layer. LayerNorm eps is 1e-5 (PyTorch's). Parameters are named as the
book's PyTorch ``state_dict`` names them (``h_0/attn/c_attn`` for ``transformer.h.0.attn.c_attn``),
so :mod:`jaxdiff.music.state_dict` converts either way.

Generation (:func:`generate`) runs the prompt through the network once, keeping each layer's
keys and values in a cache, then one ``lax.scan`` step per new token that attends to the cache:
one token's work per step, where the book's loop reruns the whole prefix for every token.

Example::

    model = MusicTransformer()                                      # 20,363,264 parameters
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    logits = model.apply({"params": params}, tokens)                # [B, T] -> [B, T, 390]
    seq = generate(model, params, prompt, jax.random.key(1), num_tokens=1000, temperature=1.0)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.music.events import NUM_EVENTS, VOCAB_SIZE

LAYER_NORM_EPS = 1e-5
Cache = tuple[dict[str, jax.Array], ...]  # per layer {"k", "v"}: [B, H, S, D_head]


def _torch_uniform(fan_in: int):
    """PyTorch's ``nn.Linear`` initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _linear(features: int, fan_in: int, *, name: str, dtype: Any, use_bias: bool = True, kernel_init=None):
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=kernel_init or _torch_uniform(fan_in),
        bias_init=_torch_uniform(fan_in),
        name=name,
    )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, optionally reading and extending a key/value cache."""

    num_heads: int
    num_layers: int
    dropout_rate: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool, cache: dict[str, jax.Array] | None, offset):
        b, t, d = x.shape
        h = self.num_heads
        dh = d // h
        proj_init = nn.initializers.normal(0.02 / math.sqrt(2 * self.num_layers))
        qkv = _linear(3 * d, d, name="c_attn", dtype=self.dtype)(x)  # [B, T, 3D]
        q, k, v = (a.reshape(b, t, h, dh).transpose(0, 2, 1, 3) for a in jnp.split(qkv, 3, axis=-1))
        query_pos = offset + jnp.arange(t)
        if cache is None:
            key_pos = jnp.arange(t)
        else:
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, 0, offset, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, 0, offset, 0))
            cache = {"k": k, "v": v}
            key_pos = jnp.arange(k.shape[2])
        # Scores in float32; exp(s - max) @ v divided by the row sums afterwards is softmax
        # attention with one division per output instead of one per score (faster on CPU).
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(dh)
        s = jnp.where(key_pos[None, :] <= query_pos[:, None], s, -jnp.inf)
        p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        denom = jnp.sum(p, axis=-1, keepdims=True)
        p = nn.Dropout(self.dropout_rate)(p, deterministic=not train)
        y = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / denom
        y = y.astype(self.dtype).transpose(0, 2, 1, 3).reshape(b, t, d)
        y = _linear(d, d, name="c_proj", dtype=self.dtype, kernel_init=proj_init)(y)
        return nn.Dropout(self.dropout_rate)(y, deterministic=not train), cache


class MLP(nn.Module):
    num_layers: int
    dropout_rate: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        d = x.shape[-1]
        proj_init = nn.initializers.normal(0.02 / math.sqrt(2 * self.num_layers))
        x = _linear(4 * d, d, name="c_fc", dtype=self.dtype)(x)
        x = jax.nn.gelu(x, approximate=True)  # the tanh form, as the book's GELU
        x = _linear(d, 4 * d, name="c_proj", dtype=self.dtype, kernel_init=proj_init)(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=not train)


class Block(nn.Module):
    num_heads: int
    num_layers: int
    dropout_rate: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool, cache, offset):
        norm = functools.partial(nn.LayerNorm, epsilon=LAYER_NORM_EPS, dtype=self.dtype)
        a, cache = CausalSelfAttention(self.num_heads, self.num_layers, self.dropout_rate, self.dtype, name="attn")(
            norm(name="ln_1")(x), train=train, cache=cache, offset=offset
        )
        x = x + a
        x = x + MLP(self.num_layers, self.dropout_rate, self.dtype, name="mlp")(norm(name="ln_2")(x), train=train)
        return x, cache


class MusicTransformer(nn.Module):
    """The book's music Transformer: ``int32 [B, T]`` event ids -> ``float32 [B, T, vocab]`` logits.

    The defaults are the book's model (20,363,264 parameters): 6 pre-LN blocks of 8 heads,
    width 512, a 390-id vocabulary and 2048 learned positions, dropout 0.1 on the embeddings,
    attention probabilities, and each residual branch. The initialisation follows the book's
    (PyTorch defaults: uniform +-1/sqrt(fan_in) for linear layers, N(0, 1) for both embeddings;
    N(0, 0.02 / sqrt(2 num_layers)) for both ``c_proj`` weights).

    Attributes:
      dtype: computation dtype (parameters stay float32; logits are float32).

    Call:
      ``model.apply({"params": p}, tokens)``: inference (no dropout).
      ``model.apply({"params": p}, tokens, train=True, rngs={"dropout": key})``: training.
      ``model.apply({"params": p}, tokens, cache=cache, offset=i)``: tokens at positions
      ``i .. i+T-1`` attend to the cache (:func:`init_cache`) and are written into it;
      returns ``(logits, cache)``.
    """

    num_layers: int = 6
    num_heads: int = 8
    embed_dim: int = 512
    vocab_size: int = VOCAB_SIZE
    max_len: int = 2048
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, *, train: bool = False, cache: Cache | None = None, offset=0):
        t = tokens.shape[1]
        embed = functools.partial(nn.Embed, features=self.embed_dim, embedding_init=nn.initializers.normal(1.0))
        positions = offset + jnp.arange(t)
        h = embed(self.vocab_size, name="wte")(tokens) + embed(self.max_len, name="wpe")(positions)[None]
        h = nn.Dropout(self.dropout_rate)(h, deterministic=not train).astype(self.dtype)
        new_cache = []
        for i in range(self.num_layers):
            h, layer_cache = Block(self.num_heads, self.num_layers, self.dropout_rate, self.dtype, name=f"h_{i}")(
                h, train=train, cache=None if cache is None else cache[i], offset=offset
            )
            new_cache.append(layer_cache)
        h = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="ln_f")(h)
        logits = _linear(self.vocab_size, self.embed_dim, name="lm_head", dtype=self.dtype, use_bias=False)(h)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, tuple(new_cache))


def init_params(model: MusicTransformer, key: jax.Array) -> Any:
    """Random parameters of ``model`` (jitted: eager initialisation is slow)."""
    return jax.jit(model.init)(key, jnp.zeros((1, 1), jnp.int32))["params"]


def count_params(params: Any) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def init_cache(model: MusicTransformer, batch_size: int, length: int) -> Cache:
    """An empty key/value cache for ``length`` positions: per layer ``{"k", "v"}: [B, H, length, D_head]``."""
    shape = (batch_size, model.num_heads, length, model.embed_dim // model.num_heads)
    return tuple({"k": jnp.zeros(shape, model.dtype), "v": jnp.zeros(shape, model.dtype)} for _ in range(model.num_layers))


# ---------------------------------------------------------------------------------------------
# Generation.
# ---------------------------------------------------------------------------------------------


def next_token(logits: jax.Array, key: jax.Array, temperature: jax.Array, greedy: bool) -> jax.Array:
    """Draws from ``softmax(logits[:, :388] / temperature)`` (or takes its argmax): ``int32 [B]``.

    Only event ids are candidates: as in the book, ``end`` (388) and ``pad`` (389) are never
    drawn, so generation never stops early.
    """
    logits = logits[:, :NUM_EVENTS].astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def _check_generate_args(model: MusicTransformer, prompt: Any, num_tokens: int, temperature: float, greedy: bool):
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be integer event ids [batch, length >= 1]; got {prompt.dtype} {prompt.shape}.")
    if not isinstance(num_tokens, (int, np.integer)) or isinstance(num_tokens, bool) or num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens!r} must be an int >= 0.")
    total = prompt.shape[1] + int(num_tokens)
    if total > model.max_len:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + num_tokens={num_tokens} = {total} exceeds the model's "
            f"max_len={model.max_len} learned positions; shorten the prompt or generate fewer tokens."
        )
    if not greedy and not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0.")
    return prompt.astype(jnp.int32)


def generate(
    model: MusicTransformer,
    params: Any,
    prompt: jax.typing.ArrayLike,
    key: jax.Array,
    num_tokens: int = 1000,
    temperature: float = 1.0,
    greedy: bool = False,
) -> jax.Array:
    """Continues ``prompt`` by ``num_tokens`` events: ``int32 [B, P + num_tokens]``.

    Token ``P + i`` is drawn from ``softmax(logits[:388] / temperature)`` at position ``P + i - 1``
    with the key ``fold_in(key, P + i)`` (``greedy=True``: the argmax), exactly the book's
    sampling loop; but each step feeds only the newest token and reads every earlier key and
    value from a cache, so a step costs one token's work. One ``lax.scan`` inside one ``jit``,
    compiled once per (batch, prompt length, num_tokens, greedy); the temperature is traced.

    Args:
      model: the network (its ``max_len`` bounds ``P + num_tokens``).
      params: its parameters.
      prompt: ``int [B, P]`` event ids (``P >= 1``).
      key: a ``jax.random.key``; the same key gives the same tokens.
      num_tokens: new tokens to generate.
      temperature: divides the logits (> 0); ignored when ``greedy``.
      greedy: take the most likely event at every step.

    Example:
      >>> seq = generate(model, params, prompt[None], jax.random.key(0), num_tokens=1000, temperature=1.0)
      >>> decode_midi(seq[0], path="continuation.mid")
    """
    prompt = _check_generate_args(model, prompt, num_tokens, temperature, greedy)
    return _generate(model, params, prompt, key, jnp.float32(temperature), num_tokens=int(num_tokens), greedy=greedy)


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "greedy"))
def _generate(model, params, prompt, key, temperature, *, num_tokens: int, greedy: bool):
    b, p = prompt.shape
    if num_tokens == 0:
        return prompt
    cache = init_cache(model, b, p + num_tokens)
    logits, cache = model.apply({"params": params}, prompt, cache=cache, offset=0)
    first = next_token(logits[:, -1], jax.random.fold_in(key, p), temperature, greedy)

    def step(carry, position):  # feeds the token at `position`, draws the one after it
        token, cache = carry
        logits, cache = model.apply({"params": params}, token[:, None], cache=cache, offset=position)
        following = next_token(logits[:, -1], jax.random.fold_in(key, position + 1), temperature, greedy)
        return (following, cache), token

    (last, _), tokens = jax.lax.scan(step, (first, cache), p + jnp.arange(num_tokens - 1))
    return jnp.concatenate([prompt, tokens.T, last[:, None]], axis=1)


def generate_recompute(
    model: MusicTransformer,
    params: Any,
    prompt: jax.typing.ArrayLike,
    key: jax.Array,
    num_tokens: int = 1000,
    temperature: float = 1.0,
    greedy: bool = False,
) -> jax.Array:
    """The book's loop, for reference: every step reruns the network on the whole sequence.

    The sequence buffer is ``P + num_tokens`` long and filled with ``pad`` (389) past the
    tokens so far, as the book's; the network is causal, so the logits at position ``i - 1``
    see only tokens ``0 .. i - 1`` and this equals rerunning on the prefix alone. Same keys and
    draws as :func:`generate`; quadratic cost in the length.
    """
    prompt = _check_generate_args(model, prompt, num_tokens, temperature, greedy)
    return _generate_recompute(model, params, prompt, key, jnp.float32(temperature),
                               num_tokens=int(num_tokens), greedy=greedy)  # fmt: skip


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "greedy"))
def _generate_recompute(model, params, prompt, key, temperature, *, num_tokens: int, greedy: bool):
    b, p = prompt.shape
    seq = jnp.full((b, p + num_tokens), VOCAB_SIZE - 1, jnp.int32).at[:, :p].set(prompt)

    def step(position, seq):  # draws the token at `position`
        logits = model.apply({"params": params}, seq)
        row = jax.lax.dynamic_index_in_dim(logits, position - 1, axis=1, keepdims=False)
        token = next_token(row, jax.random.fold_in(key, position), temperature, greedy)
        return jax.lax.dynamic_update_slice(seq, token[:, None], (0, position))

    return jax.lax.fori_loop(p, p + num_tokens, step, seq)
