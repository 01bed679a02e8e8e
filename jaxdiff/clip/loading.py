"""Load open_clip (and Hugging Face ``CLIPModel``) checkpoints into :class:`jaxdiff.clip.CLIP`.

Nothing is downloaded: give a local file (``.safetensors``, read with ``safetensors.numpy`` and
no torch; or ``.bin`` / ``.pt`` / ``.pth``, read with torch if it is installed), a folder holding
one, or an in-memory mapping of arrays. Both open_clip's state-dict layout
(https://github.com/mlfoundations/open_clip) and Hugging Face ``transformers``' ``CLIPModel``
layout (``vision_model.*`` / ``text_model.*``) are recognised.

Example:
    >>> import numpy as np
    >>> from jaxdiff.clip import CLIP, load_open_clip, to_open_clip_state_dict
    >>> cfg = {"embed_dim": 8,
    ...        "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8,
    ...                       "head_width": 8},
    ...        "text_cfg": {"context_length": 6, "vocab_size": 50, "width": 16, "heads": 2,
    ...                     "layers": 1}}
    >>> import jax, jax.numpy as jnp
    >>> model = CLIP.from_config(cfg)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
    ...                     jnp.zeros((1, 6), jnp.int32))["params"]
    >>> state_dict = to_open_clip_state_dict(params)  # what open_clip's CLIP.state_dict() holds
    >>> state_dict["visual.conv1.weight"].shape
    (16, 3, 8, 8)
    >>> model2, params2, tokenizer = load_open_clip(state_dict, cfg)
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .model import CLIP
from .tokenizer import Tokenizer

__all__ = [
    "from_open_clip_state_dict",
    "hf_to_open_clip_state_dict",
    "load_open_clip",
    "load_state_dict",
    "to_open_clip_state_dict",
]

Params = dict[str, Any]

_CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
)
# Keys present in some checkpoints that carry no parameter.
_IGNORED = re.compile(r"(^|\.)position_ids$|^input_resolution$|^context_length$|^vocab_size$|attn_mask$")


# --- naming ------------------------------------------------------------------------------------


def _torch_key(path: tuple[str, ...]) -> str:
    """open_clip state-dict key of the jaxdiff parameter at ``path``."""
    parts = list(path)
    if parts[0] == "text":
        parts = parts[1:]
    out: list[str] = []
    for i, p in enumerate(parts):
        m = re.fullmatch(r"resblocks_(\d+)", p)
        if m:
            out += ["resblocks", m.group(1)]
        elif p in ("c_fc", "c_proj"):
            out += ["mlp", p]
        elif p == "in_proj":
            out.append("in_proj_" + ("weight" if parts[i + 1] == "kernel" else "bias"))
            break
        elif p in ("kernel", "scale", "embedding"):
            out.append("weight")
        else:
            out.append(p)
    return ".".join(out)


def _to_jax_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T
    return x


def _to_torch_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T
    return x


def _param_shapes(model: CLIP) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32),
        jnp.zeros((1, model.context_length), jnp.int32),
    )["params"]
    flat = jax.tree.flatten_with_path(shapes)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in flat}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> Params:
    out: Params = {}
    for path, value in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


# --- conversion ----------------------------------------------------------------------------------


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu()
        if x.is_floating_point():
            import torch

            x = x.to(torch.float32)
        return x.numpy()
    return np.asarray(x)


def _strip_wrappers(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def from_open_clip_state_dict(
    state_dict: Mapping[str, Any], model: CLIP, *, dtype: Any = jnp.float32
) -> Params:
    """jaxdiff params for ``model`` from an open_clip ``CLIP.state_dict()`` (numpy or torch).

    Raises ``ValueError`` naming every missing key, unexpected key and shape mismatch.
    """
    state_dict = {k: v for k, v in _strip_wrappers(state_dict).items() if not _IGNORED.search(k)}
    expected = _param_shapes(model)
    by_key = {_torch_key(path): path for path in expected}
    missing = sorted(set(by_key) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(by_key))
    flat: dict[tuple[str, ...], jax.Array] = {}
    mismatched: list[str] = []
    for key, path in by_key.items():
        if key not in state_dict:
            continue
        value = _to_jax_layout(path, _as_numpy(state_dict[key]))
        if value.shape != expected[path].shape:
            mismatched.append(f"{key}: checkpoint {value.shape} vs model {expected[path].shape}")
            continue
        flat[path] = jnp.asarray(value, dtype=dtype)
    if missing or unexpected or mismatched:
        lines = ["open_clip state dict does not match the CLIP config:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:20])}")
        lines.append("  (is `config` the model the checkpoint was trained with?)")
        raise ValueError("\n".join(lines))
    return _unflatten(flat)


def to_open_clip_state_dict(params: Params) -> dict[str, np.ndarray]:
    """open_clip ``CLIP.state_dict()`` layout (numpy arrays) of jaxdiff ``params``.

    ``torch.nn.Module.load_state_dict({k: torch.from_numpy(v) ...})`` on the matching open_clip
    model accepts it with ``strict=True``.
    """
    flat = jax.tree.flatten_with_path(params)[0]
    out: dict[str, np.ndarray] = {}
    for path, leaf in flat:
        names = tuple(k.key for k in path)
        out[_torch_key(names)] = np.array(_to_torch_layout(names, np.asarray(leaf)), order="C")
    return out


_HF_RENAMES = [
    (r"^vision_model\.embeddings\.class_embedding$", "visual.class_embedding"),
    (r"^vision_model\.embeddings\.patch_embedding\.weight$", "visual.conv1.weight"),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.positional_embedding"),
    (r"^vision_model\.pre_layrnorm\.", "visual.ln_pre."),
    (r"^vision_model\.post_layernorm\.", "visual.ln_post."),
    (r"^vision_model\.encoder\.layers\.", "visual.transformer.resblocks."),
    (r"^text_model\.embeddings\.token_embedding\.weight$", "token_embedding.weight"),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^text_model\.encoder\.layers\.", "transformer.resblocks."),
    (r"^text_model\.final_layer_norm\.", "ln_final."),
    (r"\.self_attn\.out_proj\.", ".attn.out_proj."),
    (r"\.layer_norm1\.", ".ln_1."),
    (r"\.layer_norm2\.", ".ln_2."),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."),
    (r"\.mlp\.fc2\.", ".mlp.c_proj."),
]


def _is_hf_layout(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in state_dict)


def hf_to_open_clip_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Rename a Hugging Face ``transformers`` ``CLIPModel`` state dict to open_clip's layout.

    Separate q/k/v projections are packed into ``in_proj_weight`` / ``in_proj_bias`` (q, k, v
    order) and the projection matrices are transposed. Raises ``ValueError`` on keys it does not
    know.
    """
    out: dict[str, np.ndarray] = {}
    qkv: dict[str, dict[str, np.ndarray]] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if _IGNORED.search(key):
            continue
        value = _as_numpy(value)
        if key == "logit_scale":
            out[key] = value.reshape(())
            continue
        if key == "visual_projection.weight":
            out["visual.proj"] = value.T
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T
            continue
        new = key
        for pat, rep in _HF_RENAMES:
            new = re.sub(pat, rep, new)
        m = re.fullmatch(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)", new)
        if m:
            qkv.setdefault(f"{m.group(1)}.attn.in_proj_{m.group(3)}", {})[m.group(2)] = value
            continue
        if new == key:
            unknown.append(key)
            continue
        out[new] = value
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"Hugging Face CLIP state dict lacks some of q/k/v for {key}")
        out[key] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    if unknown:
        raise ValueError(
            f"Unexpected keys in Hugging Face CLIP state dict ({len(unknown)}): "
            f"{', '.join(sorted(unknown)[:20])}"
        )
    return out


