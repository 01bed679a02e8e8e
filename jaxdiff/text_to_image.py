"""Text-to-image with latent diffusion: Stable Diffusion 1.x / 2.x pipelines in JAX.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", arXiv:2112.10752) joins three networks, each loaded here from the diffusers
``StableDiffusionPipeline`` folder that users have on disk:

1. a text encoder (CLIP's text transformer, :class:`jaxdiff.clip.CLIPTextEncoder`) turns the
   tokenized prompt into hidden states ``c`` ``[N, 77, D]``;
2. a U-Net (:class:`jaxdiff.models.UNet2DCondition`) denoises latents ``z_t`` ``[N, H/8, W/8, 4]``,
   reading ``c`` through cross-attention; a scan sampler of :mod:`jaxdiff.samplers` (PLMS, DDIM,
   DDPM, DPM-Solver++, UniPC, Euler, Heun: the one the folder's scheduler names) runs it with
   classifier-free guidance (Ho & Salimans 2022),
   ``eps = eps(z, t, c_neg) + w (eps(z, t, c) - eps(z, t, c_neg))``, both halves in one batched
   U-Net call per step;
3. the VAE decoder (:class:`jaxdiff.models.AutoencoderKL`) maps ``z_0 / scaling_factor`` to pixels.

Example::

    >>> from jaxdiff import pretrained  # doctest: +SKIP
    >>> pipe = pretrained.load_text_to_image("checkpoints/stable-diffusion-v1-5")  # doctest: +SKIP
    >>> ids = pipe.tokenize(["a photo of a cat", "a watercolour of a fox"])  # doctest: +SKIP
    >>> images = pipe(pipe.params, jax.random.key(0), ids, num_steps=30, guidance_scale=7.5)  # doctest: +SKIP
    >>> images.shape, images.dtype, float(images.min()) >= 0, float(images.max()) <= 1  # doctest: +SKIP
    ((2, 512, 512, 3), dtype('float32'), True, True)

Sampling follows diffusers' ``StableDiffusionPipeline`` step for step: the folder's scheduler
class and config (read as diffusers reads them: the class from ``model_index.json``, missing keys
at that class's defaults, then the pipeline's fix-ups ``steps_offset = 1`` and
``clip_sample = False``), the negative prompt ``""`` by default, no guidance (and no
unconditional half) when ``guidance_scale <= 1``. With the same starting ``latents`` the images
agree with diffusers' to float32 rounding.

Schedulers: :data:`SAMPLING_LOOPS` maps a diffusers scheduler class to the function that builds
its sampling loop from :mod:`jaxdiff.samplers`; ``sampler=`` (a class name or a short name from
:data:`SAMPLER_NAMES`) overrides the folder's choice. ``PNDMScheduler`` (SD 1.x) runs its PLMS
steps (``samplers.pndm_sample``); a config asking for the Runge-Kutta warm-up
(``skip_prk_steps=False``) is sampled with PLMS's improved-Euler start instead, with a warning:
the first steps then differ from diffusers'.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import guidance, samplers
from jaxdiff import schedules as schedules_lib
from jaxdiff.clip.text_encoder import (
    CLIPTextEncoder,
    text_encoder_params_from_torch,
    text_encoder_params_to_torch,
)
from jaxdiff.clip.tokenizer import Tokenizer
from jaxdiff.models.hf_config import DIFFUSERS_VERSION_WRITTEN, model_index_classes, read_json, write_json
from jaxdiff.models.state_dicts import read_state_dict
from jaxdiff.models.unet_cond import UNet2DCondition, unet_cond_params_from_torch, unet_cond_params_to_torch
from jaxdiff.models.vae import AutoencoderKL, vae_params_from_torch, vae_params_to_torch
from jaxdiff.schedules import Schedule

__all__ = [
    "RANDOM_PIPELINE_SIZES",
    "SAMPLER_NAMES",
    "SAMPLING_LOOPS",
    "SCHEDULER_DEFAULTS",
    "TextToImage",
    "load_text_to_image",
    "pipeline_scheduler_config",
    "save_text_to_image",
    "write_random_pipeline",
]

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
SampleLoop = Callable[[EpsFn, jax.Array, jax.Array], jax.Array]
"""``loop(eps_fn, noise, key) -> z_0``: ``noise`` is the standard normal starting draw (diffusers'
``latents`` argument), scaled by the loop to its scheduler's initial noise level."""
LoopBuilder = Callable[[Mapping[str, Any], Schedule, int], SampleLoop]
"""``build(scheduler_config, schedule, num_steps) -> loop``."""

