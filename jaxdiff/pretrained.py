"""Load and save diffusers ``UNet2DModel`` checkpoints (e.g. ``google/ddpm-cat-256``) for JAX.

Nothing here downloads anything: fetch a checkpoint once, for example with::

    huggingface-cli download google/ddpm-cat-256 --local-dir checkpoints/ddpm-cat-256

and point :func:`load_diffusers` at the folder. Both layouts that diffusers writes are read:

* a pipeline folder (``DDPMPipeline.save_pretrained``): ``model_index.json``,
  ``unet/config.json`` + ``unet/diffusion_pytorch_model.safetensors`` (or ``.bin``) and
  ``scheduler/scheduler_config.json``;
* a bare model folder (``UNet2DModel.save_pretrained``): ``config.json`` + weights, optionally
  with a ``scheduler_config.json`` beside them.

Example:
    >>> model, params, schedule = load_diffusers("checkpoints/ddpm-cat-256")  # doctest: +SKIP
    >>> eps = model.apply({"params": params}, x_nhwc, t)                      # doctest: +SKIP
    >>> save_diffusers(new_params, model, "out/cat-finetuned")                 # doctest: +SKIP
    >>> # diffusers.UNet2DModel.from_pretrained("out/cat-finetuned") now loads the fine-tune.

Stable Diffusion pipeline folders (``StableDiffusionPipeline.save_pretrained``: ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) load with :func:`load_text_to_image` and are
written by :func:`save_text_to_image` (both in :mod:`jaxdiff.text_to_image`).

``safetensors`` files are read with ``safetensors.numpy`` (no PyTorch needed); legacy ``.bin``
pickles need PyTorch. Conversion: convolution kernels OIHW <-> HWIO, linear weights transposed,
GroupNorm ``weight`` <-> ``scale``; the pre-2023 attention names (``query``, ``key``, ``value``,
``proj_attn``) are accepted on load.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import samplers as samplers_lib
from jaxdiff import schedules as schedules_lib
from jaxdiff.models.diffusers_unet import DiffusersUNet2D
from jaxdiff.models.hf_config import (
    DIFFUSERS_VERSION_WRITTEN,
    as_module,
    model_index_classes,
    read_json,
    write_json,
)
from jaxdiff.models.state_dicts import (
    param_shapes,
    params_from_state_dict,
    params_to_state_dict,
    read_state_dict,
    rename_legacy_attention,
)

__all__ = [
    "SchedulerConfig",
    "diffusers_params_from_torch",
    "diffusers_params_to_torch",
    "diffusers_param_shapes",
    "load_diffusers",
    "load_text_to_image",
    "read_scheduler_config",
    "save_diffusers",
    "save_text_to_image",
]

WEIGHTS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"
_DOWNLOAD_HINT = (
    "Download the checkpoint first, e.g. `huggingface-cli download google/ddpm-cat-256 --local-dir "
    "<folder>` (or `DDPMPipeline.from_pretrained(...).save_pretrained(<folder>)` in diffusers); "
    "jaxdiff never downloads at run time."
)
_LIST_MODULES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out")


# ---------------------------------------------------------------------------------------------
# Scheduler config


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The sampling-relevant fields of a diffusers ``scheduler_config.json``.

    Defaults are those of ``DDPMScheduler``. ``raw`` keeps the whole dictionary (pass it to
    :func:`jaxdiff.schedules.from_diffusers_config` or
    :func:`jaxdiff.samplers.kwargs_from_diffusers_config`).

    Example:
        >>> cfg = SchedulerConfig.from_dict({"_class_name": "DDIMScheduler", "clip_sample": False})
        >>> cfg.class_name, cfg.clip_sample, cfg.prediction_type
        ('DDIMScheduler', False, 'epsilon')
    """

    class_name: str = "DDPMScheduler"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    variance_type: str | None = "fixed_small"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    thresholding: bool = False
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> SchedulerConfig:
        """Read the known fields of ``config``; the full dictionary is kept in ``raw``."""
        names = {f.name for f in dataclasses.fields(cls)} - {"class_name", "raw"}
        kwargs = {k: config[k] for k in names if k in config}
        return cls(class_name=config.get("_class_name", cls.class_name), raw=dict(config), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """``raw`` updated with the fields (the dictionary to write as ``scheduler_config.json``)."""
        out = dict(self.raw)
        out["_class_name"] = self.class_name
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in ("class_name", "raw") and (f.name in out or value != f.default):
                out[f.name] = value
        return out

    def schedule(self) -> schedules_lib.Schedule:
        """The noise schedule (betas, alphas, alphas_cumprod) this scheduler uses."""
        return schedules_lib.from_diffusers_config(self.to_dict())

    def sampler(self) -> tuple[str, dict[str, Any]]:
        """``(name, kwargs)``: the jaxdiff sampler that runs this scheduler class, and its settings.

        ``samplers.SAMPLE_FUNCTIONS[name](eps_fn, self.schedule(), x_T, key, num_steps=n, **kwargs)``
        samples as the diffusers scheduler of this config does (DDIM, DDPM, DPM-Solver, UniPC,
        Euler, Euler ancestral, Heun, PNDM: ``samplers.SCHEDULER_CLASSES``). Another class is a
        ValueError naming it and listing the supported ones.

        Example:
            >>> SchedulerConfig.from_dict({"_class_name": "EulerDiscreteScheduler"}).sampler()[0]
            'euler'
        """
        name = samplers_lib.sampler_for_scheduler_class(self.class_name)
        return name, samplers_lib.kwargs_from_diffusers_config(self.to_dict(), self.schedule(), sampler=name)


def read_scheduler_config(path: str | os.PathLike) -> SchedulerConfig:
    """Read the scheduler config of a pipeline folder, a bare model folder, or a json file.

    Looks for ``scheduler/scheduler_config.json`` then ``scheduler_config.json``. A folder
    without either gets the ``DDPMScheduler`` defaults (linear betas 1e-4..0.02, 1000 steps,
    epsilon prediction).

    Example:
        >>> read_scheduler_config("checkpoints/ddpm-cat-256").prediction_type  # doctest: +SKIP
        'epsilon'
    """
    path = Path(path)
    if path.is_file():
        return SchedulerConfig.from_dict(read_json(path))
    _check_folder(path)
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if candidate.is_file():
            return SchedulerConfig.from_dict(read_json(candidate))
    return SchedulerConfig()


# ---------------------------------------------------------------------------------------------
# Weight conversion


def diffusers_param_shapes(config: Mapping[str, Any] | DiffusersUNet2D) -> dict[str, Any]:
    """The Flax parameter tree of a config as ``jax.ShapeDtypeStruct`` leaves (nothing allocated).

    Example:
        >>> shapes = diffusers_param_shapes(cat_config)                     # doctest: +SKIP
        >>> sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))     # doctest: +SKIP
        113673219
    """
    model = as_module(DiffusersUNet2D, config)
    size = 2 ** (len(model.block_out_channels) - 1)
    x = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    labels = None
    if model.class_embed_type == "identity":
        labels = jax.ShapeDtypeStruct((1, model.time_embed_dim), jnp.float32)
    elif model.class_embed_type is not None or model.num_class_embeds is not None:
        labels = jax.ShapeDtypeStruct((1,), jnp.int32)
    return param_shapes(model, x, t, labels)


def diffusers_params_from_torch(
    state_dict: Mapping[str, Any],
    config: Mapping[str, Any] | DiffusersUNet2D,
    *,
    strict: bool = True,
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Convert a diffusers ``UNet2DModel`` state dict (name -> array) to Flax params.

    Args:
        state_dict: PyTorch names -> numpy arrays (torch tensors are accepted too).
        config: the ``config.json`` dict, or a :class:`DiffusersUNet2D`.
        strict: raise on state-dict entries the model does not use (missing entries and shape
            mismatches always raise).
        dtype: numpy dtype of the returned arrays.

    Returns:
        A nested dict of numpy arrays, ``model.apply({"params": params}, ...)``-ready.

    Raises:
        KeyError: for missing or (with ``strict``) unexpected keys, naming them.
        ValueError: for shape mismatches.

    Example:
        >>> params = diffusers_params_from_torch(safetensors.numpy.load_file(f), config)  # doctest: +SKIP
    """
    return params_from_state_dict(rename_legacy_attention(state_dict), diffusers_param_shapes(config),
                                  list_modules=_LIST_MODULES, strict=strict, dtype=dtype, what="UNet2DModel")


def diffusers_params_to_torch(
    params: Mapping[str, Any],
    config: Mapping[str, Any] | DiffusersUNet2D,
    *,
    dtype: Any = np.float32,
) -> dict[str, np.ndarray]:
    """Convert Flax params back to a diffusers ``UNet2DModel`` state dict of numpy arrays.

    The tree is checked against ``config`` first (missing / unexpected paths and shapes raise).

    Example:
        >>> sd = diffusers_params_to_torch(params, model)                 # doctest: +SKIP
        >>> torch_unet.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})  # doctest: +SKIP
    """
    return params_to_state_dict(params, diffusers_param_shapes(config), list_modules=_LIST_MODULES, dtype=dtype,
                                what="UNet2DModel")


# ---------------------------------------------------------------------------------------------
# Folders


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {str(path)!r}. {_DOWNLOAD_HINT}")


def _unet_folder(path: Path) -> Path:
    """The folder holding the UNet ``config.json`` in a pipeline or bare-model layout."""
    _check_folder(path)
    component = next((name for name, cls in model_index_classes(path).items() if cls == "UNet2DModel"), "unet")
    for candidate in (path / component, path):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{str(path)!r} holds neither {component}/config.json (pipeline layout) nor config.json (model "
        f"layout). Place the UNet's config.json and {WEIGHTS_SAFETENSORS} in {str(path / component)!r}. "
        f"{_DOWNLOAD_HINT}"
    )


def read_unet_config(path: str | os.PathLike) -> dict[str, Any]:
    """The UNet's ``config.json`` of a pipeline or bare-model folder (no weights are read)."""
    return read_json(_unet_folder(Path(path)) / "config.json")