# --- files ---------------------------------------------------------------------------------------


def _missing_file_error(path: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"CLIP checkpoint not found at {path!r}. jaxdiff never downloads weights: place an "
        "open_clip checkpoint there (for example `open_clip_model.safetensors` or "
        "`open_clip_pytorch_model.bin` from the model's open_clip / Hugging Face hub page, or "
        "OpenAI's `ViT-B-32.pt`), or a Hugging Face `CLIPModel` `model.safetensors`, and pass "
        "the file (or its folder) to `load_open_clip`."
    )


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a checkpoint file (or a folder with one) into a dict of numpy arrays.

    ``.safetensors`` needs only the ``safetensors`` package; ``.bin`` / ``.pt`` / ``.pth`` need
    torch (OpenAI's TorchScript archives included).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in _CHECKPOINT_NAMES:
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise _missing_file_error(os.path.join(path, _CHECKPOINT_NAMES[0]))
    if not os.path.isfile(path):
        raise _missing_file_error(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except (TypeError, ValueError) as numpy_error:  # e.g. bfloat16 has no numpy dtype
            try:
                from safetensors.torch import load_file as torch_load_file
            except ImportError:
                raise ValueError(
                    f"Cannot read {path!r} with safetensors.numpy ({numpy_error}); install torch "
                    "to read it through safetensors.torch."
                ) from numpy_error
            return {k: _as_numpy(v) for k, v in torch_load_file(path).items()}
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading {os.path.basename(path)!r} needs PyTorch (`pip install torch`); a "
            "`.safetensors` checkpoint can be read without it."
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError:  # OpenAI's original checkpoints are TorchScript archives.
        obj = torch.jit.load(path, map_location="cpu").state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"{path!r} does not hold a state dict (got {type(obj).__name__})")
    return {k: _as_numpy(v) for k, v in _strip_wrappers(obj).items() if hasattr(v, "shape")}


def load_open_clip(
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    config: str | Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
) -> tuple[CLIP, Params, Tokenizer]:
    """Load an open_clip CLIP checkpoint: returns ``(model, params, tokenizer)``.

    Args:
        path_or_state_dict: a ``.safetensors`` / ``.bin`` / ``.pt`` file, a folder holding one,
            or a mapping of arrays (numpy or torch), in open_clip or Hugging Face layout.
        config: an open_clip model name (``"ViT-B-32"``; see
            :func:`jaxdiff.clip.list_models`) or an open_clip config dict. OpenAI's released
            weights were trained with QuickGELU: use the ``-quickgelu`` names for them.
        dtype: parameter (and computation) dtype.

    Example:
        >>> model, params, tokenizer = load_open_clip(  # doctest: +SKIP
        ...     "weights/open_clip_model.safetensors", "ViT-B-32-quickgelu")
        >>> feats = model.apply({"params": params}, tokenizer(["a cat"]),  # doctest: +SKIP
        ...                     method="encode_text")
    """
    model = CLIP.from_config(config, dtype=dtype)
    if isinstance(path_or_state_dict, Mapping):
        state_dict = _strip_wrappers(path_or_state_dict)
    else:
        state_dict = load_state_dict(path_or_state_dict)
    if _is_hf_layout(state_dict):
        state_dict = hf_to_open_clip_state_dict(state_dict)
    elif "input_resolution" in state_dict and not model.quick_gelu:
        warnings.warn(
            "This looks like an OpenAI CLIP checkpoint, which was trained with QuickGELU, but the "
            "config has quick_gelu=False; use the '-quickgelu' config for faithful features.",
            UserWarning,
            stacklevel=2,
        )
    params = from_open_clip_state_dict(state_dict, model, dtype=dtype)
    return model, params, Tokenizer(context_length=model.context_length)
