"""``config.json`` handling shared by the ports of Hugging Face (diffusers / transformers) models.

The Flax ports in jaxdiff (:class:`~jaxdiff.models.DiffusersUNet2D`,
:class:`~jaxdiff.models.UNet2DCondition`, :class:`~jaxdiff.models.AutoencoderKL`,
:class:`~jaxdiff.clip.CLIPTextEncoder`) name their attributes after the keys of the PyTorch
model's ``config.json``, so reading and writing a config is the same loop for all of them:
bookkeeping keys (``_class_name``, ``_diffusers_version``, ...) are dropped, keys the class does
not take are dropped with a warning (as diffusers does), JSON lists become tuples (Flax module
attributes must be hashable) and back. This module also holds the block-type checks the two
U-Nets share and the small JSON file helpers of pipeline folders.

Example:
    >>> import dataclasses
    >>> @dataclasses.dataclass(frozen=True)
    ... class Net(ConfigMixin):
    ...     config_class_name = "NetModel"
    ...     block_out_channels: tuple = (32,)
    ...     dtype: str = "float32"
    ...     def validate(self):
    ...         pass
    >>> net = module_from_config(Net, {"_class_name": "NetModel", "block_out_channels": [64, 128]}, {})
    >>> net, net.to_config()
    (Net(block_out_channels=(64, 128), dtype='float32'), {'_class_name': 'NetModel', 'block_out_channels': [64, 128]})
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

__all__ = [
    "DIFFUSERS_VERSION_WRITTEN",
    "IGNORED_CONFIG_KEYS",
    "ConfigMixin",
    "as_module",
    "check_block_types",
    "check_class_name",
    "listify",
    "model_index_classes",
    "module_from_config",
    "read_json",
    "strip_unetres",
    "tuplify",
    "write_json",
]

DIFFUSERS_VERSION_WRITTEN = "0.42.1"
"""The ``_diffusers_version`` jaxdiff writes into the configs it saves."""
IGNORED_CONFIG_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})
"""Config keys that only matter to diffusers' bookkeeping, never to the network."""

ModuleT = TypeVar("ModuleT")
ConfigT = TypeVar("ConfigT", bound="ConfigMixin")


def tuplify(value: Any) -> Any:
    """JSON lists (nested too) -> tuples, as Flax module attributes need."""
    if isinstance(value, (list, tuple)):
        return tuple(tuplify(v) for v in value)
    return value


def listify(value: Any) -> Any:
    """Tuples (nested too) -> lists, as ``config.json`` stores them."""
    if isinstance(value, tuple):
        return [listify(v) for v in value]
    return value


def _article(word: str) -> str:
    return "an" if word[:1] in "AEIO" else "a"  # "a UNet2DModel", "an AutoencoderKL"


def check_class_name(config: Mapping[str, Any], class_name: str) -> None:
    """Raise ``ValueError`` if ``config`` names a ``_class_name`` other than ``class_name``."""
    found = config.get("_class_name", class_name)
    if found != class_name:
        raise ValueError(f"expected {_article(class_name)} {class_name} config, got _class_name={found!r}")


class ConfigMixin:
    """``config_keys`` / ``to_config`` for a Flax port whose attributes are its ``config.json`` keys.

    A subclass sets ``config_class_name`` (the PyTorch class: the ``_class_name`` of its configs)
    and, when it adds attributes other than ``dtype`` / ``param_dtype`` that are no config keys,
    ``jaxdiff_options``. Its ``from_config`` is usually :func:`module_from_config`.
    """

    config_class_name: ClassVar[str]
    jaxdiff_options: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype")

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        """The attribute names that belong to the ``config.json`` (not Flax's, not jaxdiff's options)."""
        local = {"parent", "name", *cls.jaxdiff_options}
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in local)

    def to_config(self) -> dict[str, Any]:
        """The ``config.json`` dictionary of this module (``_class_name`` included)."""
        config: dict[str, Any] = {"_class_name": self.config_class_name}
        for key in self.config_keys():
            config[key] = listify(getattr(self, key))
        return config


