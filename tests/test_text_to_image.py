"""Text-to-image (latent diffusion) against diffusers: text encoder, U-Net, VAE, whole pipeline.

Two tiny random-weight Stable Diffusion pipelines are built by diffusers and transformers
themselves (``write_random_pipeline``) and then edited on disk into the older layouts real
checkpoints have: SD 1.x style (PNDM/PLMS, QuickGELU, convolution projections, padding with
``<|endoftext|>``, a hub-style scheduler config, ``text_model.``-prefixed text-encoder keys, the
VAE's pre-2023 attention names, ``vocab.json`` + ``merges.txt``) and SD 2.x style (DDIM,
v-prediction, GELU, linear projections, a head count per block, padding with ``!``, a scheduler
config without ``steps_offset`` and with ``clip_sample: true``, which the pipeline fixes up).
The references are ``diffusers.StableDiffusionPipeline.from_pretrained`` of the same folders.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO

from jaxdiff import pretrained
from jaxdiff import text_to_image as t2i
from jaxdiff.clip import Tokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

# The SD 2.x-style folder's old scheduler config is deliberate: diffusers' warning about it is expected.
pytestmark = pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")

PROMPTS = ["a photo of a cat!", "Wow?! a dog, in the SNOW"]
UNET_ATOL = VAE_ATOL = TEXT_ATOL = 2e-5
PIPELINE_ATOL = 2e-4


def _rewrite_weights(path, rename):
    sd = safetensors_numpy.load_file(path)
    safetensors_numpy.save_file({rename(k): v for k, v in sd.items()}, path, metadata={"format": "pt"})


def _legacy_vae_name(key):
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
        key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
    return key


def _make_sd1(folder):
    t2i.write_random_pipeline(folder, "sd1", seed=0)
    # As on the hub for SD 1.x: text_model.-prefixed keys, old VAE attention names, the old
    # tokenizer files and the scheduler config that CompVis shipped.
    _rewrite_weights(folder / "text_encoder" / "model.safetensors", lambda k: "text_model." + k)
    _rewrite_weights(folder / "vae" / "diffusion_pytorch_model.safetensors", _legacy_vae_name)
    for f in (folder / "tokenizer").iterdir():
        f.unlink()
    Tokenizer(pad_token_id=49407).save_pretrained(folder / "tokenizer")  # pads with <|endoftext|>
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.2.2", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False}))


def _make_sd2(folder):
    t2i.write_random_pipeline(folder, "sd2", seed=1)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": True, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
        "set_alpha_to_one": False, "skip_prk_steps": True, "trained_betas": None}))


def _case(variant, tmp_path_factory):
    """(variant, folder, diffusers pipeline loaded from it, jaxdiff pipeline loaded from it)."""
    folder = tmp_path_factory.mktemp(variant)
    (_make_sd1 if variant == "sd1" else _make_sd2)(folder)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    return variant, folder, reference, pretrained.load_text_to_image(folder)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _case("sd1", tmp_path_factory)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return _case("sd2", tmp_path_factory)


@pytest.fixture(params=["sd1", "sd2"])
def case(request):
    return request.getfixturevalue(request.param)


@functools.lru_cache(maxsize=None)
def _jitted_apply(module):
    return jax.jit(module.apply)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(x):
    return x.detach().numpy().transpose(0, 2, 3, 1)


def test_folder_is_read_as_diffusers_reads_it(case):
    variant, _, reference, pipe = case
    assert pipe.sampler == type(reference.scheduler).__name__ == ("PNDMScheduler" if variant == "sd1" else "DDIMScheduler")
    for key, value in reference.scheduler.config.items():
        if not key.startswith("_"):
            assert pipe.scheduler_config[key] == value, key
    np.testing.assert_allclose(np.asarray(pipe.schedule.alphas_cumprod), reference.scheduler.alphas_cumprod.numpy(),
                               rtol=1e-6)
    assert (pipe.height, pipe.width) == (32, 32)


def test_tokenizer_matches_transformers(case):
    _, _, reference, pipe = case
    prompts = PROMPTS + ["", "hello!!", "a <|endoftext|> b", "word " * 100]
    expected = reference.tokenizer(prompts, padding="max_length", max_length=reference.tokenizer.model_max_length,
                                   truncation=True).input_ids
    got = pipe.tokenize(prompts)
    assert got.dtype == np.int32 and got.shape == (len(prompts), 77)
    assert got.tolist() == expected
    assert pipe.tokenizer.pad_token_id == reference.tokenizer.pad_token_id


def test_text_embeddings_match(case):
    variant, _, reference, pipe = case
    ids = pipe.tokenize(PROMPTS)
    with torch.no_grad():
        expected, _ = reference.encode_prompt(PROMPTS, "cpu", 1, False)
    got = pipe.encode_text(pipe.params, ids)
    assert got.shape == (2, 77, 32)
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=TEXT_ATOL, rtol=0)
    if variant == "sd2":  # the penultimate layer, through the final LayerNorm (diffusers' clip_skip=1)
        skipping = dataclasses.replace(pipe, clip_skip=1)
        # What encode_prompt(clip_skip=1) computes; diffusers 0.42 reaches the LayerNorm through
        # `text_encoder.text_model`, which transformers v5 no longer has.
        encoder = reference.text_encoder
        with torch.no_grad():
            hidden = encoder(torch.from_numpy(ids).long(), output_hidden_states=True).hidden_states
            expected = encoder.final_layer_norm(hidden[-2])
        got_skip = skipping.encode_text(pipe.params, ids)
        np.testing.assert_allclose(np.asarray(got_skip), expected.numpy(), atol=TEXT_ATOL, rtol=0)
        assert np.abs(np.asarray(got_skip) - np.asarray(got)).max() > 0.1


def _unet_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4), dtype=np.float32)
    context = rng.standard_normal((2, 77, 32), dtype=np.float32)
    return x, np.array([3, 871]), context


def test_unet_matches(case):
    _, _, reference, pipe = case
    x, t, context = _unet_inputs()
    with torch.no_grad():
        expected = _nhwc(reference.unet(_nchw(x), torch.from_numpy(t), torch.from_numpy(context)).sample)
    got = _jitted_apply(pipe.unet)({"params": pipe.params["unet"]}, x, t, context)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, atol=UNET_ATOL, rtol=0)
    assert np.abs(expected).max() > 0.5  # a real comparison, not of two near-zero outputs


def test_vae_matches(case):
    _, _, reference, pipe = case
    images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        mean = _nhwc(reference.vae.encode(_nchw(images)).latent_dist.mean)
        decoded = _nhwc(reference.vae.decode(_nchw(mean)).sample)
    vae = pipe.vae
    got_mean = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(pipe.params["vae"], images)
    got_img = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))(pipe.params["vae"], mean)
    np.testing.assert_allclose(np.asarray(got_mean), mean, atol=VAE_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(got_img), decoded, atol=VAE_ATOL, rtol=0)


def test_pipeline_matches_with_fixed_latents(case):
    variant, _, reference, pipe = case
    latents = np.random.default_rng(2).standard_normal((2, 16, 16, 4), dtype=np.float32)
    negative = ["blurry", "ugly!"] if variant == "sd1" else None  # sd2: the empty negative prompt
    with torch.no_grad():
        expected = reference(PROMPTS, negative_prompt=negative, num_inference_steps=4, guidance_scale=7.5,
                             latents=_nchw(latents), output_type="np").images
    negative_ids = None if negative is None else pipe.tokenize(negative)
    got = pipe(pipe.params, jax.random.key(0), pipe.tokenize(PROMPTS), negative_ids, num_steps=4,
               guidance_scale=7.5, latents=latents)
    assert got.shape == (2, 32, 32, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, atol=PIPELINE_ATOL, rtol=0)
    assert expected.std() > 0.05
    # Another key and guidance scale reuse the compiled program.
    pipe(pipe.params, jax.random.key(1), pipe.tokenize(PROMPTS), negative_ids, num_steps=4, guidance_scale=3.0,
         latents=latents)
    assert pipe._generate_jit._cache_size() == 1


def test_no_guidance_runs_the_conditional_network_alone(sd2):
    _, _, reference, pipe = sd2
    latents = np.random.default_rng(3).standard_normal((2, 16, 16, 4), dtype=np.float32)
    with torch.no_grad():
        expected = reference(PROMPTS, num_inference_steps=3, guidance_scale=1.0, latents=_nchw(latents),
                             output_type="np").images
    got = pipe(pipe.params, jax.random.key(0), pipe.tokenize(PROMPTS), num_steps=3, guidance_scale=1.0,
               latents=latents)
    np.testing.assert_allclose(np.asarray(got), expected, atol=PIPELINE_ATOL, rtol=0)


def _fake_model(x, t):
    """The dummy network of diffusers' scheduler tests, with a non-linear twist."""
    t = t.astype(x.dtype)[:, None, None, None]
    return x * t / (t + 1) + 0.1 * jnp.cos(x)


