"""Convert the book's PyTorch U-Net state dict to :class:`jaxdiff.models.UNet` params and back.

Plain numpy only: values may be numpy arrays or anything ``np.asarray`` accepts (a torch tensor is
read through ``.detach().cpu().numpy()`` without importing torch). Layouts:

=====================  ==========================  ===========================
PyTorch                shape                       Flax
=====================  ==========================  ===========================
``Conv2d`` k x k       ``[O, I, k, k]``            ``Conv.kernel [k, k, I, O]``
``Conv2d`` 1 x 1       ``[O, I, 1, 1]``            ``Dense.kernel [I, O]``
``Linear``             ``[O, I]``                  ``Dense.kernel [I, O]``
``GroupNorm``          ``weight``, ``bias``        ``scale``, ``bias``
attention ``norm.g``   ``[1, C, 1, 1]``            ``norm_scale [C]``
=====================  ==========================  ===========================

The model configuration (widths, attention stages, channels, time-embedding width, classes) is
inferred from the names and shapes; pass ``config`` to set what cannot be inferred (``heads`` vs
``head_dim``, ``norm_groups``) or to check against a given model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.unet import UNet

# Names of the extension (not in the book): context embedding Dense -> SiLU -> Dense, no biases.
_CONTEXT_TORCH = ("context_embedding.0", "context_embedding.2")


@dataclass(frozen=True)
class _Layer:
    torch: str  # prefix of the PyTorch names, e.g. "down_blocks.0.0.conv1"
    flax: tuple[str, ...]  # path of the Flax module, e.g. ("down_0_res_0", "conv1")
    kind: str  # "linear", "conv", "conv1x1", "groupnorm", "layernorm"
    bias: bool = True


def _res_layers(tp: str, fp: str, with_residual_conv: bool) -> list[_Layer]:
    layers = [_Layer(f"{tp}.time_emb_proj.1", (fp, "time_proj"), "linear")]
    if with_residual_conv:
        layers.append(_Layer(f"{tp}.residual_conv", (fp, "residual_conv"), "conv1x1"))
    layers += [
        _Layer(f"{tp}.conv1", (fp, "conv1"), "conv"),
        _Layer(f"{tp}.conv2", (fp, "conv2"), "conv"),
        _Layer(f"{tp}.norm1", (fp, "norm1"), "groupnorm"),
        _Layer(f"{tp}.norm2", (fp, "norm2"), "groupnorm"),
    ]
    return layers


def _attn_layers(tp: str, fp: str) -> list[_Layer]:
    return [
        _Layer(f"{tp}.fn.fn.to_qkv", (fp, "to_qkv"), "conv1x1", bias=False),
        _Layer(f"{tp}.fn.fn.to_out", (fp, "to_out"), "conv1x1"),
        _Layer(f"{tp}.fn.norm", (fp,), "layernorm", bias=False),
    ]


def _layer_table(model: UNet) -> list[_Layer]:
    """Every layer of ``model`` with its PyTorch name, in the book's state-dict order."""
    dims = tuple(model.hidden_dims)
    last = len(dims) - 2
    stages = model.resolved_attention_stages
    up_stages = model.resolved_up_attention_stages
    layers = [
        _Layer("time_embedding.0", ("time_mlp_0",), "linear"),
        _Layer("time_embedding.2", ("time_mlp_1",), "linear"),
    ]
    if model.num_classes is not None:
        layers += [
            _Layer(_CONTEXT_TORCH[0], ("context_mlp_0",), "linear", bias=False),
            _Layer(_CONTEXT_TORCH[1], ("context_mlp_1",), "linear", bias=False),
        ]
    layers.append(_Layer("init_conv", ("init_conv",), "conv"))
    for i in range(len(dims) - 1):
        for k in range(2):
            layers += _res_layers(f"down_blocks.{i}.{k}", f"down_{i}_res_{k}", False)
        if i in stages:
            layers += _attn_layers(f"down_blocks.{i}.2", f"down_{i}_attn")
        if i < last:  # Sequential(Rearrange(space-to-depth), Conv2d 1x1)
            layers.append(_Layer(f"down_blocks.{i}.3.1", (f"down_{i}_downsample",), "conv1x1"))
        else:
            layers.append(_Layer(f"down_blocks.{i}.3", (f"down_{i}_downsample",), "conv"))
    layers += _res_layers("mid_block1", "mid_res_0", False)
    layers += _attn_layers("mid_attn", "mid_attn")
    layers += _res_layers("mid_block2", "mid_res_1", False)
    for j in range(len(dims) - 1):
        for k in range(2):
            layers += _res_layers(f"up_blocks.{j}.{k}", f"up_{j}_res_{k}", True)
        if j in up_stages:
            layers += _attn_layers(f"up_blocks.{j}.2", f"up_{j}_attn")
        if j < last:  # Sequential(Upsample(nearest), Conv2d 3x3)
            layers.append(_Layer(f"up_blocks.{j}.3.1", (f"up_{j}_upsample",), "conv"))
        else:
            layers.append(_Layer(f"up_blocks.{j}.3", (f"up_{j}_upsample",), "conv"))
    layers += _res_layers("out_block", "out_res", True)
    layers.append(_Layer("conv_out", ("conv_out",), "conv1x1"))
    return layers