def module_from_config(
    cls: type[ConfigT], config: Mapping[str, Any], overrides: Mapping[str, Any], *, skip: Iterable[str] = ()
) -> ConfigT:
    """``cls`` built from a diffusers ``config.json`` dictionary, ``overrides`` applied, validated.

    Checks ``_class_name`` (:func:`check_class_name`); drops :data:`IGNORED_CONFIG_KEYS` and
    ``skip`` silently and other keys that are not :meth:`ConfigMixin.config_keys` with a warning
    (diffusers ignores them too: older and newer configs carry extra keys); turns lists into
    tuples; then calls the module's ``validate()``. Call it from ``cls.from_config``.
    """
    check_class_name(config, cls.config_class_name)
    known, skip = set(cls.config_keys()), IGNORED_CONFIG_KEYS | set(skip)
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in config.items():
        if key in skip:
            continue
        if key not in known:
            unknown.append(key)
            continue
        kwargs[key] = tuplify(value)
    if unknown:  # stacklevel 3: the caller of cls.from_config
        warnings.warn(f"ignoring config keys {cls.config_class_name} does not take: {sorted(unknown)}", stacklevel=3)
    kwargs.update(overrides)
    module = cls(**kwargs)
    module.validate()
    return module


def as_module(cls: type[ModuleT], config: Mapping[str, Any] | ModuleT) -> ModuleT:
    """``config`` itself if it is a ``cls``, else ``cls.from_config(config)``."""
    return config if isinstance(config, cls) else cls.from_config(config)


# ---------------------------------------------------------------------------------------------
# U-Net block lists


def strip_unetres(block_type: str) -> str:
    """diffusers accepts ``UNetRes``-prefixed aliases of the block names."""
    return block_type[len("UNetRes"):] if block_type.startswith("UNetRes") else block_type


def check_block_types(
    unet: Any,
    supported_down: tuple[str, ...],
    supported_up: tuple[str, ...],
    supported_mid: tuple[str | None, ...],
) -> None:
    """Raise ``ValueError`` unless ``unet``'s block lists have one entry per level and are supported.

    ``unet`` has diffusers' ``block_out_channels``, ``down_block_types``, ``up_block_types`` and
    ``mid_block_type`` attributes; ``UNetRes`` aliases count as the plain names.
    """
    n = len(unet.block_out_channels)
    if len(unet.down_block_types) != n or len(unet.up_block_types) != n:
        raise ValueError(
            f"block_out_channels {unet.block_out_channels}, down_block_types {unet.down_block_types} and "
            f"up_block_types {unet.up_block_types} must have the same length"
        )
    owner = type(unet).__name__
    for kind, types, supported in (("down", unet.down_block_types, supported_down),
                                   ("up", unet.up_block_types, supported_up)):
        for block_type in types:
            if strip_unetres(block_type) not in supported:
                raise ValueError(f"unsupported {kind} block type {block_type!r}; {owner} supports {supported}")
    if unet.mid_block_type not in supported_mid:
        raise ValueError(f"unsupported mid block type {unet.mid_block_type!r}; supported: {supported_mid}")


# ---------------------------------------------------------------------------------------------
# Files of model and pipeline folders


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file (``config.json``, ``model_index.json``, ...) as a dictionary."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Write ``data`` as diffusers does: indented, keys sorted, a final newline."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def model_index_classes(folder: str | os.PathLike) -> dict[str, str]:
    """Component name -> class name from a pipeline folder's ``model_index.json`` ({} without one).

    Example:
        >>> model_index_classes("checkpoints/ddpm-cat-256")  # doctest: +SKIP
        {'scheduler': 'DDPMScheduler', 'unet': 'UNet2DModel'}
    """
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return {}
    return {name: spec[1] for name, spec in read_json(index).items()
            if isinstance(spec, list) and len(spec) == 2 and spec[1] is not None}
