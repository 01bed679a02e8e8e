"""PyTorch state dicts <-> Flax parameter trees, for modules whose Flax names mirror PyTorch's.

The ports of diffusers' and transformers' networks in jaxdiff name every submodule as PyTorch
does, with the ``.N`` of a ``ModuleList`` written ``_N`` (``down_blocks.0.resnets.1.conv1.weight``
is ``params["down_blocks_0"]["resnets_1"]["conv1"]["kernel"]``), so converting is mechanical:

* names: ``<list>_<N>`` -> ``<list>.<N>`` for the list modules a model declares; the leaf
  ``kernel`` / ``scale`` / ``embedding`` -> ``weight``, ``bias`` -> ``bias``;
* layouts: convolution kernels OIHW <-> HWIO, linear weights ``(out, in)`` <-> ``(in, out)``;
  a 1x1 convolution weight ``(out, in, 1, 1)`` loads into a linear layer (old checkpoints
  stored some projections that way).

:func:`read_state_dict` reads the weights file(s) of a diffusers / transformers model folder and
:func:`rename_legacy_attention` the pre-2023 attention names of diffusers checkpoints.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> class Net(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(3, name="layers_0")(x)
    >>> shapes = jax.eval_shape(Net().init, jax.random.key(0), jnp.zeros((1, 2)))["params"]
    >>> sd = params_to_state_dict({"layers_0": {"kernel": np.ones((2, 3)), "bias": np.zeros(3)}},
    ...                           shapes, list_modules=("layers",))
    >>> sorted((k, v.shape) for k, v in sd.items())
    [('layers.0.bias', (3,)), ('layers.0.weight', (3, 2))]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxdiff.models.hf_config import read_json

__all__ = [
    "param_shapes",
    "params_from_state_dict",
    "params_to_state_dict",
    "read_state_dict",
    "rename_legacy_attention",
    "to_numpy",
    "torch_key",
]

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def _list_re(list_modules: Iterable[str]) -> re.Pattern[str]:
    return re.compile(rf"^({'|'.join(sorted(set(list_modules)))})_(\d+)$")


def torch_key(path: tuple[str, ...], list_modules: Iterable[str]) -> str:
    """The PyTorch state-dict key of the Flax parameter at ``path``.

    Example:
        >>> torch_key(("down_blocks_0", "resnets_1", "conv1", "kernel"), ("down_blocks", "resnets"))
        'down_blocks.0.resnets.1.conv1.weight'
    """
    pattern = _list_re(list_modules)
    parts = []
    for part in path[:-1]:
        m = pattern.match(part)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else part)
    parts.append("bias" if path[-1] == "bias" else "weight")
    return ".".join(parts)


def to_numpy(value: Any) -> np.ndarray:
    """A numpy array of ``value`` (torch tensors included; bfloat16 tensors become float32)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _to_flax(leaf: str, array: np.ndarray, ndim: int) -> np.ndarray:
    if leaf != "kernel":
        return array
    if ndim == 2 and array.ndim == 4 and array.shape[2:] == (1, 1):
        array = array[:, :, 0, 0]  # a 1x1 convolution stored for a linear layer
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if array.ndim == 2:
        return array.T  # (out, in) -> (in, out)
    return array