def _conv_t(k: np.ndarray) -> np.ndarray:  # [kh, kw, I, O] -> [O, I, kh, kw]
    return np.transpose(k, (3, 2, 0, 1))


def _conv_f(w: np.ndarray) -> np.ndarray:  # [O, I, kh, kw] -> [kh, kw, I, O]
    return np.transpose(w, (2, 3, 1, 0))


# Per kind: (torch suffix, flax leaf name, torch-from-flax, flax-from-torch).
_LEAVES: dict[str, list[tuple[str, str, Any, Any]]] = {
    "linear": [("weight", "kernel", lambda k: k.T, lambda w: w.T)],
    "conv": [("weight", "kernel", _conv_t, _conv_f)],
    "conv1x1": [
        ("weight", "kernel", lambda k: k.T[:, :, None, None], lambda w: w[:, :, 0, 0].T)
    ],
    "groupnorm": [("weight", "scale", lambda s: s, lambda w: w)],
    "layernorm": [
        ("g", "norm_scale", lambda s: s[None, :, None, None], lambda g: g[0, :, 0, 0])
    ],
}
_BIAS = ("bias", "bias", lambda b: b, lambda b: b)


def _leaves(layer: _Layer) -> list[tuple[str, tuple[str, ...], Any, Any]]:
    """(torch name, flax path, to_torch, from_torch) for every tensor of a layer."""
    specs = list(_LEAVES[layer.kind]) + ([_BIAS] if layer.bias else [])
    out = []
    for tsuffix, fleaf, to_t, to_f in specs:
        out.append((f"{layer.torch}.{tsuffix}", layer.flax + (fleaf,), to_t, to_f))
    return out


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, read without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _config_dict(model: UNet) -> dict[str, Any]:
    return {
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "hidden_dims": tuple(model.hidden_dims),
        "attention_stages": model.attention_stages,
        "up_attention_stages": model.up_attention_stages,
        "time_emb_dim": model.time_emb_dim,
        "num_classes": model.num_classes,
        "norm_groups": model.norm_groups,
        "heads": model.heads,
        "head_dim": model.head_dim,
    }


def _merge_config(inferred: dict[str, Any], config: Mapping[str, Any] | UNet | None) -> UNet:
    if isinstance(config, UNet):
        return config
    return UNet(**{**inferred, **dict(config or {})})