def _diffusers_loop(scheduler, x_T, num_steps):
    """diffusers' denoising loop (as StableDiffusionPipeline runs it) over :func:`_fake_model`."""
    scheduler.set_timesteps(num_steps)
    sample = torch.from_numpy(x_T) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        t_batch = jnp.full((len(x_T),), float(t), jnp.float32)
        out = np.array(_fake_model(jnp.asarray(model_input.numpy()), t_batch))  # a writable copy for torch
        sample = scheduler.step(torch.from_numpy(out), t, sample).prev_sample
    return sample.numpy()


@pytest.mark.parametrize("variant,scheduler_class", [
    ("sd1", "PNDMScheduler"), ("sd2", "DDIMScheduler"),  # the folders' own schedulers
    ("sd1", "DDIMScheduler"), ("sd1", "DPMSolverMultistepScheduler"), ("sd1", "EulerDiscreteScheduler"),
    ("sd1", "UniPCMultistepScheduler"),  # sampler= overrides of the SD 1.x folder's PNDM
])
def test_each_scheduler_runs_as_diffusers_would(request, variant, scheduler_class):
    """The folder's scheduler, or ``sampler=`` another class, as diffusers runs a pipeline built
    with ``OtherScheduler.from_pretrained(folder, subfolder="scheduler")`` (the file's keys, the
    class's defaults for the others, the pipeline's fix-ups); deterministic samplers, a fake network.

    (Not ``OtherScheduler.from_config(pipe.scheduler.config)``: that resets the keys the file left
    out to the new class's defaults *after* the pipeline's fix-ups, so an SD 2.x-style file
    without ``steps_offset`` would sample with 0 there.)
    """
    _, folder, reference, pipe = request.getfixturevalue(variant)
    x_T = np.random.default_rng(4).standard_normal((2, 4, 4, 3), dtype=np.float32)
    scheduler = getattr(diffusers, scheduler_class).from_pretrained(folder, subfolder="scheduler")
    scheduler = diffusers.StableDiffusionPipeline(**{**reference.components, "scheduler": scheduler}).scheduler
    expected = _diffusers_loop(scheduler, x_T, 5)
    loop = pipe.sampling_loop(scheduler_class, 5)  # built outside jit: the builders read concrete values
    got = jax.jit(lambda x: loop(_fake_model, x, jax.random.key(0)))(x_T)
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5, rtol=2e-4)


