"""diffusers ``UNet2DModel`` in JAX: exactness against diffusers, folder loading, export."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import pretrained
from jaxdiff.models.diffusers_unet import DiffusersUNet2D

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# The model of the seed notebook (MNIST, 28x28, attention in the two lower-resolution stages);
# everything else is UNet2DModel's default (attention_head_dim 8, 32 groups, eps 1e-5, ...).
NOTEBOOK_CONFIG = {
    "sample_size": 28,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 2,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
}

# google/ddpm-cat-256 (converted from the original DDPM code: sines first, freq_shift 1,
# bottom/right-padded downsampling, eps 1e-6, one attention head over all channels).
CAT_256_CONFIG = {
    "sample_size": 256,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "down_block_types": (
        "DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D",
    ),
    "attention_head_dim": None,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1,
    "time_embedding_type": "positional",
}
CAT_256_PARAMS = 113_673_219

# The same architecture, channels / 8 with 8 groups, run at 32x32.
CAT_SMALL_CONFIG = {**CAT_256_CONFIG, "sample_size": 32, "block_out_channels": (16, 16, 32, 32, 64, 64),
                    "norm_num_groups": 8}

# Less common options: Fourier time features, scale/shift conditioning (mid attention without a
# GroupNorm), class labels, a mid-block output scale, several attention heads.
EXOTIC_CONFIG = {
    "sample_size": 8,
    "in_channels": 2,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "down_block_types": ("AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D"),
    "attention_head_dim": 4,
    "norm_num_groups": 4,
    "time_embedding_type": "fourier",
    "resnet_time_scale_shift": "scale_shift",
    "num_class_embeds": 5,
    "mid_block_scale_factor": 1.5,
    "center_input_sample": True,
}


def _torch_unet(config, seed=0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():  # make norms and biases non-trivial (they initialise to 0 / 1)
        for p in unet.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return unet


def _torch_output(unet, x_nhwc, t, class_labels=None):
    with torch.no_grad():
        out = unet(torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2)), torch.from_numpy(np.asarray(t)),
                   class_labels=None if class_labels is None else torch.from_numpy(class_labels)).sample
    return out.numpy().transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
    # One XLA compilation is ~2.5x cheaper on CPU than compiling every op of an eager call.
    return jax.jit(model.apply)


def _apply(model, params, *args):
    return _jitted_apply(model)({"params": params}, *(jnp.asarray(a) for a in args))


def _inputs(config, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    size = config["sample_size"]
    x = rng.standard_normal((batch, size, size, config["in_channels"]), dtype=np.float32)
    return x


@pytest.fixture(scope="module")
def notebook_pipeline(tmp_path_factory):
    """The notebook's UNet with random weights, saved as a DDPMPipeline folder."""
    path = tmp_path_factory.mktemp("notebook_pipeline")
    unet = _torch_unet(NOTEBOOK_CONFIG)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                        prediction_type="v_prediction", clip_sample=False)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path, unet, scheduler


@pytest.fixture(scope="module")
def notebook_output(notebook_pipeline):
    _, unet, _ = notebook_pipeline
    x = _inputs(NOTEBOOK_CONFIG)
    t = np.array([3, 871])
    return x, t, _torch_output(unet, x, t)


def test_notebook_unet_matches_diffusers(notebook_pipeline, notebook_output):
    path, _, scheduler = notebook_pipeline
    model, params, schedule, sched_cfg = pretrained.load_diffusers(path, return_scheduler_config=True)
    assert sum(a.size for a in jax.tree.leaves(params)) == 1_707_009
    x, t, expected = notebook_output
    got = _apply(model, params, x, t)
    assert got.shape == expected.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)
    # Schedule and sampler settings come from scheduler/scheduler_config.json.
    np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), scheduler.alphas_cumprod.numpy(),
                               atol=1e-6)
    assert sched_cfg.prediction_type == "v_prediction" and sched_cfg.clip_sample is False
    assert sched_cfg.class_name == "DDPMScheduler" and sched_cfg.beta_schedule == "squaredcos_cap_v2"


