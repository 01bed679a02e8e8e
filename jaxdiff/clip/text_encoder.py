"""CLIP's text transformer as Hugging Face ``CLIPTextModel`` lays it out: the text encoder of
Stable Diffusion.

Latent diffusion (Rombach et al. 2022, arXiv:2112.10752) conditions its U-Net on the per-token
hidden states of a frozen CLIP text transformer (Radford et al. 2021, arXiv:2103.00020): SD 1.x
uses OpenAI's ViT-L/14 text tower (12 layers, width 768, QuickGELU), SD 2.x OpenCLIP ViT-H/14's
(width 1024, exact GELU) without its last layer, which is how the penultimate layer that SD 2.x
was trained on is stored in its ``text_encoder/`` folder.

::

    h_0 = token_embedding[ids] + position_embedding[0:T]
    h_l = h + MLP(LN_2(h)),  h = h_{l-1} + CausalSelfAttention(LN_1(h_{l-1}))    l = 1 .. L
    out = final_layer_norm(h_{L - skip_layers})          # [B, T, hidden_size]

``skip_layers = k`` is diffusers' ``clip_skip = k``: the output of layer ``L - k``, through the
final LayerNorm. Attention logits and softmax are float32 whatever ``dtype`` is, as are the
LayerNorm statistics.

The parameter tree mirrors transformers' module names (``encoder.layers.N`` ->
``encoder/layers_N``); :func:`text_encoder_params_from_torch` accepts state dicts with or without
the ``text_model.`` prefix (transformers v4 wrote it, v5 does not) and
:func:`text_encoder_params_to_torch` writes it (both versions read it).

Example:
    >>> import jax, jax.numpy as jnp
    >>> enc = CLIPTextEncoder(vocab_size=100, max_position_embeddings=8, hidden_size=32,
    ...                       intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    >>> ids = jnp.zeros((3, 8), jnp.int32)
    >>> params = enc.init(jax.random.key(0), ids)["params"]
    >>> enc.apply({"params": params}, ids, skip_layers=1).shape
    (3, 8, 32)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import hf_config
from jaxdiff.models.state_dicts import param_shapes, params_from_state_dict, params_to_state_dict

__all__ = [
    "CLIPTextEncoder",
    "text_encoder_param_shapes",
    "text_encoder_params_from_torch",
    "text_encoder_params_to_torch",
]

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI's CLIP (SD 1.x)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # OpenCLIP (SD 2.x)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
_LIST_MODULES = ("layers",)
_PREFIX = "text_model."
# Entries some checkpoints carry that hold no parameter.
_BUFFERS = ("embeddings.position_ids",)


class _Layer(nn.Module):
    """``CLIPEncoderLayer``: pre-LN causal self-attention and MLP, each residual."""

    hidden_size: int
    intermediate_size: int
    heads: int
    act: str
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        head_dim = x.shape[-1] // self.heads

        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=self.eps, use_fast_variance=False, dtype=self.dtype,
                                param_dtype=self.param_dtype, name=name)

        h = norm("layer_norm1")(x)
        attn = _SelfAttention(self.heads, head_dim, self.dtype, self.param_dtype, name="self_attn")
        x = x + attn(h)
        h = _Mlp(self.intermediate_size, self.act, self.dtype, self.param_dtype, name="mlp")(norm("layer_norm2")(x))
        return x + h


class _SelfAttention(nn.Module):
    heads: int
    head_dim: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape

        def dense(features: int, name: str) -> nn.Dense:
            return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        q, k, v = (dense(d, name)(x).reshape(b, t, self.heads, self.head_dim) for name in ("q_proj", "k_proj", "v_proj"))
        # Logits and softmax in float32 (jax promotes them), as transformers' eager attention does.
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return dense(d, "out_proj")(out.reshape(b, t, d))


class _Mlp(nn.Module):
    intermediate_size: int
    act: str
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        h = _ACTIVATIONS[self.act](h)
        return nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(h)


class _Embeddings(nn.Module):
    vocab_size: int
    max_positions: int
    hidden_size: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="token_embedding")(ids)
        positions = nn.Embed(self.max_positions, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="position_embedding")(jnp.arange(ids.shape[-1]))
        return tokens + positions[None]


class _Encoder(nn.Module):
    num_layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    act: str
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, run_layers: int) -> jax.Array:
        for i in range(run_layers):
            x = _Layer(self.hidden_size, self.intermediate_size, self.heads, self.act, self.eps, self.dtype,
                       self.param_dtype, name=f"layers_{i}")(x)
        return x


class CLIPTextEncoder(hf_config.ConfigMixin, nn.Module):
    """transformers' ``CLIPTextModel`` (no projection head): token ids -> hidden states.

    Attributes are the ``config.json`` keys of ``CLIPTextConfig`` that shape the network;
    :meth:`from_config` reads a config dict, :meth:`to_config` writes one that transformers loads.

    Call: ``enc.apply({"params": params}, ids, skip_layers=0)`` with int ``ids`` ``[B, T]``
    (``T <= max_position_embeddings``) returns ``[B, T, hidden_size]`` (in ``dtype``).
    """

    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_hidden_layers: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # jaxdiff options (not part of the transformers config).
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    config_class_name = "CLIPTextModel"

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> CLIPTextEncoder:
        """Build from a ``CLIPTextConfig`` dict (``text_encoder/config.json``); other keys are ignored.

        A full ``CLIPConfig`` (with ``text_config``) is accepted too. ``use_attention_mask`` (a
        padding mask some non-SD text encoders use) is not supported.

        Example:
            >>> CLIPTextEncoder.from_config({"hidden_size": 1024, "num_hidden_layers": 23,
            ...                              "hidden_act": "gelu"}).num_hidden_layers
            23
        """
        config = dict(config.get("text_config") or config)
        if config.get("use_attention_mask"):
            raise ValueError("text encoders with use_attention_mask=True are not supported")
        kwargs = {k: config[k] for k in cls.config_keys() if k in config}
        kwargs.update(overrides)
        module = cls(**kwargs)
        module.validate()
        return module

    def to_config(self) -> dict[str, Any]:
        """A ``CLIPTextConfig`` dict (``config.json``) for ``transformers.CLIPTextModel``."""
        config = {k: getattr(self, k) for k in self.config_keys()}
        config.update(architectures=[self.config_class_name], model_type="clip_text_model")
        return config

    def validate(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act={self.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")

    @nn.compact
    def __call__(self, ids: jax.Array, skip_layers: int = 0) -> jax.Array:
        """Hidden states ``[B, T, hidden_size]``: layer ``L - skip_layers``, then the final LayerNorm."""
        self.validate()
        if ids.ndim != 2 or ids.shape[-1] > self.max_position_embeddings:
            raise ValueError(f"ids must be [B, T] with T <= {self.max_position_embeddings}, got {ids.shape}")
        if not 0 <= skip_layers < self.num_hidden_layers:
            raise ValueError(f"skip_layers must be in [0, {self.num_hidden_layers}), got {skip_layers}")
        x = _Embeddings(self.vocab_size, self.max_position_embeddings, self.hidden_size, self.dtype,
                        self.param_dtype, name="embeddings")(ids.astype(jnp.int32))
        # Skipped layers are not run at all (their parameters stay in the tree, unused).
        x = _Encoder(self.num_hidden_layers, self.hidden_size, self.intermediate_size, self.num_attention_heads,
                     self.hidden_act, self.layer_norm_eps, self.dtype, self.param_dtype,
                     name="encoder")(x, self.num_hidden_layers - skip_layers)
        return nn.LayerNorm(epsilon=self.layer_norm_eps, use_fast_variance=False, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="final_layer_norm")(x)


def text_encoder_param_shapes(config: Mapping[str, Any] | CLIPTextEncoder) -> dict[str, Any]:
    """The parameter tree of a config as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    model = hf_config.as_module(CLIPTextEncoder, config)
    return param_shapes(model, jax.ShapeDtypeStruct((1, model.max_position_embeddings), jnp.int32))