def _to_torch(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def params_from_state_dict(
    state_dict: Mapping[str, Any],
    shapes: Mapping[str, Any],
    *,
    list_modules: Iterable[str],
    strict: bool = True,
    dtype: Any = np.float32,
    what: str = "model",
) -> dict[str, Any]:
    """Flax params (numpy arrays) for the tree ``shapes`` from a PyTorch ``state_dict``.

    Args:
        state_dict: PyTorch names -> arrays (numpy or torch).
        shapes: the Flax parameter tree, e.g. from ``jax.eval_shape(model.init, ...)``.
        list_modules: the names of the ``ModuleList`` attributes (``"down_blocks"``, ...).
        strict: raise on entries of ``state_dict`` that the tree does not use.
        dtype: numpy dtype of the result.
        what: the model's name in error messages.

    Raises:
        KeyError: missing keys (always) and unexpected keys (with ``strict``), named.
        ValueError: shape mismatches, named.
    """
    flat_shapes = traverse_util.flatten_dict(dict(shapes))
    remaining = {k: to_numpy(v) for k, v in state_dict.items()}
    flat, missing, mismatched = {}, [], []
    for path, spec in flat_shapes.items():
        key = torch_key(path, list_modules)
        if key not in remaining:
            missing.append(key)
            continue
        array = _to_flax(path[-1], remaining.pop(key), len(spec.shape))
        if tuple(array.shape) != tuple(spec.shape):
            mismatched.append(f"{key}: checkpoint {array.shape} (as Flax) vs model {tuple(spec.shape)}")
            continue
        flat[path] = np.asarray(array, dtype=dtype)
    if missing:
        raise KeyError(f"{what} state dict is missing {len(missing)} parameters of the config: {_summarise(missing)}")
    if mismatched:
        raise ValueError(f"{what} state dict shapes do not match the config: " + "; ".join(mismatched[:8]))
    if strict and remaining:
        raise KeyError(
            f"{what} state dict has {len(remaining)} entries the config does not use (pass strict=False to "
            f"ignore): {_summarise(sorted(remaining))}"
        )
    return traverse_util.unflatten_dict(flat)


def params_to_state_dict(
    params: Mapping[str, Any],
    shapes: Mapping[str, Any],
    *,
    list_modules: Iterable[str],
    dtype: Any = np.float32,
    what: str = "model",
) -> dict[str, np.ndarray]:
    """The PyTorch state dict (numpy arrays) of Flax ``params``, checked against ``shapes``.

    Raises:
        KeyError: when the trees differ (missing or unexpected paths, named).
        ValueError: for shape mismatches.
    """
    expected = traverse_util.flatten_dict(dict(shapes))
    flat = traverse_util.flatten_dict(dict(params))
    missing = sorted("/".join(p) for p in expected.keys() - flat.keys())
    unexpected = sorted("/".join(p) for p in flat.keys() - expected.keys())
    if missing or unexpected:
        raise KeyError(
            f"{what} params do not match the config: missing [{_summarise(missing)}], unexpected "
            f"[{_summarise(unexpected)}]"
        )
    state_dict = {}
    for path, spec in expected.items():
        array = np.asarray(jax.device_get(flat[path]))
        if tuple(array.shape) != tuple(spec.shape):
            raise ValueError(f"{'/'.join(path)}: shape {array.shape} but the config needs {tuple(spec.shape)}")
        state_dict[torch_key(path, list_modules)] = np.ascontiguousarray(_to_torch(path[-1], array).astype(dtype))
    return state_dict


def param_shapes(module: Any, *inputs: Any) -> dict[str, Any]:
    """The parameter tree ``module.init`` makes for ``inputs``, as ``jax.ShapeDtypeStruct`` leaves.

    Nothing is allocated: ``inputs`` may be ``jax.ShapeDtypeStruct`` (or None for an absent
    optional argument).
    """
    return jax.eval_shape(lambda *args: module.init(jax.random.key(0), *args), *inputs)["params"]


def rename_legacy_attention(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename diffusers' pre-2023 attention keys (``query``/``key``/``value``/``proj_attn``) to today's.

    Example:
        >>> list(rename_legacy_attention({"mid_block.attentions.0.proj_attn.bias": 0}))
        ['mid_block.attentions.0.to_out.0.bias']
    """
    renamed = {}
    for key, value in state_dict.items():
        m = _LEGACY_RE.match(key)
        if m:
            key = f"{m.group(1)}.{_LEGACY_ATTENTION[m.group(2)]}.{m.group(3)}"
        renamed[key] = value
    return renamed


def read_state_dict(
    folder: str | Path, stem: str = "diffusion_pytorch_model", *, hint: str = ""
) -> dict[str, np.ndarray]:
    """The weights of a model folder as numpy arrays.

    Looks for ``<stem>.safetensors`` (single or sharded through ``<stem>.safetensors.index.json``),
    then a legacy ``.bin`` pickle (``pytorch_model.bin`` for transformers' ``model`` stem; reading
    it needs PyTorch), each also as the ``.fp16`` variant. bfloat16 tensors become float32.

    Args:
        folder: the model folder (``unet/``, ``vae/``, ``text_encoder/``, a bare model folder).
        stem: ``"diffusion_pytorch_model"`` (diffusers) or ``"model"`` (transformers).
        hint: appended to the ``FileNotFoundError`` when there are no weights.

    Example:
        >>> state_dict = read_state_dict("checkpoints/stable-diffusion-v1-5/text_encoder", "model")  # doctest: +SKIP
    """
    from safetensors.numpy import load_file

    folder = Path(folder)
    for variant in ("", ".fp16"):
        single = folder / f"{stem}{variant}.safetensors"
        if single.is_file():
            try:
                return dict(load_file(single))
            except (TypeError, ValueError):  # bfloat16 has no numpy dtype: read through torch
                from safetensors.torch import load_file as torch_load_file

                return {k: to_numpy(v) for k, v in torch_load_file(single).items()}
        index = folder / f"{stem}{variant}.safetensors.index.json"
        if index.is_file():
            state_dict: dict[str, np.ndarray] = {}
            for shard in sorted(set(read_json(index)["weight_map"].values())):
                state_dict.update(load_file(folder / shard))
            return state_dict
    bin_stem = "pytorch_model" if stem == "model" else stem
    for variant in ("", ".fp16"):
        binary = folder / f"{bin_stem}{variant}.bin"
        if binary.is_file():
            try:
                import torch
            except ImportError as e:
                raise ImportError(
                    f"{str(binary)!r} is a PyTorch pickle and PyTorch is not installed. Install torch, or "
                    "convert it once elsewhere: `from safetensors.torch import save_file; "
                    f"save_file(torch.load('{binary.name}'), '{stem}.safetensors')`."
                ) from e
            loaded = torch.load(binary, map_location="cpu", weights_only=True)
            return {k: to_numpy(v) for k, v in loaded.items()}
    raise FileNotFoundError(
        f"no weights in {str(folder)!r}: expected {stem}.safetensors (or {bin_stem}.bin) next to config.json. "
        f"{hint}".rstrip()
    )