def test_scaled_down_cat_256_matches_diffusers(tmp_path):
    unet = _torch_unet(CAT_SMALL_CONFIG, seed=1)
    unet.save_pretrained(tmp_path)  # bare model folder: no scheduler config
    model, params, schedule = pretrained.load_diffusers(tmp_path)
    x = _inputs(CAT_SMALL_CONFIG, batch=1)
    t = np.array([500])
    got = _apply(model, params, x, t)
    np.testing.assert_allclose(np.asarray(got), _torch_output(unet, x, t), atol=1e-4, rtol=0)
    # Documented default for bare folders: DDPM linear betas 1e-4 .. 0.02 over 1000 steps.
    np.testing.assert_allclose(np.asarray(schedule.betas), np.linspace(1e-4, 0.02, 1000), atol=1e-7)


def test_exotic_options_match_diffusers(tmp_path):
    unet = _torch_unet(EXOTIC_CONFIG, seed=2)
    params = pretrained.diffusers_params_from_torch(unet.state_dict(), EXOTIC_CONFIG)
    model = DiffusersUNet2D.from_config(EXOTIC_CONFIG)
    x = _inputs(EXOTIC_CONFIG, batch=2)
    sigma = np.array([0.5, 7.0], np.float32)
    labels = np.array([1, 4])
    got = _apply(model, params, x, sigma, labels)
    np.testing.assert_allclose(np.asarray(got), _torch_output(unet, x, sigma, labels), atol=1e-4, rtol=0)


def test_cat_256_parameter_count():
    shapes = pretrained.diffusers_param_shapes(CAT_256_CONFIG)
    ours = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in diffusers.UNet2DModel(**CAT_256_CONFIG).parameters())
    assert ours == theirs == CAT_256_PARAMS


def test_save_diffusers_round_trip(notebook_pipeline, notebook_output, tmp_path):
    path, unet, _ = notebook_pipeline
    model, params, _, sched_cfg = pretrained.load_diffusers(path, return_scheduler_config=True)
    params = jax.tree.map(lambda p: p + 0.01, params)  # a "fine-tuned" model

    bare = pretrained.save_diffusers(params, model, tmp_path / "bare")
    reloaded = diffusers.UNet2DModel.from_pretrained(bare).eval()
    x, t, _ = notebook_output
    np.testing.assert_allclose(_torch_output(reloaded, x, t),
                               np.asarray(_apply(model, params, x, t)),
                               atol=1e-4, rtol=0)
    # Exact inverse: torch -> jax -> torch reproduces every tensor bit for bit.
    original = {k: v.numpy() for k, v in unet.state_dict().items()}
    back = pretrained.diffusers_params_to_torch(
        pretrained.diffusers_params_from_torch(original, NOTEBOOK_CONFIG), NOTEBOOK_CONFIG
    )
    assert back.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(back[k], original[k])

    # A pipeline folder that diffusers' DDPMPipeline and load_diffusers both read.
    pipe_dir = tmp_path / "pipe"
    pretrained.save_diffusers(params, model.to_config(), pipe_dir, scheduler_config=sched_cfg)
    pipe = diffusers.DDPMPipeline.from_pretrained(pipe_dir)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    _, params2, _ = pretrained.load_diffusers(pipe_dir)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_legacy_attention_names_and_bin_weights(notebook_pipeline, tmp_path):
    _, unet, _ = notebook_pipeline
    state = {k: v.numpy() for k, v in unet.state_dict().items()}
    new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in state.items():
        for n, o in new.items():
            k = k.replace(f".{n}.", f".{o}.")
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    a = pretrained.diffusers_params_from_torch(legacy, NOTEBOOK_CONFIG)
    b = pretrained.diffusers_params_from_torch(state, NOTEBOOK_CONFIG)
    jax.tree.map(np.testing.assert_array_equal, a, b)

    unet.save_pretrained(tmp_path, safe_serialization=False)  # legacy torch pickle
    assert (tmp_path / pretrained.WEIGHTS_BIN).is_file()
    _, c, _ = pretrained.load_diffusers(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, c, b)


