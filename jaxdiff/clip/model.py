"""CLIP's vision and text transformers as Flax Linen modules, configured like open_clip.

Architecture of Radford et al. (2021), "Learning Transferable Visual Models From Natural Language
Supervision" (https://arxiv.org/abs/2103.00020), with the parameter layout and configuration
format of open_clip (Ilharco et al., 2021, https://github.com/mlfoundations/open_clip), so that
open_clip checkpoints load with a pure renaming (see :mod:`jaxdiff.clip.loading`).

Images are NHWC, already resized to ``image_size`` and normalised with
:data:`OPENAI_DATASET_MEAN` / :data:`OPENAI_DATASET_STD`; text is int token ids from
:class:`jaxdiff.clip.Tokenizer`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxdiff.clip import CLIP
    >>> cfg = {"embed_dim": 16,
    ...        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
    ...                       "head_width": 16},
    ...        "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2,
    ...                     "layers": 1}}
    >>> model = CLIP.from_config(cfg)
    >>> images, text = jnp.zeros((2, 32, 32, 3)), jnp.ones((3, 8), jnp.int32)
    >>> params = model.init(jax.random.key(0), images, text)["params"]
    >>> img, txt, scale = model.apply({"params": params}, images, text)
    >>> img.shape, txt.shape
    ((2, 16), (3, 16))
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "CLIP",
    "MODEL_CONFIGS",
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
    "ResidualAttentionBlock",
    "TextTransformer",
    "Transformer",
    "VisionTransformer",
    "get_model_config",
    "list_models",
]

OPENAI_DATASET_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel RGB mean of CLIP's training images (inputs in [0, 1])."""
OPENAI_DATASET_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel RGB standard deviation of CLIP's training images (inputs in [0, 1])."""

_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which open_clip uses.


def _load_bundled_configs() -> dict[str, dict[str, Any]]:
    text = importlib.resources.files(__package__).joinpath("model_configs.json").read_text()
    return json.loads(text)


MODEL_CONFIGS: Mapping[str, Mapping[str, Any]] = _load_bundled_configs()
"""open_clip model configs bundled with jaxdiff (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14`` and
their ``-quickgelu`` variants, which OpenAI's released weights need)."""


def list_models() -> list[str]:
    """Names of the bundled open_clip configs."""
    return sorted(MODEL_CONFIGS)