def unet_config_from_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Infer the :class:`UNet` keyword arguments from a book-style PyTorch state dict.

    ``heads`` is taken as ``inner // 32`` (the book's 4 x 32), since only ``heads * head_dim``
    is visible in the weights; ``norm_groups`` is the book's 8.

    Example:
      >>> model = UNet(**unet_config_from_torch(state_dict))  # doctest: +SKIP
    """
    shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    needed = ["init_conv.weight", "conv_out.weight", "time_embedding.0.weight",
              "mid_block1.conv1.weight", "mid_attn.fn.fn.to_qkv.weight",
              "down_blocks.0.0.conv1.weight"]
    absent = [k for k in needed if k not in shapes]
    if absent:
        raise ValueError(
            f"not a book-style U-Net state dict: missing keys {absent} (found "
            f"{len(shapes)} keys, e.g. {sorted(shapes)[:5]})."
        )
    stages = sorted({int(m.group(1)) for k in shapes
                     if (m := re.match(r"down_blocks\.(\d+)\.0\.conv1\.weight$", k))})
    if stages != list(range(len(stages))):
        raise ValueError(f"down_blocks indices {stages} are not 0..n-1.")
    dims = tuple(shapes[f"down_blocks.{i}.0.conv1.weight"][0] for i in stages)
    dims += (shapes["mid_block1.conv1.weight"][0],)
    attention = tuple(i for i in stages if f"down_blocks.{i}.2.fn.norm.g" in shapes)
    up_attention = tuple(j for j in stages if f"up_blocks.{j}.2.fn.norm.g" in shapes)
    inner = shapes["mid_attn.fn.fn.to_qkv.weight"][0] // 3
    head_dim = 32 if inner % 32 == 0 else inner
    ctx = f"{_CONTEXT_TORCH[0]}.weight"
    default_attention = (len(dims) - 2,)
    return {
        "in_channels": shapes["init_conv.weight"][1],
        "out_channels": shapes["conv_out.weight"][0],
        "hidden_dims": dims,
        "attention_stages": None if attention == default_attention else attention,
        "up_attention_stages": None if up_attention == attention else up_attention,
        "time_emb_dim": shapes["time_embedding.0.weight"][1],
        "num_classes": shapes[ctx][1] if ctx in shapes else None,
        "heads": inner // head_dim,
        "head_dim": head_dim,
    }


def _param_shapes(model: UNet) -> dict[str, Any]:
    model.check_config()
    side = 2 ** model.num_halvings
    x = jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
    return variables["params"]


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _expected(model: UNet) -> dict[str, tuple[tuple[str, ...], Any, tuple[int, ...]]]:
    """torch name -> (flax path, flax-from-torch, torch shape), in the book's order."""
    flax_shapes = _param_shapes(model)
    expected = {}
    for layer in _layer_table(model):
        for tname, fpath, to_t, to_f in _leaves(layer):
            fshape = _get(flax_shapes, fpath).shape
            tshape = to_t(np.broadcast_to(np.zeros((), np.int8), fshape)).shape
            expected[tname] = (fpath, to_f, tuple(int(n) for n in tshape))
    return expected


def unet_torch_shapes(model: UNet) -> dict[str, tuple[int, ...]]:
    """PyTorch state-dict names and shapes of ``model``, in the book's order (no allocation).

    Example:
      >>> len(unet_torch_shapes(UNet()))
      196
    """
    return {name: shape for name, (_, _, shape) in _expected(model).items()}


def unet_params_from_torch(
    state_dict: Mapping[str, Any], config: Mapping[str, Any] | UNet | None = None
) -> dict[str, Any]:
    """Flax params of :class:`UNet` from the book's PyTorch state dict (names and layouts).

    Args:
      state_dict: PyTorch names -> arrays (numpy, or torch tensors).
      config: optional :class:`UNet` or keyword overrides for the inferred configuration.

    Returns:
      The ``params`` collection (float32 numpy arrays): use ``{"params": params}`` as the
      variables of ``UNet(**unet_config_from_torch(state_dict))``.

    Raises:
      ValueError: listing missing keys, unexpected keys and shape mismatches.

    Example:
      >>> params = unet_params_from_torch(torch_model.state_dict())  # doctest: +SKIP
      >>> eps = UNet().apply({"params": params}, x_nhwc, t)  # doctest: +SKIP
    """
    model = _merge_config(unet_config_from_torch(state_dict), config)
    expected = _expected(model)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: got {tuple(np.shape(state_dict[k]))}, expected {expected[k][2]}"
        for k in expected
        if k in state_dict and tuple(np.shape(state_dict[k])) != expected[k][2]
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"state dict does not match UNet({_config_dict(model)}):\n"
            f"  missing keys ({len(missing)}): {missing}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
            f"  shape mismatches ({len(mismatched)}): {mismatched}"
        )

    params: dict[str, Any] = {}
    for tname, (fpath, to_f, _) in expected.items():
        node = params
        for name in fpath[:-1]:
            node = node.setdefault(name, {})
        node[fpath[-1]] = np.asarray(to_f(_to_numpy(state_dict[tname])), dtype=np.float32)
    return params