def test_conversion_errors(notebook_pipeline):
    _, unet, _ = notebook_pipeline
    state = {k: v.numpy() for k, v in unet.state_dict().items()}
    missing = dict(state)
    del missing["mid_block.attentions.0.to_q.weight"]
    with pytest.raises(KeyError, match=r"missing 1 .*mid_block\.attentions\.0\.to_q\.weight"):
        pretrained.diffusers_params_from_torch(missing, NOTEBOOK_CONFIG)
    with pytest.raises(KeyError, match="extra.weight"):
        pretrained.diffusers_params_from_torch({**state, "extra.weight": np.zeros(3)}, NOTEBOOK_CONFIG)
    pretrained.diffusers_params_from_torch({**state, "extra.weight": np.zeros(3)}, NOTEBOOK_CONFIG, strict=False)
    with pytest.raises(ValueError, match="conv_in.weight"):
        pretrained.diffusers_params_from_torch({**state, "conv_in.weight": np.zeros((32, 2, 3, 3))},
                                               NOTEBOOK_CONFIG)


def test_missing_folder_and_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download google/ddpm-cat-256"):
        pretrained.load_diffusers(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        pretrained.load_diffusers(tmp_path)
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"]}))
    (tmp_path / "unet" / "config.json").write_text(json.dumps(NOTEBOOK_CONFIG))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        pretrained.load_diffusers(tmp_path)


def test_unsupported_config_raises_value_error():
    bad = {**NOTEBOOK_CONFIG, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D")}
    with pytest.raises(ValueError, match=r"CrossAttnDownBlock2D.*DownBlock2D.*AttnDownBlock2D"):
        DiffusersUNet2D.from_config(bad)
    with pytest.raises(ValueError, match="SkipUpBlock2D"):
        DiffusersUNet2D.from_config({**NOTEBOOK_CONFIG, "up_block_types": ("SkipUpBlock2D",) * 3})
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        DiffusersUNet2D.from_config({**NOTEBOOK_CONFIG, "_class_name": "UNet2DConditionModel"})
    with pytest.raises(ValueError, match="resnet"):
        DiffusersUNet2D.from_config({**NOTEBOOK_CONFIG, "downsample_type": "resnet"})
    with pytest.warns(UserWarning, match="cross_attention_dim"):  # ignored, as diffusers does
        DiffusersUNet2D.from_config({**NOTEBOOK_CONFIG, "cross_attention_dim": 64})
    # from_config / to_config round-trip.
    model = DiffusersUNet2D.from_config(CAT_256_CONFIG, dtype=jnp.bfloat16)
    assert DiffusersUNet2D.from_config(model.to_config()).to_config() == model.to_config()
    assert model.to_config()["block_out_channels"] == [128, 128, 256, 256, 512, 512]


def test_bfloat16_and_remat():
    config = {**EXOTIC_CONFIG, "time_embedding_type": "positional", "num_class_embeds": None,
              "block_out_channels": (8, 16), "in_channels": 1, "out_channels": 1}
    model = DiffusersUNet2D.from_config(config)
    rng = np.random.default_rng(0)  # model.init would compile one initialiser per shape: slow on CPU
    params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
                          pretrained.diffusers_param_shapes(model))
    x, t = jnp.asarray(_inputs(config, batch=1)), jnp.array([17])

    # remat wraps the ResNet / attention layers in checkpoints (only traced here, not compiled).
    loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, x, t) ** 2)  # noqa: E731
    assert "remat" in str(jax.make_jaxpr(jax.grad(loss(model.clone(remat=True))))(params))
    assert "remat" not in str(jax.make_jaxpr(jax.grad(loss(model)))(params))

    out16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({"params": params}, x, t)
    out32 = jax.jit(model.apply)({"params": params}, x, t)
    assert out16.dtype == out32.dtype == jnp.float32  # the output is float32 whatever the compute dtype
    assert float(jnp.max(jnp.abs(out16 - out32))) < 0.05 * float(jnp.max(jnp.abs(out32))) + 0.02