def test_ddpm_draws_its_noise_from_the_key(sd1):
    _, _, _, pipe = sd1
    x_T = np.random.default_rng(4).standard_normal((2, 4, 4, 3), dtype=np.float32)
    ddpm = pipe.sampling_loop("ddpm", 5)
    ddpm_jit = jax.jit(lambda x, k: ddpm(_fake_model, x, k))
    a, b, c = (np.asarray(ddpm_jit(x_T, jax.random.key(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a)) and np.abs(a - c).max() > 1e-3


def test_save_round_trip(sd1, tmp_path):
    """SD 1.x: the layout with the most conversions on the way in."""
    _, _, reference, pipe = sd1
    params = jax.tree.map(lambda p: p + 0.01, pipe.params)  # a "fine-tuned" pipeline
    pretrained.save_text_to_image(tmp_path / "out", pipe, params)
    reloaded = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    assert type(reloaded.scheduler).__name__ == "PNDMScheduler" and reloaded.safety_checker is None
    ours = pretrained.load_text_to_image(tmp_path / "out")
    for name in ("unet", "vae", "text_encoder"):
        theirs = {k: v.numpy() for k, v in getattr(reloaded, name).state_dict().items()}
        original = {k: v.numpy() for k, v in getattr(reference, name).state_dict().items()}
        assert theirs.keys() == original.keys(), name
        for k, v in original.items():
            np.testing.assert_array_equal(theirs[k], (v + np.float32(0.01)).astype(np.float32), err_msg=k)
        jax.tree.map(np.testing.assert_array_equal, ours.params[name], params[name])
    assert ours.tokenize(PROMPTS + ["x!"]).tolist() == pipe.tokenize(PROMPTS + ["x!"]).tolist()
    assert reloaded.tokenizer(["x!"]).input_ids == [pipe.tokenize(["x!"])[0, :4].tolist()]
    assert dict(ours.scheduler_config) == dict(pipe.scheduler_config) | {"_diffusers_version": "0.42.1"}


def test_bfloat16(sd1):
    _, folder, _, pipe = sd1
    half = pretrained.load_text_to_image(folder, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(half.params))
    x, t, context = _unet_inputs()
    full = _jitted_apply(pipe.unet)({"params": pipe.params["unet"]}, x, t, context)  # compiled by test_unet_matches
    low = _jitted_apply(half.unet)({"params": half.params["unet"]}, x, t, context)
    assert low.dtype == jnp.float32
    scale = float(jnp.abs(full).max())
    assert 0 < float(jnp.abs(low - full).max()) < 0.05 * scale


# ---------------------------------------------------------------------------------------------
# Schedulers: no networks


def test_scheduler_defaults_match_diffusers():
    for name, defaults in t2i.SCHEDULER_DEFAULTS.items():
        signature = inspect.signature(getattr(diffusers, name).__init__).parameters
        assert set(signature) - {"self"} == set(defaults), name
        for key, value in defaults.items():
            assert signature[key].default == value, (name, key)


def test_pipeline_scheduler_config_fix_ups():
    cfg = t2i.pipeline_scheduler_config({"beta_schedule": "scaled_linear", "clip_sample": True}, "DDIMScheduler")
    assert cfg["steps_offset"] == 1 and cfg["clip_sample"] is False and cfg["set_alpha_to_one"] is True
    cfg = t2i.pipeline_scheduler_config({"_class_name": "PNDMScheduler"})
    assert cfg["steps_offset"] == 1 and "clip_sample" not in cfg and cfg["set_alpha_to_one"] is False


def test_unsupported_scheduler_is_a_clear_error(case):
    _, folder, _, pipe = case
    with pytest.raises(ValueError, match=r"'LMSDiscreteScheduler'.*DDIMScheduler.*PNDMScheduler"):
        pretrained.load_text_to_image(folder, sampler="LMSDiscreteScheduler")
    with pytest.raises(ValueError, match="'KDPM2DiscreteScheduler'.*EulerDiscreteScheduler"):
        pipe(pipe.params, jax.random.key(0), pipe.tokenize(["x"]), sampler="KDPM2DiscreteScheduler")
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        pretrained.load_text_to_image(folder / "unet")


# ---------------------------------------------------------------------------------------------
# The script and the benchmark


def test_script_writes_a_grid(sd1, tmp_path):
    _, folder, _, _ = sd1
    out = tmp_path / "grid.png"
    cmd = [sys.executable, str(REPO / "scripts" / "text_to_image.py"), f"--model={folder}", "--prompt=a red fox!",
           "--negative_prompt=blurry", "--num_images=2", "--steps=2", "--guidance_scale=1", "--sampler=ddim",
           "--seed=3", f"--out={out}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device is enough
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 images 32x32" in proc.stdout and out.is_file()


def test_benchmark_text_to_image_numbers():
    spec = importlib.util.spec_from_file_location("benchmark_script_t2i", REPO / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while the class is built
    spec.loader.exec_module(bench)
    result = bench.text_to_image_benchmark("tiny", steps=1, repeats=1, unet_iters=1, torch_threads=1, pipeline=False)
    for side in ("jaxdiff", "peer"):
        value = result[side]["unet"]["images_per_sec"]
        assert math.isfinite(value) and value > 0
    assert result["ratios"]["unet"] > 0 and result["jaxdiff"]["unet"]["finite"]
    assert "U-Net forward images/s" in bench.format_text_to_image_table(result)