def _config_from_flax(params: Mapping[str, Any]) -> dict[str, Any]:
    if "init_conv" not in params or "mid_res_0" not in params:
        raise ValueError(
            f"not UNet params: expected top-level modules init_conv, mid_res_0, ...; got "
            f"{sorted(params)[:8]}"
        )
    n = 0
    while f"down_{n}_res_0" in params:
        n += 1
    dims = tuple(int(params[f"down_{i}_res_0"]["conv1"]["kernel"].shape[-1]) for i in range(n))
    dims += (int(params["mid_res_0"]["conv1"]["kernel"].shape[-1]),)
    attention = tuple(i for i in range(n) if f"down_{i}_attn" in params)
    up_attention = tuple(j for j in range(n) if f"up_{j}_attn" in params)
    inner = int(params["mid_attn"]["to_qkv"]["kernel"].shape[-1]) // 3
    head_dim = 32 if inner % 32 == 0 else inner
    return {
        "in_channels": int(params["init_conv"]["kernel"].shape[2]),
        "out_channels": int(params["conv_out"]["kernel"].shape[-1]),
        "hidden_dims": dims,
        "attention_stages": None if attention == (len(dims) - 2,) else attention,
        "up_attention_stages": None if up_attention == attention else up_attention,
        "time_emb_dim": int(params["time_mlp_0"]["kernel"].shape[0]),
        "num_classes": (int(params["context_mlp_0"]["kernel"].shape[0])
                        if "context_mlp_0" in params else None),
        "heads": inner // head_dim,
        "head_dim": head_dim,
    }


def unet_params_to_torch(
    params: Mapping[str, Any], config: Mapping[str, Any] | UNet | None = None
) -> dict[str, np.ndarray]:
    """The book's PyTorch state dict (numpy arrays, book order) from :class:`UNet` params.

    Exact inverse of :func:`unet_params_from_torch` (only transposes). Accepts the ``params``
    collection or the whole variables dict ``{"params": ...}``.

    Example:
      >>> sd = unet_params_to_torch(variables)  # doctest: +SKIP
      >>> tensors = {k: torch.from_numpy(v) for k, v in sd.items()}  # doctest: +SKIP
      >>> torch_model.load_state_dict(tensors)  # doctest: +SKIP
    """
    if "params" in params and "init_conv" not in params:
        params = params["params"]
    model = _merge_config(_config_from_flax(params), config)
    state_dict: dict[str, np.ndarray] = {}
    used: set[tuple[str, ...]] = set()
    for layer in _layer_table(model):
        for tname, fpath, to_t, _ in _leaves(layer):
            try:
                value = _get(params, fpath)
            except KeyError:
                raise ValueError(
                    f"params lack {'/'.join(fpath)} (for {tname}) expected by "
                    f"UNet({_config_dict(model)})."
                ) from None
            state_dict[tname] = np.ascontiguousarray(to_t(np.asarray(value)))
            used.add(fpath)
    flat = {tuple(str(getattr(k, "key", k)) for k in path)
            for path, _ in jax.tree.flatten_with_path(dict(params))[0]}
    extra = sorted("/".join(p) for p in flat - used)
    if extra:
        raise ValueError(f"params have entries with no PyTorch name: {extra}")
    return state_dict