def test_finetune_config_lowers_the_loss_and_resumes(tmp_path):
    """configs/finetune.py:smoke on a tiny stand-in checkpoint and a generated image folder."""
    from conftest import load_config
    from PIL import Image

    from jaxdiff import train as train_lib

    tiny = {**NOTEBOOK_CONFIG, "in_channels": 3, "out_channels": 3, "sample_size": 32,
            "block_out_channels": (16, 32, 32), "norm_num_groups": 8}  # fmt: skip
    pipeline = tmp_path / "pipeline"
    unet = _torch_unet(tiny)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(pipeline)
    images = tmp_path / "dogs"
    images.mkdir()
    for i in range(8):  # smooth colour patterns: easy to fit
        yy, xx = np.mgrid[0:40, 0:40] / 40.0
        img = np.stack([np.sin(3 * xx + i), np.cos(2 * yy - i), xx * yy], -1) * 0.5 + 0.5
        Image.fromarray((img * 255).astype(np.uint8)).save(images / f"dog{i}.png")

    config = load_config("finetune", "smoke")
    config.model.pretrained = str(pipeline)
    config.data.path = str(images)
    workdir = tmp_path / "run"
    train_lib.train_and_evaluate(config, workdir)
    losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < np.mean(losses[:5])

    _, _, schedule = pretrained.load_diffusers(pipeline)  # the schedule came from the checkpoint
    np.testing.assert_allclose(schedule.betas, train_lib.build_schedule(config).betas)

    config.train.num_steps = 24
    state = train_lib.train_and_evaluate(config, workdir)  # resumes from checkpoint 20
    assert int(state.step) == 24
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 24
    out = tmp_path / "export"
    pretrained.save_diffusers(state.params, pretrained.read_unet_config(pipeline), out)
    reloaded = diffusers.UNet2DModel.from_pretrained(out)
    x = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype(np.float32)
    t = np.array([10])
    model = train_lib.build_model(config)
    np.testing.assert_allclose(_torch_output(reloaded, x, t), _apply(model, state.params, x, t), atol=1e-4)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_scheduler_class_of_a_folder_selects_the_sampler(tmp_path):
    """A folder's scheduler_config.json names the sampler: every class jaxdiff runs, with its settings."""
    from jaxdiff import samplers

    cases = [
        (diffusers.DDIMScheduler(set_alpha_to_one=False, clip_sample=False), "ddim", {"clip_sample": False}),
        (diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, solver_order=3), "dpm_solver",
         {"use_karras_sigmas": True, "order": 3, "algorithm_type": "dpmsolver++"}),
        (diffusers.UniPCMultistepScheduler(solver_type="bh1"), "unipc", {"solver_type": "bh1", "predict_x0": True}),
        (diffusers.EulerDiscreteScheduler(timestep_spacing="trailing"), "euler", {"spacing": "trailing", "ancestral": False}),
        (diffusers.EulerAncestralDiscreteScheduler(), "euler_ancestral", {"ancestral": True}),
        (diffusers.HeunDiscreteScheduler(prediction_type="v_prediction"), "heun", {"prediction_type": "v_prediction"}),
        (diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1), "pndm", {"steps_offset": 1, "spacing": "leading"}),
    ]  # fmt: skip
    for scheduler, name, expected in cases:
        scheduler.save_pretrained(tmp_path / name / "scheduler")
        scheduler_config = pretrained.read_scheduler_config(tmp_path / name)
        sampler, kwargs = scheduler_config.sampler()
        assert sampler == name and expected.items() <= kwargs.items(), (name, kwargs)
        run = functools.partial(samplers.SAMPLE_FUNCTIONS[sampler], lambda x, t: x, scheduler_config.schedule(),
                                key=jax.random.key(0), num_steps=5, **kwargs)  # fmt: skip
        assert jax.eval_shape(run, jax.ShapeDtypeStruct((1, 4), jnp.float32)).shape == (1, 4)  # the settings run
    _, kwargs = pretrained.read_scheduler_config(tmp_path / "ddim").sampler()
    schedule = pretrained.read_scheduler_config(tmp_path / "ddim").schedule()
    assert kwargs["final_alpha_cumprod"] == pytest.approx(float(schedule.alphas_cumprod[0]))  # set_alpha_to_one=False
    diffusers.LMSDiscreteScheduler().save_pretrained(tmp_path / "lms" / "scheduler")
    with pytest.raises(ValueError, match=r"'LMSDiscreteScheduler' is not supported yet; supported: \[.*'DDIMScheduler'"):
        pretrained.read_scheduler_config(tmp_path / "lms").sampler()
