"""The book's PyTorch ``state_dict`` <-> :class:`~jaxdiff.music.model.MusicTransformer` parameters.

The book's model has 83 ``state_dict`` entries: 77 parameter tensors and, per block, the causal
mask buffer ``transformer.h.<i>.attn.bias`` (``[1, 1, max_len, max_len]``, lower-triangular
ones; not a parameter). PyTorch ``Linear`` weights are ``[out, in]``, Flax kernels ``[in, out]``.

Example::

    import torch
    state_dict = torch.load("musicTrans.pth", map_location="cpu", weights_only=True)
    params = music_params_from_torch(state_dict)
    model = MusicTransformer()                  # the book's sizes
    back = music_params_to_torch(params)        # loads into the book's model with strict=True
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.")
# PyTorch name inside a block -> (path inside the Flax block, transpose)
_BLOCK_ENTRIES = {
    "ln_1.weight": (("ln_1", "scale"), False),
    "ln_1.bias": (("ln_1", "bias"), False),
    "attn.c_attn.weight": (("attn", "c_attn", "kernel"), True),
    "attn.c_attn.bias": (("attn", "c_attn", "bias"), False),
    "attn.c_proj.weight": (("attn", "c_proj", "kernel"), True),
    "attn.c_proj.bias": (("attn", "c_proj", "bias"), False),
    "ln_2.weight": (("ln_2", "scale"), False),
    "ln_2.bias": (("ln_2", "bias"), False),
    "mlp.c_fc.weight": (("mlp", "c_fc", "kernel"), True),
    "mlp.c_fc.bias": (("mlp", "c_fc", "bias"), False),
    "mlp.c_proj.weight": (("mlp", "c_proj", "kernel"), True),
    "mlp.c_proj.bias": (("mlp", "c_proj", "bias"), False),
}
_TOP_ENTRIES = {
    "transformer.wte.weight": (("wte", "embedding"), False),
    "transformer.wpe.weight": (("wpe", "embedding"), False),
    "transformer.ln_f.weight": (("ln_f", "scale"), False),
    "transformer.ln_f.bias": (("ln_f", "bias"), False),
    "lm_head.weight": (("lm_head", "kernel"), True),
}
MASK_BUFFER = "attn.bias"  # transformer.h.<i>.attn.bias: the causal mask, dropped on import


def torch_names(num_layers: int) -> list[str]:
    """The book's ``state_dict`` keys, in its order (``4 + 13 num_layers + 1`` entries: 83 for 6)."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(num_layers):
        for entry in list(_BLOCK_ENTRIES)[:2] + [f"{MASK_BUFFER}"] + list(_BLOCK_ENTRIES)[2:]:
            names.append(f"transformer.h.{i}.{entry}")
    return names + ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]


def _entry(name: str) -> tuple[tuple[str, ...], bool] | None:
    if name in _TOP_ENTRIES:
        return _TOP_ENTRIES[name]
    m = _BLOCK.match(name)
    if m:
        rest = name[m.end():]
        if rest == MASK_BUFFER:
            return None
        if rest in _BLOCK_ENTRIES:
            path, transpose = _BLOCK_ENTRIES[rest]
            return (f"h_{int(m.group(1))}", *path), transpose
    raise KeyError(name)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def music_params_from_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The book's ``state_dict`` (torch tensors or arrays) -> a ``MusicTransformer`` param tree.

    The number of layers, width and ``max_len`` follow from the tensors (build the model with
    the same sizes). The mask buffers are checked to be causal and dropped.

    Raises:
      ValueError: unknown or missing entries, or a mask buffer that is not lower-triangular.
    """
    params: dict[str, Any] = {}
    unknown = []
    for name, value in state_dict.items():
        try:
            entry = _entry(name)
        except KeyError:
            unknown.append(name)
            continue
        array = _to_numpy(value)
        if entry is None:
            mask = array.reshape(array.shape[-2:])
            if not np.array_equal(mask != 0, np.tril(np.ones_like(mask, dtype=bool))):
                raise ValueError(f"{name} is not the causal (lower-triangular) mask the model assumes.")
            continue
        path, transpose = entry
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = array.T if transpose else array
    if unknown:
        raise ValueError(f"state_dict entries that are not the book's music model: {sorted(unknown)[:10]}")
    num_layers = sum(1 for k in params if k.startswith("h_"))
    expected = {n for n in torch_names(num_layers) if not n.endswith(MASK_BUFFER)}
    missing = sorted(expected - set(state_dict))
    if missing:
        raise ValueError(f"state_dict lacks {len(missing)} entries of the book's model, e.g. {missing[:5]}")
    vocab, width = params["wte"]["embedding"].shape
    shapes = _torch_shapes(num_layers, width, params["wpe"]["embedding"].shape[0], vocab)
    wrong = [f"{n}: {tuple(np.shape(state_dict[n]))} (expected {shapes[n]})"
             for n in sorted(expected) if tuple(np.shape(state_dict[n])) != shapes[n]]  # fmt: skip
    if wrong:
        raise ValueError(f"state_dict entries with shapes the model cannot have: {wrong[:5]}")
    return params


def _torch_shapes(num_layers: int, width: int, max_len: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """PyTorch shapes of the parameter entries (``[out, in]`` for Linear weights)."""
    block = {"ln_1.weight": (width,), "ln_1.bias": (width,), "attn.c_attn.weight": (3 * width, width),
             "attn.c_attn.bias": (3 * width,), "attn.c_proj.weight": (width, width), "attn.c_proj.bias": (width,),
             "ln_2.weight": (width,), "ln_2.bias": (width,), "mlp.c_fc.weight": (4 * width, width),
             "mlp.c_fc.bias": (4 * width,), "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,)}  # fmt: skip
    shapes = {"transformer.wte.weight": (vocab, width), "transformer.wpe.weight": (max_len, width),
              "transformer.ln_f.weight": (width,), "transformer.ln_f.bias": (width,), "lm_head.weight": (vocab, width)}  # fmt: skip
    for i in range(num_layers):
        shapes.update({f"transformer.h.{i}.{k}": v for k, v in block.items()})
    return shapes


def music_params_to_torch(params: Mapping[str, Any], *, mask_buffers: bool = True) -> dict[str, Any]:
    """A ``MusicTransformer`` param tree -> the book's ``state_dict`` (``torch.Tensor`` values).

    With ``mask_buffers`` (default) the causal masks are included, so the result has the book's
    83 entries (for 6 layers) and loads with ``load_state_dict(..., strict=True)``.
    """
    import torch

    params = jax.device_get(params)
    num_layers = sum(1 for k in params if k.startswith("h_"))
    max_len = int(np.shape(params["wpe"]["embedding"])[0])
    out = {}
    for name in torch_names(num_layers):
        entry = _entry(name)
        if entry is None:
            if mask_buffers:
                out[name] = torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len)
            continue
        path, transpose = entry
        node = params
        for part in path:
            node = node[part]
        array = np.asarray(node, dtype=np.float32)
        out[name] = torch.tensor(array.T if transpose else array)
    return out