def load_diffusers(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    remat: bool = False,
    return_scheduler_config: bool = False,
) -> tuple[DiffusersUNet2D, dict[str, Any], schedules_lib.Schedule] | tuple[
    DiffusersUNet2D, dict[str, Any], schedules_lib.Schedule, SchedulerConfig
]:
    """Load a diffusers ``UNet2DModel`` checkpoint folder as ``(model, params, schedule)``.

    ``path`` is a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) or a bare
    model folder (``config.json`` + weights). The schedule comes from the scheduler config; a
    bare model folder without ``scheduler_config.json`` gets diffusers' ``DDPMScheduler`` default
    (linear betas from 1e-4 to 0.02 over 1000 steps, epsilon prediction), so check that this is
    what the model was trained with.

    Args:
        path: the local folder.
        dtype: compute dtype of the returned model (parameters stay float32).
        remat: rematerialise ResNet/attention layers (for fine-tuning large models).
        return_scheduler_config: also return the :class:`SchedulerConfig`
            (``prediction_type``, ``clip_sample``, ``timestep_spacing``, ...); its
            :meth:`SchedulerConfig.sampler` gives the sampler the folder's scheduler class names.

    Returns:
        ``(model, params, schedule)`` or, with ``return_scheduler_config``, ``(model, params,
        schedule, scheduler_config)``. ``model.apply({"params": params}, x_nhwc, t)`` is the
        model output (noise prediction) in NHWC.

    Raises:
        FileNotFoundError: for a missing folder, config or weights file, saying what goes where.

    Example:
        >>> model, params, schedule = load_diffusers("checkpoints/ddpm-cat-256")  # doctest: +SKIP
        >>> x = jax.random.normal(jax.random.key(0), (1, 256, 256, 3))            # doctest: +SKIP
        >>> eps = jax.jit(model.apply)({"params": params}, x, 999)                 # doctest: +SKIP
    """
    path = Path(path)
    unet_dir = _unet_folder(path)
    config = read_json(unet_dir / "config.json")
    model = DiffusersUNet2D.from_config(config, dtype=dtype, remat=remat)
    params = diffusers_params_from_torch(read_state_dict(unet_dir, hint=_DOWNLOAD_HINT), model)
    params = jax.tree.map(jnp.asarray, params)
    scheduler_config = read_scheduler_config(path)
    schedule = scheduler_config.schedule()
    if return_scheduler_config:
        return model, params, schedule, scheduler_config
    return model, params, schedule