_DOWNLOAD_HINT = (
    "Download the pipeline first, e.g. `huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 "
    "--local-dir <folder>` (or `StableDiffusionPipeline.from_pretrained(...).save_pretrained(<folder>)`); "
    "jaxdiff never downloads at run time."
)
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


# ---------------------------------------------------------------------------------------------
# Schedulers


_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "trained_betas": None}
SCHEDULER_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "DDIMScheduler": {**_BETAS, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
                      "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
                      "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
                      "rescale_betas_zero_snr": False},
    "DDPMScheduler": {**_BETAS, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
                      "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
                      "sample_max_value": 1.0, "timestep_spacing": "leading", "steps_offset": 0,
                      "rescale_betas_zero_snr": False},
    "PNDMScheduler": {**_BETAS, "skip_prk_steps": False, "set_alpha_to_one": False, "prediction_type": "epsilon",
                      "timestep_spacing": "leading", "steps_offset": 0},
}
"""The defaults of diffusers' scheduler classes, for the keys a ``scheduler_config.json`` leaves out."""


def pipeline_scheduler_config(config: Mapping[str, Any], class_name: str | None = None) -> dict[str, Any]:
    """The scheduler config a ``StableDiffusionPipeline`` runs with.

    ``class_name`` (default: the config's ``_class_name``) fills the keys the config leaves out
    with that class's defaults (:data:`SCHEDULER_DEFAULTS`); then the pipeline's own fix-ups
    apply: ``steps_offset`` becomes 1 and ``clip_sample`` False (diffusers warns about old configs
    and changes them the same way).

    Example:
        >>> cfg = pipeline_scheduler_config({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear"})
        >>> cfg["steps_offset"], cfg["clip_sample"], cfg["set_alpha_to_one"]
        (1, False, True)
    """
    class_name = class_name or config.get("_class_name", "PNDMScheduler")
    out = {**SCHEDULER_DEFAULTS.get(class_name, {}), **config, "_class_name": class_name}
    out["steps_offset"] = 1  # every scheduler class the pipeline runs has the key
    if out.get("clip_sample") is True:
        out["clip_sample"] = False
    return out


def _sampler_loop(name: str) -> LoopBuilder:
    """The loop builder of ``samplers.SAMPLE_FUNCTIONS[name]``, set up from the scheduler config."""

    def build(config: Mapping[str, Any], schedule: Schedule, num_steps: int) -> SampleLoop:
        if name == "pndm" and not config.get("skip_prk_steps", False):
            warnings.warn(
                "PNDMScheduler config with skip_prk_steps=False: jaxdiff runs PLMS steps only, starting with "
                "PLMS's improved-Euler warm-up instead of the Runge-Kutta (PRK) steps, so the first steps differ "
                "from diffusers'", stacklevel=4)
        kwargs = samplers.kwargs_from_diffusers_config(config, schedule, sampler=name)
        sample = samplers.SAMPLE_FUNCTIONS[name]
        return lambda eps_fn, noise, key: sample(eps_fn, schedule, noise, key, num_steps=num_steps, **kwargs)

    return build


SAMPLING_LOOPS: dict[str, LoopBuilder] = {
    "DDIMScheduler": _sampler_loop("ddim"),
    "DDPMScheduler": _sampler_loop("ddpm"),
    "PNDMScheduler": _sampler_loop("pndm"),
    "DPMSolverMultistepScheduler": _sampler_loop("dpm_solver"),
    "UniPCMultistepScheduler": _sampler_loop("unipc"),
    "EulerDiscreteScheduler": _sampler_loop("euler"),
    "EulerAncestralDiscreteScheduler": _sampler_loop("euler_ancestral"),
    "HeunDiscreteScheduler": _sampler_loop("heun"),
}
"""diffusers scheduler class -> builder of its sampling loop (one line per scheduler)."""

