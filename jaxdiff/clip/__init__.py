"""CLIP in JAX: open_clip-compatible models, tokenizer, checkpoint loading and guidance loss.

CLIP (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language
Supervision", https://arxiv.org/abs/2103.00020) as Flax Linen modules laid out and configured like
open_clip (Ilharco et al., 2021, https://github.com/mlfoundations/open_clip), so open_clip
checkpoints load by renaming alone. Nothing is downloaded at run time: the BPE vocabulary ships
with jaxdiff, and weights come from a local file.

* :class:`CLIP` (``CLIP.from_config("ViT-B-32")``), :class:`VisionTransformer`,
  :class:`TextTransformer`; bundled configs :func:`list_models` / :func:`get_model_config`.
* :class:`Tokenizer` / :func:`tokenize`: token ids identical to open_clip's.
* :func:`load_open_clip`: ``(model, params, tokenizer)`` from a ``.safetensors`` / ``.bin`` /
  ``.pt`` file or a state dict (open_clip or Hugging Face layout);
  :func:`from_open_clip_state_dict` / :func:`to_open_clip_state_dict` convert both ways.
* :func:`clip_loss`: the spherical-distance CLIP guidance loss of ``x0_pred`` for a prompt.
* :class:`CLIPTextEncoder`: the text tower as transformers' ``CLIPTextModel`` lays it out (Stable
  Diffusion's text encoder), with its converters; :meth:`Tokenizer.from_pretrained` reads a
  Hugging Face ``CLIPTokenizer`` folder.

Example:
    >>> import jax
    >>> from jaxdiff.clip import load_open_clip, clip_loss
    >>> model, params, tokenizer = load_open_clip("ViT-B-32.safetensors", "ViT-B-32")  # doctest: +SKIP
    >>> text = model.apply({"params": params}, tokenizer(["a cat"]), method="encode_text")  # doctest: +SKIP
    >>> loss_fn = clip_loss(model, params, "a cat", key=jax.random.key(0))  # doctest: +SKIP
"""

from .loading import (
    from_open_clip_state_dict,
    hf_to_open_clip_state_dict,
    load_open_clip,
    load_state_dict,
    to_open_clip_state_dict,
)
from .loss import clip_loss, make_cutouts, normalize_images, spherical_distance
from .model import (
    CLIP,
    MODEL_CONFIGS,
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    TextTransformer,
    VisionTransformer,
    get_model_config,
    list_models,
)
from .text_encoder import CLIPTextEncoder, text_encoder_params_from_torch, text_encoder_params_to_torch
from .tokenizer import DEFAULT_CONTEXT_LENGTH, Tokenizer, tokenize

__all__ = [
    "CLIP",
    "CLIPTextEncoder",
    "DEFAULT_CONTEXT_LENGTH",
    "MODEL_CONFIGS",
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
    "TextTransformer",
    "Tokenizer",
    "VisionTransformer",
    "clip_loss",
    "from_open_clip_state_dict",
    "get_model_config",
    "hf_to_open_clip_state_dict",
    "list_models",
    "load_open_clip",
    "load_state_dict",
    "make_cutouts",
    "normalize_images",
    "spherical_distance",
    "text_encoder_params_from_torch",
    "text_encoder_params_to_torch",
    "to_open_clip_state_dict",
    "tokenize",
]