def get_model_config(name: str) -> dict[str, Any]:
    """A (deep) copy of the bundled open_clip config ``name``.

    Example:
        >>> get_model_config("ViT-B-32")["vision_cfg"]["patch_size"]
        32
    """
    if name not in MODEL_CONFIGS:
        raise KeyError(f"Unknown CLIP config {name!r}; bundled: {', '.join(list_models())}")
    return copy.deepcopy(dict(MODEL_CONFIGS[name]))


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI's ``x * sigmoid(1.702 x)`` approximation of GELU."""
    return x * jax.nn.sigmoid(1.702 * x)


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=_LN_EPS, use_fast_variance=False, dtype=dtype, name=name)


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` (packed q/k/v projection) via ``jax.nn.dot_product_attention``."""

    width: int
    heads: int
    causal: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        head_dim = self.width // self.heads
        qkv = nn.Dense(3 * self.width, dtype=self.dtype, name="in_proj")(x)
        q, k, v = jnp.split(qkv.reshape(b, t, 3, self.heads, head_dim), 3, axis=2)
        out = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], is_causal=self.causal)
        return nn.Dense(self.width, dtype=self.dtype, name="out_proj")(out.reshape(b, t, self.width))


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    width: int
    heads: int
    mlp_ratio: float = 4.0
    quick_gelu: bool = False
    causal: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + MultiheadAttention(self.width, self.heads, self.causal, self.dtype, name="attn")(
            _layer_norm("ln_1", self.dtype)(x)
        )
        h = _layer_norm("ln_2", self.dtype)(x)
        h = nn.Dense(int(self.width * self.mlp_ratio), dtype=self.dtype, name="c_fc")(h)
        h = quick_gelu(h) if self.quick_gelu else jax.nn.gelu(h, approximate=False)
        return x + nn.Dense(self.width, dtype=self.dtype, name="c_proj")(h)


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` named ``resblocks_{i}``."""

    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    quick_gelu: bool = False
    causal: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.layers):
            x = ResidualAttentionBlock(
                self.width, self.heads, self.mlp_ratio, self.quick_gelu, self.causal, self.dtype,
                name=f"resblocks_{i}",
            )(x)
        return x


class VisionTransformer(nn.Module):
    """CLIP's ViT image tower (open_clip ``VisionTransformer``, ``pool_type="tok"``).

    Patchify with a bias-free conv, prepend the class token, add learned positional embeddings,
    ``ln_pre``, transformer, ``ln_post`` on the class token, then project to ``output_dim``.
    Input ``[B, image_size, image_size, 3]`` (normalised), output ``[B, output_dim]``.
    """

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    mlp_ratio: float = 4.0
    quick_gelu: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, _ = images.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"CLIP vision tower expects {self.image_size}x{self.image_size} images, got {h}x{w}"
            )
        grid = self.image_size // self.patch_size
        scale = self.width**-0.5
        x = nn.Conv(
            self.width, (self.patch_size, self.patch_size), strides=self.patch_size,
            padding="VALID", use_bias=False, dtype=self.dtype, name="conv1",
        )(images)
        x = x.reshape(b, grid * grid, self.width)
        cls = self.param("class_embedding", nn.initializers.normal(scale), (self.width,))
        pos = self.param(
            "positional_embedding", nn.initializers.normal(scale), (grid * grid + 1, self.width)
        )
        cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
        x = _layer_norm("ln_pre", self.dtype)(x)
        x = Transformer(
            self.width, self.layers, self.heads, self.mlp_ratio, self.quick_gelu, False, self.dtype,
            name="transformer",
        )(x)
        pooled = _layer_norm("ln_post", self.dtype)(x[:, 0])
        proj = self.param("proj", nn.initializers.normal(scale), (self.width, self.output_dim))
        return pooled @ proj.astype(pooled.dtype)


class TextTransformer(nn.Module):
    """CLIP's causal text tower; pools the features at the EOT token (argmax of the ids).

    Input int ids ``[B, context_length]``, output ``[B, output_dim]``. Parameter names follow
    open_clip's ``CLIP``, whose text tower lives at the model's top level (here under ``text``).
    """

    context_length: int
    vocab_size: int
    width: int
    heads: int
    layers: int
    output_dim: int
    mlp_ratio: float = 4.0
    quick_gelu: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, text: jax.Array) -> jax.Array:
        if text.shape[-1] != self.context_length:
            raise ValueError(
                f"CLIP text tower expects {self.context_length} tokens per text, "
                f"got {text.shape[-1]}; tokenize with context_length={self.context_length}"
            )
        x = nn.Embed(
            self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
            dtype=self.dtype, name="token_embedding",
        )(text)
        pos = self.param(
            "positional_embedding", nn.initializers.normal(0.01), (self.context_length, self.width)
        )
        x = x + pos.astype(x.dtype)
        x = Transformer(
            self.width, self.layers, self.heads, self.mlp_ratio, self.quick_gelu, True, self.dtype,
            name="transformer",
        )(x)
        x = _layer_norm("ln_final", self.dtype)(x)
        eot = jnp.argmax(text, axis=-1)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        proj = self.param(
            "text_projection", nn.initializers.normal(self.width**-0.5), (self.width, self.output_dim)
        )
        return pooled @ proj.astype(pooled.dtype)


_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
_VISION_DEFAULTS: dict[str, Any] = {
    "head_width": 64, "mlp_ratio": 4.0, "patch_dropout": 0.0, "ls_init_value": None,
    "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
    "final_ln_after_pool": False, "pool_type": "tok", "output_tokens": False,
    "act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "timm_model_name": None,
}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_TEXT_DEFAULTS: dict[str, Any] = {
    "mlp_ratio": 4.0, "ls_init_value": None, "embed_cls": False, "pad_id": 0,
    "no_causal_mask": False, "final_ln_after_pool": False, "pool_type": "argmax",
    "proj_bias": False, "proj_type": "linear", "output_tokens": False, "act_kwargs": None,
    "norm_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
    "hf_model_name": None, "hf_tokenizer_name": None, "tokenizer_mode": None,
    "tokenizer_kwargs": None, "eos_id": 2,
}
# Keys that only matter for training or for open_clip's factory, never for the forward pass.
_IGNORED_KEYS = {"patch_dropout", "hf_model_pretrained", "timm_model_pretrained", "eos_id",
                 "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "pad_id"}


def _check_cfg(cfg: Mapping[str, Any], known: set[str], defaults: dict[str, Any], where: str) -> None:
    for key, value in cfg.items():
        if key in known or key in _IGNORED_KEYS:
            continue
        if key in defaults and value == defaults[key]:
            continue
        raise NotImplementedError(
            f"open_clip option {where}.{key}={value!r} is not supported by jaxdiff.clip "
            f"(only the plain OpenAI ViT/text transformer is); supported keys: {sorted(known)}"
        )


class CLIP(nn.Module):
    """CLIP (Radford et al., 2021) with open_clip's ViT image tower and causal text tower.

    Build it from an open_clip config with :meth:`from_config`. Methods (use with
    ``model.apply(..., method=...)``):

    * ``encode_image(images, normalize=False)``: NHWC normalised images -> ``[B, embed_dim]``;
    * ``encode_text(text, normalize=False)``: int ids ``[B, context_length]`` -> ``[B, embed_dim]``;
    * ``__call__(images, text)``: ``(image_features, text_features, logit_scale)`` with
      L2-normalised features and ``logit_scale`` already exponentiated, as open_clip's forward;
      ``logit_scale * image_features @ text_features.T`` are the image-to-text logits.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = CLIP.from_config("ViT-B-32")
        >>> shapes = jax.eval_shape(model.init, jax.random.key(0),
        ...                         jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 77), jnp.int32))
        >>> sum(x.size for x in jax.tree.leaves(shapes))
        151277313
    """

    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    context_length: int
    vocab_size: int
    text_width: int
    text_heads: int
    text_layers: int
    vision_mlp_ratio: float = 4.0
    text_mlp_ratio: float = 4.0
    quick_gelu: bool = False
    dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, config: str | Mapping[str, Any], *, dtype: Any = jnp.float32) -> CLIP:
        """Build from an open_clip model name (bundled config) or an open_clip config dict.

        The dict has ``embed_dim``, ``vision_cfg`` (``image_size``, ``layers``, ``width``,
        ``patch_size``, optional ``head_width``=64, ``mlp_ratio``=4), ``text_cfg``
        (``context_length``, ``vocab_size``, ``width``, ``heads``, ``layers``, optional
        ``mlp_ratio``) and optional ``quick_gelu`` (False). Options that change the
        architecture in ways not implemented here raise ``NotImplementedError``.
        """
        cfg = get_model_config(config) if isinstance(config, str) else dict(config)
        extra = set(cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text"}
        if extra:
            raise NotImplementedError(f"Unsupported open_clip config keys: {sorted(extra)}")
        v, t = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
        _check_cfg(v, _VISION_KEYS, _VISION_DEFAULTS, "vision_cfg")
        _check_cfg(t, _TEXT_KEYS, _TEXT_DEFAULTS, "text_cfg")
        if isinstance(v["layers"], (list, tuple)):
            raise NotImplementedError("ModifiedResNet vision towers (tuple `layers`) are not supported")
        head_width = v.get("head_width", 64)
        if v["width"] % head_width:
            raise ValueError(f"vision width {v['width']} is not a multiple of head_width {head_width}")
        image_size, patch_size = v["image_size"], v["patch_size"]
        if not isinstance(image_size, int) or not isinstance(patch_size, int):
            raise NotImplementedError("Only square images and patches (int sizes) are supported")
        return cls(
            embed_dim=cfg["embed_dim"],
            image_size=image_size,
            patch_size=patch_size,
            vision_width=v["width"],
            vision_layers=v["layers"],
            vision_heads=v["width"] // head_width,
            vision_mlp_ratio=v.get("mlp_ratio", 4.0),
            context_length=t.get("context_length", 77),
            vocab_size=t.get("vocab_size", 49408),
            text_width=t["width"],
            text_heads=t["heads"],
            text_layers=t["layers"],
            text_mlp_ratio=t.get("mlp_ratio", 4.0),
            quick_gelu=bool(cfg.get("quick_gelu", False)),
            dtype=dtype,
        )

    def setup(self) -> None:
        self.visual = VisionTransformer(
            image_size=self.image_size, patch_size=self.patch_size, width=self.vision_width,
            layers=self.vision_layers, heads=self.vision_heads, output_dim=self.embed_dim,
            mlp_ratio=self.vision_mlp_ratio, quick_gelu=self.quick_gelu, dtype=self.dtype,
        )
        self.text = TextTransformer(
            context_length=self.context_length, vocab_size=self.vocab_size, width=self.text_width,
            heads=self.text_heads, layers=self.text_layers, output_dim=self.embed_dim,
            mlp_ratio=self.text_mlp_ratio, quick_gelu=self.quick_gelu, dtype=self.dtype,
        )
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(math.log(1 / 0.07)), ()
        )

    def encode_image(self, images: jax.Array, normalize: bool = False) -> jax.Array:
        """Image features ``[B, embed_dim]`` of normalised NHWC ``images``."""
        x = self.visual(images)
        return _l2_normalize(x) if normalize else x

    def encode_text(self, text: jax.Array, normalize: bool = False) -> jax.Array:
        """Text features ``[B, embed_dim]`` of token ids ``text``."""
        x = self.text(text)
        return _l2_normalize(x) if normalize else x

    def __call__(self, images: jax.Array, text: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        image_features = self.encode_image(images, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        return image_features, text_features, jnp.exp(self.logit_scale)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``torch.nn.functional.normalize``: ``x / max(||x||, eps)`` along the last axis."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)