SAMPLER_NAMES: dict[str, str] = {
    name: class_name for class_name, name in samplers.SCHEDULER_CLASSES.items() if class_name in SAMPLING_LOOPS
}
"""Short sampler names accepted by ``sampler=`` (``"ddim"``, ``"pndm"``, ``"dpm_solver"``, ...)."""


def _resolve_sampler(name: str) -> str:
    class_name = SAMPLER_NAMES.get(name, name)
    if class_name not in SAMPLING_LOOPS:
        raise ValueError(
            f"unsupported scheduler / sampler {name!r}; jaxdiff's text-to-image pipeline supports "
            f"{sorted(SAMPLING_LOOPS)} (or the short names {sorted(SAMPLER_NAMES)}); pass sampler=... to use one "
            "of them"
        )
    return class_name


def _check_scheduler_config(config: Mapping[str, Any]) -> None:
    if config.get("thresholding"):
        raise ValueError("scheduler configs with thresholding=True are not supported")
    schedules_lib.check_prediction_type(config.get("prediction_type", "epsilon"))


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass(frozen=True, eq=False)
class TextToImage:
    """A Stable Diffusion pipeline: text encoder, conditional U-Net, VAE, tokenizer and scheduler.

    Build it with :func:`load_text_to_image`. The networks are Flax modules and ``params`` a dict
    ``{"text_encoder", "unet", "vae"}`` of their parameters; every method takes the params as an
    argument (``pipe.params`` or fine-tuned ones), so one compiled program serves any weights.

    Attributes:
        text_encoder, unet, vae: the Flax modules.
        tokenizer: the folder's CLIP tokenizer.
        scheduler_config: the scheduler config the pipeline samples with (class defaults and
            the pipeline's fix-ups applied; ``_class_name`` included). ``sampler=`` another class
            reads the folder's file (``raw_configs["scheduler"]``) with that class's defaults, as
            diffusers does when a pipeline is built with ``OtherScheduler.from_pretrained(folder,
            subfolder="scheduler")``.
        params: the parameters.
        height, width: default image size in pixels.
        sampler: the scheduler class sampled with (``SAMPLING_LOOPS`` key).
        clip_skip: text-encoder layers skipped (diffusers' ``clip_skip``; 0: the last layer).
        raw_configs: the components' configs as read (written back by :func:`save_text_to_image`).
    """

    text_encoder: CLIPTextEncoder
    unet: UNet2DCondition
    vae: AutoencoderKL
    tokenizer: Tokenizer
    scheduler_config: Mapping[str, Any]
    params: Mapping[str, Any]
    height: int
    width: int
    sampler: str
    clip_skip: int = 0
    raw_configs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _resolve_sampler(self.sampler)
        _check_scheduler_config(self.scheduler_config)
        if self.vae.latent_channels != self.unet.in_channels:
            raise ValueError(f"VAE latent_channels {self.vae.latent_channels} != U-Net in_channels {self.unet.in_channels}")

    # -------------------------------------------------------------- pieces
    @functools.cached_property
    def schedule(self) -> Schedule:
        """The training noise schedule of the scheduler config."""
        return schedules_lib.from_diffusers_config(self.scheduler_config)

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """``(batch, height / f, width / f, latent_channels)`` for images of ``height x width``."""
        height, width = height or self.height, width or self.width
        f = self.vae.downscale
        multiple = f * 2 ** (len(self.unet.block_out_channels) - 1)
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        return (batch, height // f, width // f, self.vae.latent_channels)

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """Token ids ``int32 [N, 77]`` of ``texts``, as the folder's tokenizer pads and truncates them."""
        return self.tokenizer(texts)

    def encode_text(self, params: Mapping[str, Any], ids: jax.typing.ArrayLike) -> jax.Array:
        """The hidden states the U-Net reads, ``[N, T, D]``, for token ids ``[N, T]``."""
        return self._encode_text_jit(params["text_encoder"], jnp.asarray(ids, jnp.int32))

    @functools.cached_property
    def _encode_text_jit(self):
        return jax.jit(self._encode_text)

    def _encode_text(self, text_params: Any, ids: jax.Array) -> jax.Array:
        return self.text_encoder.apply({"params": text_params}, ids, skip_layers=self.clip_skip)

    def decode(self, params: Mapping[str, Any], latents: jax.Array) -> jax.Array:
        """Images float32 ``[N, H, W, 3]`` in [0, 1] of diffusion latents (scaled, as sampled)."""
        return self._decode_jit(params["vae"], latents)

    @functools.cached_property
    def _decode_jit(self):
        return jax.jit(self._decode)

    def _decode(self, vae_params: Any, latents: jax.Array) -> jax.Array:
        images = self.vae.apply({"params": vae_params}, latents / self.vae.scaling_factor, method="decode")
        return jnp.clip(images / 2.0 + 0.5, 0.0, 1.0)

    # -------------------------------------------------------------- sampling
    def __call__(
        self,
        params: Mapping[str, Any],
        key: jax.Array,
        ids: jax.typing.ArrayLike,
        negative_ids: jax.typing.ArrayLike | None = None,
        num_steps: int = 30,
        guidance_scale: float = 7.5,
        latents: jax.typing.ArrayLike | None = None,
        *,
        sampler: str | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> jax.Array:
        """Images float32 ``[N, H, W, 3]`` in [0, 1] for the prompts ``ids``, in one jitted program.

        Args:
            params: ``{"text_encoder", "unet", "vae"}`` parameters.
            key: a ``jax.random.key``; split into the starting noise and the sampler's key.
            ids: ``[N, T]`` token ids (:meth:`tokenize`).
            negative_ids: ``[N, T]`` or ``[1, T]`` ids of negative prompts; None: the empty prompt.
            num_steps: sampler steps (static).
            guidance_scale: classifier-free guidance weight ``w``; ``<= 1`` runs the conditional
                network alone. Different values share one compiled program (while staying on the
                same side of 1).
            latents: optional starting noise ``[N, H/f, W/f, C]`` (NHWC; diffusers' ``latents``
                transposed), before the scheduler's scaling; drawn from ``key`` when None.
            sampler: a scheduler class or short name overriding :attr:`sampler`.
            height, width: image size (default :attr:`height` x :attr:`width`).
        """
        ids = jnp.asarray(ids, jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"ids must be [N, T] token ids, got shape {ids.shape}")
        if negative_ids is None:
            negative_ids = self.tokenize([""])
        negative_ids = jnp.asarray(negative_ids, jnp.int32)
        shape = self.latent_shape(ids.shape[0], height, width)
        if latents is not None:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.shape != shape:
                raise ValueError(f"latents must have shape {shape} (NHWC), got {latents.shape}")
        use_guidance = float(guidance_scale) > 1.0
        loop = self.sampling_loop(sampler or self.sampler, int(num_steps))
        return self._generate_jit(
            params, key, ids, negative_ids, jnp.float32(guidance_scale), latents,
            loop=loop, use_guidance=use_guidance, latent_shape=shape,
        )

    def sampling_loop(self, sampler: str, num_steps: int) -> SampleLoop:
        """The sampling loop ``loop(eps_fn, noise, key) -> z_0`` of a scheduler (built once, then cached).

        Built outside any trace: the loop builders read concrete schedule values.
        """
        class_name = _resolve_sampler(sampler)
        cache_key = (class_name, num_steps)
        if cache_key not in self._loops:
            # Another class reads the keys the folder's file sets; the others take its own defaults.
            config = pipeline_scheduler_config(self.raw_configs.get("scheduler") or self.scheduler_config, class_name)
            _check_scheduler_config(config)
            self._loops[cache_key] = SAMPLING_LOOPS[class_name](config, self.schedule, num_steps)
        return self._loops[cache_key]

    @functools.cached_property
    def _loops(self) -> dict[tuple[str, int], SampleLoop]:
        return {}

    @functools.cached_property
    def _generate_jit(self):
        return jax.jit(self._generate, static_argnames=("loop", "use_guidance", "latent_shape"))

    def _generate(self, params, key, ids, negative_ids, guidance_scale, latents, *, loop, use_guidance,
                  latent_shape):
        k_noise, k_sample = jax.random.split(key)
        noise = jax.random.normal(k_noise, latent_shape, jnp.float32) if latents is None else latents
        context = self._encode_text(params["text_encoder"], ids)

        def unet(x, t, c):
            return self.unet.apply({"params": params["unet"]}, x, t, c)

        if use_guidance:
            negative = self._encode_text(params["text_encoder"], negative_ids)
            eps_fn = guidance.classifier_free(unet, context, guidance_scale, uncond_context=negative)
        else:
            def eps_fn(x, t):
                return unet(x, t, context)
        z_0 = loop(eps_fn, noise, k_sample)
        return self._decode(params["vae"], z_0)


# ---------------------------------------------------------------------------------------------
# Folders


def _read_weights(folder: Path, stem: str = "diffusion_pytorch_model") -> dict[str, np.ndarray]:
    return read_state_dict(folder, stem, hint=_DOWNLOAD_HINT)


def _default_size(unet_config: Mapping[str, Any], vae_scale: int) -> tuple[int, int]:
    size = unet_config.get("sample_size") or 64
    version = str(unet_config.get("_diffusers_version", "1"))
    try:
        old = tuple(int(p) for p in version.split(".")[:2]) < (0, 9)
    except ValueError:
        old = False
    if isinstance(size, int) and old and size < 64:  # StableDiffusionPipeline's own fix-up
        size = 64
    h, w = (size, size) if isinstance(size, int) else size
    return h * vae_scale, w * vae_scale


def load_text_to_image(
    folder: str | os.PathLike,
    height: int | None = None,
    width: int | None = None,
    *,
    dtype: Any = jnp.float32,
    sampler: str | None = None,
    clip_skip: int | None = None,
) -> TextToImage:
    """Load a diffusers ``StableDiffusionPipeline`` folder (SD 1.x or 2.x layout) as a :class:`TextToImage`.

    The folder holds ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/``
    (and usually ``model_index.json``, which names the scheduler class). Weights may be
    safetensors (``.fp16`` variants and shards included) or legacy ``.bin`` pickles (these need
    PyTorch); text-encoder keys with or without ``text_model.``, and the VAE's pre-2023
    attention names, load.

    Args:
        folder: the local pipeline folder.
        height, width: default image size (the U-Net's ``sample_size`` times the VAE factor).
        dtype: parameter and compute dtype of the three networks (``jnp.bfloat16`` halves memory;
            norms' statistics and attention softmaxes stay float32, the latents and the sampler
            float32).
        sampler: override the folder's scheduler (a class or short name, see
            :data:`SAMPLER_NAMES`).
        clip_skip: skip this many final text-encoder layers (diffusers' ``clip_skip``).

    Raises:
        FileNotFoundError: missing components, naming what goes where.
        ValueError: an unsupported scheduler, naming the supported ones; unsupported model options.

    Example::

        >>> pipe = load_text_to_image("checkpoints/stable-diffusion-2-1-base", dtype=jnp.bfloat16)  # doctest: +SKIP
        >>> images = pipe(pipe.params, jax.random.key(0), pipe.tokenize(["a red bicycle"]))  # doctest: +SKIP
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no pipeline folder at {str(root)!r}. {_DOWNLOAD_HINT}")
    missing = [c for c in _COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{str(root)!r} is not a StableDiffusionPipeline folder: missing {missing} (expected {list(_COMPONENTS)}). "
            f"{_DOWNLOAD_HINT}"
        )
    classes = model_index_classes(root)
    unet_config = read_json(root / "unet" / "config.json")
    vae_config = read_json(root / "vae" / "config.json")
    text_config = read_json(root / "text_encoder" / "config.json")
    scheduler_raw = read_json(root / "scheduler" / "scheduler_config.json")
    scheduler_class = classes.get("scheduler") or scheduler_raw.get("_class_name", "PNDMScheduler")
    chosen = _resolve_sampler(sampler or scheduler_class)
    scheduler_config = pipeline_scheduler_config(scheduler_raw, chosen)

    unet = UNet2DCondition.from_config(unet_config, dtype=dtype, param_dtype=dtype)
    vae = AutoencoderKL.from_config(vae_config, dtype=dtype, param_dtype=dtype)
    text_encoder = CLIPTextEncoder.from_config(text_config, dtype=dtype, param_dtype=dtype)
    tokenizer = Tokenizer.from_pretrained(root / "tokenizer")
    if tokenizer.context_length > text_encoder.max_position_embeddings:
        tokenizer.context_length = text_encoder.max_position_embeddings
    params = {
        "text_encoder": text_encoder_params_from_torch(_read_weights(root / "text_encoder", "model"), text_encoder),
        "unet": unet_cond_params_from_torch(_read_weights(root / "unet"), unet),
        "vae": vae_params_from_torch(_read_weights(root / "vae"), vae),
    }
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    default_h, default_w = _default_size(unet_config, vae.downscale)
    return TextToImage(
        text_encoder=text_encoder, unet=unet, vae=vae, tokenizer=tokenizer, scheduler_config=scheduler_config,
        params=params, height=height or default_h, width=width or default_w, sampler=chosen,
        clip_skip=clip_skip or 0,
        raw_configs={"unet": unet_config, "vae": vae_config, "text_encoder": text_config, "scheduler": scheduler_raw},
    )


def save_text_to_image(
    folder: str | os.PathLike, pipe: TextToImage, params: Mapping[str, Any] | None = None
) -> Path:
    """Write ``pipe`` (with ``params``, default ``pipe.params``) as a ``StableDiffusionPipeline`` folder.

    ``diffusers.StableDiffusionPipeline.from_pretrained(folder)`` loads it (no safety checker),
    and so does :func:`load_text_to_image`. Weights are float32 safetensors; the configs keep the
    keys they were read with.

    Example::

        >>> save_text_to_image("out/my-sd", pipe, fine_tuned_params)  # doctest: +SKIP
    """
    from safetensors.numpy import save_file

    params = pipe.params if params is None else params
    root = Path(folder)
    for component in _COMPONENTS:
        (root / component).mkdir(parents=True, exist_ok=True)
    raw = pipe.raw_configs
    for name, module, to_torch, stem in (
        ("unet", pipe.unet, unet_cond_params_to_torch, "diffusion_pytorch_model"),
        ("vae", pipe.vae, vae_params_to_torch, "diffusion_pytorch_model"),
        ("text_encoder", pipe.text_encoder, text_encoder_params_to_torch, "model"),
    ):
        config = {**raw.get(name, {}), **module.to_config()}
        if name != "text_encoder":
            config["_diffusers_version"] = DIFFUSERS_VERSION_WRITTEN
        write_json(root / name / "config.json", config)
        save_file(to_torch(params[name], module), root / name / f"{stem}.safetensors", metadata={"format": "pt"})
    pipe.tokenizer.save_pretrained(root / "tokenizer")
    scheduler = {**raw.get("scheduler", {}), **pipe.scheduler_config, "_diffusers_version": DIFFUSERS_VERSION_WRITTEN}
    write_json(root / "scheduler" / "scheduler_config.json", scheduler)
    write_json(root / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION_WRITTEN,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", pipe.scheduler_config["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    return root


# ---------------------------------------------------------------------------------------------
# Random-weight pipelines (tests, notebooks, benchmarks): built by diffusers itself


RANDOM_PIPELINE_SIZES: Mapping[str, Mapping[str, Any]] = {
    # 32x32 images, 16x16 latents: the tests' pipelines.
    "tiny": {"unet": {"sample_size": 16, "block_out_channels": (32, 64), "layers_per_block": 1,
                      "norm_num_groups": 8, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                      "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
             "heads": {"sd1": 2, "sd2": (2, 4)},
             "vae": {"block_out_channels": (32, 64), "norm_num_groups": 8, "layers_per_block": 1},
             "text": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                      "num_hidden_layers": {"sd1": 2, "sd2": 3}}},
    # 64x64 images, 16x16 latents, SD's block layout at a fraction of its width: CPU benchmarks.
    "small": {"unet": {"sample_size": 16, "block_out_channels": (64, 128, 128), "layers_per_block": 2,
                       "norm_num_groups": 32,
                       "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")},
              "heads": {"sd1": 4, "sd2": (2, 4, 4)},
              "vae": {"block_out_channels": (32, 64, 64), "norm_num_groups": 32, "layers_per_block": 1},
              "text": {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4,
                       "num_hidden_layers": {"sd1": 4, "sd2": 4}}},
}
"""Architectures of :func:`write_random_pipeline`."""


def write_random_pipeline(folder: str | os.PathLike, variant: str = "sd1", size: str = "tiny", *, seed: int = 0,
                          perturb: bool = True) -> Any:
    """Write a ``StableDiffusionPipeline`` folder with random weights, built by diffusers itself.

    For tests, notebooks and benchmarks where no real checkpoint is on disk (needs torch,
    diffusers and transformers; nothing is downloaded: the tokenizer is jaxdiff's bundled CLIP
    vocabulary). ``variant="sd1"``: SD 1.x's conventions (PNDM/PLMS, epsilon prediction,
    QuickGELU text encoder, 1x1-convolution projections, padding with ``<|endoftext|>``);
    ``"sd2"``: SD 2.x's (DDIM, v-prediction, GELU, linear projections, a head count per block,
    ``upcast_attention``, padding with ``!``). ``size`` is a key of
    :data:`RANDOM_PIPELINE_SIZES`. ``perturb`` adds noise to the 1-D parameters (norm gains,
    biases), which PyTorch initialises to exactly 1 or 0.

    Returns:
        The diffusers ``StableDiffusionPipeline`` that was saved (on the CPU, float32).

    Example::

        >>> torch_pipe = write_random_pipeline("/tmp/tiny-sd", "sd2")  # doctest: +SKIP
        >>> pipe = load_text_to_image("/tmp/tiny-sd")  # doctest: +SKIP
    """
    import diffusers  # imported here: only this helper needs PyTorch
    import torch
    import transformers

    if variant not in ("sd1", "sd2"):
        raise ValueError(f"variant must be 'sd1' or 'sd2', got {variant!r}")
    spec = RANDOM_PIPELINE_SIZES[size]
    sd2 = variant == "sd2"
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as vocab_dir:
        Tokenizer().save_pretrained(vocab_dir)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(
            vocab_dir, pad_token="!" if sd2 else "<|endoftext|>", model_max_length=77)
    text = dict(spec["text"], num_hidden_layers=spec["text"]["num_hidden_layers"][variant])
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **text))
    unet = diffusers.UNet2DConditionModel(
        cross_attention_dim=text["hidden_size"], attention_head_dim=spec["heads"][variant], use_linear_projection=sd2,
        upcast_attention=sd2, **spec["unet"])
    vae = diffusers.AutoencoderKL(
        latent_channels=4, sample_size=spec["unet"]["sample_size"] * 2 ** (len(spec["vae"]["block_out_channels"]) - 1),
        down_block_types=("DownEncoderBlock2D",) * len(spec["vae"]["block_out_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(spec["vae"]["block_out_channels"]), **spec["vae"])
    betas = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": False,
             "steps_offset": 1}
    if sd2:
        scheduler = diffusers.DDIMScheduler(clip_sample=False, prediction_type="v_prediction", **betas)
    else:
        scheduler = diffusers.PNDMScheduler(skip_prk_steps=True, **betas)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in (text_encoder, unet, vae):
            module.eval()
            for p in module.parameters():
                if perturb and p.ndim == 1:
                    p.add_(0.1 * torch.randn(p.shape, generator=generator))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe
