"""Every config a user can type either builds a train step and a sampler, or says what to change.

A property test draws overrides of the numeric and choice fields of every config in
``configs/`` (and its variants), as ``--config.a.b=v`` would set them. Each drawn config must
either pass ``validate_config`` and then build (abstractly: ``jax.eval_shape`` traces the real
train step and sampler, so Flax, optax and XLA shape errors would surface) or raise a
``ValueError`` whose message names an overridden field; never another exception.
"""

from __future__ import annotations

import functools
import json
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import load_config
from hypothesis import HealthCheck, given, settings

from jaxdiff import builders
from jaxdiff import train as train_lib
from jaxdiff.sampling import make_sampler

# (config file, variant): every config of configs/ and its variants.
CONFIGS = [
    ("digits", None),
    ("digits", "conditional"),
    ("digits", "smoke"),
    ("digits", "conditional,smoke"),
    ("flowers", None),
    ("flowers", "smoke"),
    ("image_folder", None),
    ("image_folder", "smoke"),
    ("finetune", None),
    ("finetune", "smoke"),
    ("music", None),
    ("music", "book"),
    ("music", "smoke"),
]

# The fields the property test draws: name -> strategy of the values a user could type.
FIELDS = {
    "train.num_steps": st.integers(-1, 4000),
    "optim.warmup_steps": st.integers(-1, 5000),
    "train.batch_size": st.sampled_from([-1, 0, 1, 3, 8, 12, 16, 32]),
    "train.checkpoint_every": st.integers(-1, 3000),
    "train.log_every": st.integers(-1, 3000),
    "train.sample_every": st.integers(-1, 3000),
    "train.keep_checkpoints": st.integers(-1, 5),
    "train.ema_decay": st.sampled_from([-0.1, 0.0, 0.5, 0.999, 1.0, 1.5]),
    "train.label_dropout": st.sampled_from([-0.1, 0.0, 0.1, 1.0]),
    "optim.learning_rate": st.sampled_from([-1e-3, 0.0, 1e-4, 2e-3, math.inf]),
    "optim.b1": st.sampled_from([-0.1, 0.0, 0.9, 1.0]),
    "optim.b2": st.sampled_from([0.99, 1.0, 1.5]),
    "optim.grad_accum_steps": st.integers(0, 3),
    "optim.grad_clip_norm": st.sampled_from([-1.0, 0.0, 1.0]),
    "data.image_size": st.sampled_from([0, 4, 8, 12, 16, 20, 32, 64]),
    "data.channels": st.sampled_from([0, 1, 2, 3]),
    "model.hidden_dims": st.sampled_from([(), (8,), (8, 16), (8, 16, 16), (16, 32, 64), (6, 12), (8, 16, 32, 64), (8, 0)]),
    "model.norm_groups": st.sampled_from([0, 1, 2, 4, 8, 3]),
    "model.heads": st.integers(0, 4),
    "model.head_dim": st.sampled_from([0, 1, 4, 8, 16]),
    "model.num_classes": st.integers(-1, 12),
    "model.dtype": st.sampled_from(["float32", "bfloat16", "float16", "float8", "int8"]),
    "model.attention_impl": st.sampled_from(["", "xla", "cpu_fast", "flash"]),
    "model.attention_stages": st.sampled_from([None, (), (0,), (1,), (0, 1), (2,), (-1,), (1.5,)]),
    "model.up_attention_stages": st.sampled_from([None, (), (0,), (1,), (0, 1), (2,), (-1,)]),
    "prediction_type": st.sampled_from(["epsilon", "v_prediction", "sample", "x0"]),
    "loss": st.sampled_from(["l1", "l2", "huber"]),
    "schedule.name": st.sampled_from(["linear", "scaled_linear", "cosine", "squaredcos_cap_v2", "book_cosine", "sigmoid"]),
    "schedule.num_train_timesteps": st.sampled_from([0, 1, 2, 10, 1000]),
    "schedule.snr_scale": st.sampled_from([-1.0, 0.0, 0.25, 1.0, 4.0, float("inf")]),
    "sample.sampler": st.sampled_from(list(builders.SAMPLERS) + ["euler_x"]),
    "sample.num_steps": st.sampled_from([-1, 0, 1, 3, 50, 1000, 1001]),
    "sample.num_images": st.sampled_from([-1, 0, 1, 4]),
    "sample.eta": st.sampled_from([-1.0, 0.0, 1.0, math.nan]),
    "sample.use_karras_sigmas": st.booleans(),
    "sample.spacing": st.sampled_from(["", "leading", "trailing", "linspace", "cosine"]),
    "sample.steps_offset": st.sampled_from([-1, 0, 1, 999]),
    "sample.solver_order": st.sampled_from([-1, 0, 1, 3, 4]),
    "sample.lower_order_final": st.booleans(),
    "sample.final_sigmas_type": st.sampled_from(["zero", "sigma_min", "max"]),
    "sample.dpm_algorithm_type": st.sampled_from(["", "dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"]),
    "sample.dpm_solver_type": st.sampled_from(["midpoint", "heun", "bh2"]),
    "sample.unipc_solver_type": st.sampled_from(["bh1", "bh2", "midpoint"]),
    "sample.unipc_predict_x0": st.booleans(),
    "sample.final_alpha_cumprod": st.sampled_from([-0.5, 0.0, 0.5, 1.0, 1.5]),
    # Music configs (configs/music.py).
    "optim.schedule": st.sampled_from(["warmup_cosine", "constant", "linear"]),
    "model.num_layers": st.integers(0, 3),
    "model.num_heads": st.sampled_from([0, 1, 3, 4, 8]),
    "model.embed_dim": st.sampled_from([0, 8, 12, 30, 64]),
    "model.max_len": st.sampled_from([1, 16, 64, 300, 4096]),
    "model.dropout_rate": st.sampled_from([-0.1, 0.0, 0.5, 1.0]),
    "model.vocab_size": st.sampled_from([388, 390]),
    "data.seq_len": st.sampled_from([0, 1, 2, 16, 64, 2048, 5000]),
    "data.window_stride": st.sampled_from([-1, 0, 8]),
    "data.name": st.sampled_from(["bach_chorales", "maestro", "midi"]),
    "sample.prompt_len": st.sampled_from([0, 1, 16, 250]),
    "sample.num_tokens": st.sampled_from([-1, 0, 16, 1000]),
    "sample.temperature": st.sampled_from([-1.0, 0.0, 0.7, math.inf]),
}