def text_encoder_params_from_torch(
    state_dict: Mapping[str, Any],
    config: Mapping[str, Any] | CLIPTextEncoder,
    *,
    strict: bool = True,
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Flax params from a ``CLIPTextModel`` state dict, with or without the ``text_model.`` prefix.

    Example:
        >>> params = text_encoder_params_from_torch(hf_model.state_dict(), hf_model.config.to_dict())  # doctest: +SKIP
    """
    stripped = {}
    for key, value in state_dict.items():
        key = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if key not in _BUFFERS:
            stripped[key] = value
    return params_from_state_dict(stripped, text_encoder_param_shapes(config), list_modules=_LIST_MODULES,
                                  strict=strict, dtype=dtype, what="CLIPTextModel")


def text_encoder_params_to_torch(
    params: Mapping[str, Any],
    config: Mapping[str, Any] | CLIPTextEncoder,
    *,
    dtype: Any = np.float32,
    prefix: str = _PREFIX,
) -> dict[str, np.ndarray]:
    """The ``CLIPTextModel`` state dict (numpy arrays) of Flax params, keys prefixed ``prefix``."""
    state_dict = params_to_state_dict(params, text_encoder_param_shapes(config), list_modules=_LIST_MODULES,
                                      dtype=dtype, what="CLIPTextModel")
    return {prefix + k: v for k, v in state_dict.items()}
