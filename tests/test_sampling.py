"""User-facing sampling: make_sampler / load_sampler / scripts/sample.py."""

from __future__ import annotations

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_config

from jaxdiff import train as train_lib
from jaxdiff.sampling import labels_to_context, load_sampler, make_sampler


def _params(config, seed=0):
    model = train_lib.build_model(config)
    tx, _ = train_lib.make_optimizer(config)
    return jax.jit(functools.partial(train_lib.init_state, config, model, tx))(jax.random.key(seed)).params


def test_sample_is_deterministic_per_key_and_compiles_once():
    config = load_config("digits", "smoke")
    traces = []

    def counting(eps_fn):
        traces.append(1)
        return eps_fn

    sample = make_sampler(config, num_images=4, num_steps=3, guidance_fn=counting)
    p0, p1 = _params(config, 0), _params(config, 1)
    a = sample(p0, jax.random.key(0))
    b = sample(p0, jax.random.key(0))
    c = sample(p0, jax.random.key(1))
    d = sample(p1, jax.random.key(0))  # other params, same shapes: no recompilation
    assert len(traces) == 1
    assert a.shape == (4, 16, 16, 1) and a.dtype == jnp.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, d)


def test_ddpm_and_eta_options_change_the_result():
    config = load_config("digits", "smoke")
    p = _params(config)
    key = jax.random.key(0)
    ddim = make_sampler(config, num_images=2, num_steps=3)(p, key)
    ddim_eta1 = make_sampler(config, num_images=2, num_steps=3, eta=1.0)(p, key)
    ddpm = make_sampler(config, num_images=2, num_steps=3, sampler="ddpm")(p, key)
    assert not np.allclose(ddim, ddim_eta1) and not np.allclose(ddim, ddpm)
    images, trajectory, timesteps = make_sampler(config, num_images=2, num_steps=3, return_trajectory=True)(p, key)
    np.testing.assert_allclose(images, ddim, atol=1e-6)
    assert trajectory.shape == (3, 2, 16, 16, 1)
    np.testing.assert_array_equal(timesteps, [666, 333, 0])
    np.testing.assert_allclose(trajectory[-1], images, atol=1e-6)
    with pytest.raises(ValueError, match="sampler"):
        make_sampler(config, sampler="euler")


def test_labels_and_classifier_free_guidance():
    config = load_config("digits", "conditional,smoke")
    p = _params(config)
    key = jax.random.key(0)
    uncond = make_sampler(config, num_images=4, num_steps=3)(p, key)
    cond = make_sampler(config, num_images=4, num_steps=3, labels=[3])(p, key)
    cfg0 = make_sampler(config, num_images=4, num_steps=3, labels=[3], guidance_scale=0.0)(p, key)
    cfg1 = make_sampler(config, num_images=4, num_steps=3, labels=[3], guidance_scale=1.0)(p, key)
    cfg3 = make_sampler(config, num_images=4, num_steps=3, labels=[3], guidance_scale=3.0)(p, key)
    assert not np.allclose(uncond, cond, atol=1e-4)
    np.testing.assert_allclose(cfg0, uncond, atol=1e-5)
    np.testing.assert_allclose(cfg1, cond, atol=1e-5)
    assert not np.allclose(cfg3, cond, atol=1e-4)
    # A context array mixing two classes is accepted as is.
    mix = np.zeros((4, 10), np.float32)
    mix[:, 3] = mix[:, 7] = 0.5
    mixed = make_sampler(config, num_images=4, num_steps=3, labels=mix)(p, key)
    assert not np.allclose(mixed, cond, atol=1e-4)


def test_label_errors_are_clear():
    with pytest.raises(ValueError, match="unconditional"):
        make_sampler(load_config("digits", "smoke"), labels=[1])
    cond = load_config("digits", "conditional,smoke")
    with pytest.raises(ValueError, match="needs labels"):
        make_sampler(cond, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"outside \[0, 9\]"):
        make_sampler(cond, labels=[10])
    ctx = labels_to_context([1, 2], 5, 10)
    np.testing.assert_array_equal(np.argmax(ctx, -1), [1, 2, 1, 2, 1])


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = load_config("digits", "smoke")
    config.sample.at_end = False
    train_lib.train_and_evaluate(config, workdir)
    return workdir


def test_load_sampler_uses_the_runs_ema_params(trained_workdir):
    sample, params = load_sampler(trained_workdir, num_images=3, num_steps=2)
    images = sample(params, jax.random.key(0))
    assert images.shape == (3, 16, 16, 1)
    from jaxdiff.sampling import load_params

    raw, step = load_params(trained_workdir, use_ema=False)
    assert step == 6
    leaf = lambda t: np.asarray(jax.tree.leaves(t)[0])  # noqa: E731
    assert not np.array_equal(leaf(raw), leaf(params))  # EMA differs from the raw weights


def test_load_sampler_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_sampler(tmp_path)


def test_sample_script_writes_png_npz_and_trajectory(trained_workdir, tmp_path):
    out = tmp_path / "s.png"
    cmd = [sys.executable, str(REPO / "scripts" / "sample.py"), f"--workdir={trained_workdir}",
           "--num_images=4", f"--out={out}", f"--npz={tmp_path / 's.npz'}", "--trajectory", "--steps=5"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists() and (tmp_path / "s_trajectory.png").exists()
    data = np.load(tmp_path / "s.npz")
    assert data["images"].shape == (4, 16, 16, 1) and data["images"].dtype == np.uint8
    bad = subprocess.run(cmd[:3] + ["--labels=1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unconditional" in bad.stderr


def test_sample_script_clip_guidance(trained_workdir, tmp_path):
    """--clip_prompt runs CLIP-guided sampling from local weights (a tiny random-weight CLIP)."""
    import json

    from safetensors.numpy import save_file

    from jaxdiff.clip import CLIP, to_open_clip_state_dict

    config = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    model = CLIP.from_config(config)
    params = jax.jit(model.init)(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32)
    )["params"]
    save_file({k: np.asarray(v) for k, v in to_open_clip_state_dict(params).items()}, str(tmp_path / "clip.safetensors"))
    (tmp_path / "clip.json").write_text(json.dumps(config))
    out = tmp_path / "clip.png"
    cmd = [sys.executable, str(REPO / "scripts" / "sample.py"), f"--workdir={trained_workdir}",
           "--num_images=2", "--steps=3", f"--out={out}", "--clip_prompt=a bold seven",
           f"--clip_checkpoint={tmp_path / 'clip.safetensors'}", f"--clip_model={tmp_path / 'clip.json'}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists()
    missing = subprocess.run(cmd[:6] + ["--clip_prompt=x"], capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "--clip_checkpoint" in missing.stderr