@st.composite
def overrides(draw):
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=4, unique=True))
    return {name: draw(FIELDS[name]) for name in names}


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory):
    """A tiny random diffusers UNet2DModel folder (written by jaxdiff) for configs/finetune.py."""
    from jaxdiff import pretrained
    from jaxdiff.models import DiffusersUNet2D

    config = {"_class_name": "UNet2DModel", "sample_size": 16, "in_channels": 3, "out_channels": 3,
              "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
              "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8}  # fmt: skip
    model = DiffusersUNet2D.from_config(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32))["params"]
    folder = tmp_path_factory.mktemp("pretrained")
    pretrained.save_diffusers(params, config, folder, scheduler_config={"_class_name": "DDPMScheduler"})
    return folder


def _base(name, variant, pretrained_folder, tmp_path_factory=None):
    config = load_config(name, variant)
    if name == "finetune":
        config.model.pretrained = str(pretrained_folder)
    return config


def _set(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        if p not in node:  # a section this task's configs do not have (e.g. music has no schedule)
            return
        node = node[p]
    if leaf in node:
        node[leaf] = value


def build_abstractly(config) -> None:
    """Builds and traces the train step and the sampler of a config (no FLOPs: eval_shape)."""
    if config.get("task", "diffusion") == "music":
        return build_music_abstractly(config)
    model = builders.build_model(config)
    schedule = builders.build_schedule(config)
    tx, lr = builders.make_optimizer(config)
    key = jax.random.key(0)
    state = jax.eval_shape(functools.partial(builders.init_state, config, model, tx), key)
    b, s, c = config.train.batch_size, config.data.image_size, config.data.channels
    batch = {"image": jax.ShapeDtypeStruct((b, s, s, c), jnp.float32), "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
    step = functools.partial(
        train_lib.train_step, model=model, tx=tx, schedule=schedule, lr_schedule=lr, loss_type=config.loss,
        prediction_type=config.prediction_type, label_dropout=float(config.train.label_dropout),
        ema_decay=float(config.train.ema_decay),
    )  # fmt: skip
    new_state, metrics = jax.eval_shape(step, state, batch, key)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    sample = make_sampler(config, model=model, schedule=schedule)
    images = sample.trace(state.params, key).out_info
    assert images.shape == (config.sample.num_images, s, s, c)


def build_music_abstractly(config) -> None:
    """The music task's train step and generation, traced (``jax.eval_shape``)."""
    from jaxdiff import music
    from jaxdiff.music import training as music_training

    model = music_training.build_music_model(config)
    tx, lr = builders.make_optimizer(config)
    key = jax.random.key(0)
    state = jax.eval_shape(functools.partial(music_training.init_music_state, config, model, tx), key)
    b, s = config.train.batch_size, config.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((b, s), jnp.int32) for k in ("inputs", "targets")}
    step = functools.partial(music_training.music_train_step, model=model, tx=tx, lr_schedule=lr,
                             ema_decay=float(config.train.ema_decay))  # fmt: skip
    new_state, metrics = jax.eval_shape(step, state, batch, key)
    assert jax.tree.structure(new_state) == jax.tree.structure(state) and metrics["loss"].shape == ()
    prompt = np.zeros((1, config.sample.prompt_len), np.int32)
    seq = jax.eval_shape(lambda p, k: music.generate(model, p, prompt, k, num_tokens=config.sample.num_tokens,
                                                     temperature=config.sample.temperature), state.params, key)  # fmt: skip
    assert seq.shape == (1, config.sample.prompt_len + config.sample.num_tokens)


@pytest.mark.parametrize("name, variant", CONFIGS)
def test_shipped_configs_validate_and_build(name, variant, pretrained_folder):
    config = _base(name, variant, pretrained_folder)
    builders.validate_config(config, num_devices=1)
    build_abstractly(config)


@pytest.mark.parametrize("name, variant", CONFIGS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=overrides())
def test_any_override_builds_or_names_the_field(name, variant, drawn, pretrained_folder):
    config = _base(name, variant, pretrained_folder)
    for dotted, value in drawn.items():
        _set(config, dotted, value)
    try:
        builders.validate_config(config, num_devices=1)
    except ValueError as e:
        named = [f for f in drawn if f"config.{f}" in str(e)]
        assert named, f"{drawn}: the error does not name an overridden field: {e}"
        return
    build_abstractly(config)


def test_warmup_longer_than_the_run_is_clamped_and_logged(tmp_path, capsys):
    config = load_config("digits", "conditional,smoke")
    config.optim.warmup_steps = 100
    config.train.num_steps = 10
    warmup, updates = builders.warmup_updates(config)
    assert (warmup, updates) == (1, 10)
    tx, lr = builders.make_optimizer(config)
    assert float(lr(0)) == 0.0 and float(lr(1)) == pytest.approx(config.optim.learning_rate)
    assert float(lr(10)) == pytest.approx(0.0, abs=1e-12)
    config.train.checkpoint_every = 10
    config.sample.at_end = False
    train_lib.train_and_evaluate(config, tmp_path)
    captured = capsys.readouterr()
    log = captured.out + captured.err
    assert "config.optim.warmup_steps=100" in log and "config.train.num_steps=10" in log
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and all(np.isfinite(losses))


SAMPLER_ARGS = {
    "sampler": st.sampled_from(list(builders.SAMPLERS) + ["DDIM", "euler_x", ""]),
    "num_steps": st.sampled_from([-1, 0, 1, 7, 1000, 1001, 2.5]),
    "num_images": st.sampled_from([-1, 0, 1, 3, 1.5]),
    "eta": st.sampled_from([-0.5, 0.0, 1.0, math.inf, "x"]),
    "use_karras_sigmas": st.sampled_from([None, False, True, "x"]),
    "labels": st.sampled_from([None, [0], [9, 3], [10], [-1], [1.5], []]),
    "guidance_scale": st.sampled_from([None, 0.0, 2.0, -1.0, math.nan, "x"]),
}


@settings(max_examples=40, deadline=None)
@given(drawn=st.fixed_dictionaries({}, optional=SAMPLER_ARGS))
def test_any_sampler_arguments_build_or_name_the_argument(drawn):
    """``make_sampler`` / ``load_sampler`` arguments (and so ``scripts/sample.py`` flags)."""
    config = load_config("digits", "conditional,smoke")
    try:
        sample = make_sampler(config, **drawn)
    except ValueError as e:
        assert any(name in str(e) for name in drawn), f"{drawn}: {e}"
        return
    params = jax.eval_shape(lambda k: builders.init_state(config, builders.build_model(config),
                                                          builders.make_optimizer(config)[0], k),
                            jax.random.key(0)).params  # fmt: skip
    assert sample.trace(params, jax.random.key(0)).out_info.shape[0] == drawn.get("num_images", config.sample.num_images)


# The config.sample fields of the fast samplers (jaxdiff.solvers), newer than some runs' config.json.
SOLVER_FIELDS = ("spacing", "steps_offset", "use_karras_sigmas", "solver_order", "lower_order_final",
                 "final_sigmas_type", "dpm_algorithm_type", "dpm_solver_type", "unipc_solver_type",
                 "unipc_predict_x0", "final_alpha_cumprod")  # fmt: skip


def test_sampler_fields_reach_every_option_and_runs_without_them_still_sample():
    config = load_config("digits", "smoke")
    assert set(SOLVER_FIELDS) <= set(config.sample.keys())
    # Each field becomes its argument; "" and 0 leave the sampler's own default (dpm++3m: order 3).
    config.sample.update(dict(spacing="trailing", steps_offset=1, use_karras_sigmas=True, solver_order=0,
                              lower_order_final=False, final_sigmas_type="sigma_min",
                              dpm_algorithm_type="dpmsolver", dpm_solver_type="heun"))  # fmt: skip
    assert builders.sampler_arguments(config, "dpm++3m") == dict(
        order=3, spacing="trailing", steps_offset=1, use_karras_sigmas=True, lower_order_final=False,
        final_sigmas_type="sigma_min", algorithm_type="dpmsolver", solver_type="heun")  # fmt: skip
    config.sample.update(dict(solver_order=1, unipc_solver_type="bh1", unipc_predict_x0=False, spacing=""))
    assert builders.sampler_arguments(config, "unipc") == dict(
        order=1, steps_offset=1, use_karras_sigmas=True, lower_order_final=False, final_sigmas_type="sigma_min",
        solver_type="bh1", predict_x0=False)  # fmt: skip
    assert builders.sampler_arguments(config, "euler_a") == dict(ancestral=True, steps_offset=1, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="use_karras_sigmas"):  # PNDM has no Karras sigmas
        builders.sampler_arguments(config, "pndm")
    config.sample.update(dict(final_alpha_cumprod=1.0, use_karras_sigmas=False))
    assert builders.sampler_arguments(config, "pndm") == dict(steps_offset=1, final_alpha_cumprod=1.0)
    # A run trained before these fields existed: validated and sampled with their defaults.
    old = load_config("digits", "smoke")
    for field in SOLVER_FIELDS:
        del old.sample[field]
    old.sample.sampler = "heun"
    builders.validate_config(old, num_devices=1)
    assert builders.sampler_arguments(old, "heun") == {"steps_offset": 0, "use_karras_sigmas": False}


@pytest.mark.parametrize("overrides, fields", [
    (dict(use_karras_sigmas=True), ["sample.use_karras_sigmas", "sample.sampler"]),  # DDIM has no Karras sigmas
    (dict(sampler="dpm++2m", dpm_algorithm_type="dpmsolver"), ["sample.dpm_algorithm_type", "sample.final_sigmas_type"]),
    (dict(sampler="unipc", lower_order_final=False, num_steps=20), ["sample.lower_order_final"]),
    (dict(sampler="dpm++2m", num_steps=1000), ["sample.num_steps"]),  # 1001 grid points rounded: repeated timesteps
    (dict(sampler="pndm", steps_offset=30, num_steps=50), ["sample.steps_offset"]),  # 980 + 30 > 999
    (dict(sampler="euler_a"), ["sample.sampler", "prediction_type"]),  # with prediction_type="sample" below
    (dict(solver_order=4), ["sample.solver_order"]),
    (dict(spacing="cosine"), ["sample.spacing"]),
])  # fmt: skip
def test_sampler_settings_a_sampler_cannot_run_name_their_fields(overrides, fields):
    config = load_config("digits", "smoke")
    config.sample.update(overrides)
    if overrides.get("sampler") == "euler_a":
        config.prediction_type = "sample"  # diffusers' ancestral Euler cannot take x0 predictions
    with pytest.raises(ValueError) as e:
        builders.validate_config(config, num_devices=1)
    assert all(f"config.{f}" in str(e.value) for f in fields), str(e.value)