def save_diffusers(
    params: Mapping[str, Any],
    config: Mapping[str, Any] | DiffusersUNet2D,
    path: str | os.PathLike,
    *,
    scheduler_config: SchedulerConfig | Mapping[str, Any] | None = None,
) -> Path:
    """Write params in diffusers' format, loadable by ``UNet2DModel.from_pretrained``.

    Without ``scheduler_config`` this writes a bare model folder: ``path/config.json`` and
    ``path/diffusion_pytorch_model.safetensors``. With it, a ``DDPMPipeline`` folder:
    ``path/model_index.json``, ``path/unet/...`` and ``path/scheduler/scheduler_config.json``
    (then ``DDPMPipeline.from_pretrained(path)`` works, and so does :func:`load_diffusers`).

    Args:
        params: the Flax parameters.
        config: the ``config.json`` dict or the :class:`DiffusersUNet2D`.
        path: output folder (created; existing files are overwritten).
        scheduler_config: optional scheduler to write alongside.

    Returns:
        The folder holding ``config.json`` and the weights.

    Example:
        >>> save_diffusers(params, model, "out/cat-finetuned",
        ...                scheduler_config=read_scheduler_config("checkpoints/ddpm-cat-256"))  # doctest: +SKIP
    """
    from safetensors.numpy import save_file

    model = as_module(DiffusersUNet2D, config)
    state_dict = diffusers_params_to_torch(params, model)
    root = Path(path)
    unet_dir = root if scheduler_config is None else root / "unet"
    unet_dir.mkdir(parents=True, exist_ok=True)
    model_config = model.to_config()
    model_config["_diffusers_version"] = DIFFUSERS_VERSION_WRITTEN
    write_json(unet_dir / "config.json", model_config)
    save_file(state_dict, unet_dir / WEIGHTS_SAFETENSORS, metadata={"format": "pt"})
    if scheduler_config is not None:
        if not isinstance(scheduler_config, SchedulerConfig):
            scheduler_config = SchedulerConfig.from_dict(scheduler_config)
        sched = scheduler_config.to_dict()
        sched["_diffusers_version"] = DIFFUSERS_VERSION_WRITTEN
        (root / "scheduler").mkdir(parents=True, exist_ok=True)
        write_json(root / "scheduler" / "scheduler_config.json", sched)
        write_json(
            root / "model_index.json",
            {
                "_class_name": "DDPMPipeline",
                "_diffusers_version": DIFFUSERS_VERSION_WRITTEN,
                "scheduler": ["diffusers", scheduler_config.class_name],
                "unet": ["diffusers", "UNet2DModel"],
            },
        )
    return unet_dir


# ---------------------------------------------------------------------------------------------
# Text-to-image pipelines (implemented in jaxdiff.text_to_image, imported on first use).


def load_text_to_image(folder: str | os.PathLike, height: int | None = None, width: int | None = None,
                       **kwargs: Any) -> Any:
    """Load a diffusers ``StableDiffusionPipeline`` folder: :func:`jaxdiff.text_to_image.load_text_to_image`.

    Example:
        >>> pipe = load_text_to_image("checkpoints/stable-diffusion-v1-5")                      # doctest: +SKIP
        >>> images = pipe(pipe.params, jax.random.key(0), pipe.tokenize(["a photo of a cat"]))  # doctest: +SKIP
    """
    from jaxdiff import text_to_image

    return text_to_image.load_text_to_image(folder, height, width, **kwargs)


def save_text_to_image(folder: str | os.PathLike, pipe: Any, params: Mapping[str, Any] | None = None) -> Path:
    """Write a ``StableDiffusionPipeline`` folder: :func:`jaxdiff.text_to_image.save_text_to_image`."""
    from jaxdiff import text_to_image

    return text_to_image.save_text_to_image(folder, pipe, params)
