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

from jaxdiff import sampling
from jaxdiff import train as train_lib
from jaxdiff.builders import SAMPLERS
from jaxdiff.sampling import labels_to_context, load_sampler, make_sampler


def _params(config, seed=0):
    model = train_lib.build_model(config)
    tx, _ = train_lib.make_optimizer(config)
    return jax.jit(functools.partial(train_lib.init_state, config, model, tx))(jax.random.key(seed)).params


@pytest.fixture(scope="module")
def conditional_params():
    """The conditional smoke U-Net's initial params (shared: initialising compiles a program)."""
    return _params(load_config("digits", "conditional,smoke"))


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
    assert trajectory.shape == (4, 2, 16, 16, 1)  # x_T, then the state after each step
    np.testing.assert_array_equal(timesteps, [666, 333, 0, -1])
    x_T = jax.random.normal(jax.random.split(key)[0], (2, 16, 16, 1))
    np.testing.assert_allclose(trajectory[0], np.clip((np.asarray(x_T) + 1) / 2, 0, 1), atol=1e-6)
    np.testing.assert_allclose(trajectory[-1], images, atol=1e-6)
    with pytest.raises(ValueError, match="sampler"):
        make_sampler(config, sampler="euler_x")


def test_labels_and_classifier_free_guidance(conditional_params):
    config = load_config("digits", "conditional,smoke")
    p = conditional_params
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


def test_labels_and_guidance_scale_at_call_time_do_not_recompile(conditional_params):
    config = load_config("digits", "conditional,smoke")
    p = conditional_params
    key = jax.random.key(0)
    traces = []

    def counting(eps_fn):
        traces.append(1)
        return eps_fn

    sample = make_sampler(config, num_images=4, num_steps=3, labels=[3], guidance_fn=counting)
    built = {w: make_sampler(config, num_images=4, num_steps=3, labels=[5], guidance_scale=w)(p, key)
             for w in (1.5, 3.0)}  # fmt: skip
    plain = sample(p, key)
    swept = {w: sample(p, key, labels=[5], guidance_scale=w) for w in (1.5, 3.0)}
    assert len(traces) == 2  # one unguided program, one guided program for the whole sweep
    for w in (1.5, 3.0):
        np.testing.assert_allclose(swept[w], built[w], atol=1e-6)
    np.testing.assert_allclose(plain, make_sampler(config, num_images=4, num_steps=3, labels=[3])(p, key), atol=1e-6)
    assert not np.allclose(swept[1.5], swept[3.0], atol=1e-4)
    np.testing.assert_allclose(sample(p, key, labels=[7]), make_sampler(config, num_images=4, num_steps=3,
                                                                         labels=[7])(p, key), atol=1e-6)  # fmt: skip
    assert len(traces) == 2
    with pytest.raises(ValueError, match=r"outside \[0, 9\]"):
        sample(p, key, labels=[11])
    with pytest.raises(ValueError, match="guidance_scale"):
        make_sampler(config, num_images=4, num_steps=3)(p, key, guidance_scale=2.0)


class _ToyNet:
    """A stand-in for the U-Net that compiles in a moment: a smooth function of (x, t, context)."""

    def __init__(self, num_classes: int = 0):
        self.num_classes = num_classes

    def apply(self, variables, x, t, context=None):
        t = jnp.asarray(t, jnp.float32).reshape((-1, 1, 1, 1))  # Euler and Heun pass fractional t
        out = jnp.tanh(variables["params"]["w"] * x + t / 1000.0)
        if context is not None:
            out = out + 0.1 * (context @ jnp.arange(1.0, context.shape[-1] + 1.0))[:, None, None, None]
        return out


def _model_calls(name, timesteps):
    """The timesteps at which ``name`` calls the network, from those of its states ``[n]``."""
    if name == "heun":  # Euler predictor at t_i, corrector at t_{i+1}; the last step has no corrector
        return timesteps[[k // 2 + k % 2 for k in range(2 * len(timesteps) - 1)]]
    if name == "pndm":  # the first step evaluates at t_0, then again at t_1 (PLMS's improved Euler start)
        return np.concatenate([timesteps[:2], timesteps[1:]])
    return timesteps


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs_deterministically_compiled_once(name, monkeypatch):
    """Each name of SAMPLERS through make_sampler: one compiled program, same key same images, the
    trajectory's timesteps are those the network was called at, the progress bar counts every call."""
    calls, totals = [], []

    class RecordingBar:
        def __init__(self, total):
            totals.append(total)

        def __call__(self, t):
            calls.append(float(t))

    monkeypatch.setattr(sampling, "_StepBar", RecordingBar)
    traces = []

    def counting(eps_fn):
        traces.append(1)
        return eps_fn

    config = load_config("digits", "smoke")
    n = 4
    sample = make_sampler(config, sampler=name, num_images=2, num_steps=n, model=_ToyNet(), guidance_fn=counting,
                          progress=True, return_trajectory=True)  # fmt: skip
    params = {"w": jnp.float32(0.5)}
    a, trajectory, timesteps = sample(params, jax.random.key(0))
    b = sample(params, jax.random.key(0))[0]
    c = sample(params, jax.random.key(1))[0]
    jax.effects_barrier()
    assert len(traces) == 1
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.shape == (2, 16, 16, 1) and trajectory.shape == (n + 1, 2, 16, 16, 1)
    np.testing.assert_array_equal(trajectory[-1], a)
    timesteps = np.asarray(timesteps)
    assert timesteps.dtype == (np.float32 if name in ("euler", "euler_a", "heun") else np.int32)
    assert timesteps[-1] == -1 and np.all(np.diff(timesteps) < 0)
    expected = _model_calls(name, timesteps[:-1])
    assert totals == [len(expected)] == [{"heun": 2 * n - 1, "pndm": n + 1}.get(name, n)]
    np.testing.assert_allclose(calls, np.tile(expected, 3), rtol=1e-6)  # three calls of sample


@pytest.mark.parametrize("name, net", [("euler", "unet"), ("dpm++2m", "toy")])
def test_classifier_free_guidance_drives_the_fast_samplers(name, net, conditional_params):
    """CFG through make_sampler (with the real U-Net for Euler's fractional timesteps): scale 0 is
    the unconditional sample, 1 the conditional one, at call time with one guided program."""
    config = load_config("digits", "conditional,smoke")
    traces = []

    def counting(eps_fn):
        traces.append(1)
        return eps_fn

    model, p = (None, conditional_params) if net == "unet" else (_ToyNet(10), {"w": jnp.float32(0.5)})
    sample = make_sampler(config, sampler=name, num_images=4, num_steps=3, labels=[3], guidance_fn=counting,
                          model=model)  # fmt: skip
    key = jax.random.key(0)
    cond = sample(p, key)
    uncond = sample(p, key, labels=np.zeros((4, 10), np.float32))  # the null context
    guided = {w: sample(p, key, guidance_scale=w) for w in (0.0, 1.0, 3.0)}
    assert len(traces) == 2  # one unguided, one guided program
    np.testing.assert_allclose(guided[0.0], uncond, atol=1e-5)
    np.testing.assert_allclose(guided[1.0], cond, atol=1e-5)
    assert not np.allclose(guided[3.0], cond, atol=1e-4) and not np.allclose(cond, uncond, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(sampler="dpm"), "sampler"),
        (dict(sampler="dpm++2m", num_steps=1000), "num_steps"),  # rounds 1001 grid points to 1000 timesteps
        (dict(use_karras_sigmas=True), "use_karras_sigmas"),  # the config's sampler is DDIM
        (dict(sampler="heun", use_karras_sigmas=1), "use_karras_sigmas"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=1001), "num_steps"),
        (dict(num_images=0), "num_images"),
        (dict(eta=-1.0), "eta"),
        (dict(labels=[1], guidance_scale="x"), "guidance_scale"),
        (dict(labels=[-1]), "labels"),
    ],
)
def test_sampler_arguments_are_checked_with_their_name(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_sampler(load_config("digits", "conditional,smoke"), **kwargs)


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


def test_load_sampler_without_checkpoint_is_a_clear_error(tmp_path, trained_workdir):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_sampler(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sampler(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_sampler(tmp_path)
    import shutil

    run = tmp_path / "run"
    shutil.copy(trained_workdir / "config.json", tmp_path / "config.json")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="Train first"):
        load_sampler(tmp_path)
    shutil.copytree(trained_workdir, run)
    with pytest.raises(ValueError, match="num_steps"):  # checked before the checkpoint is read
        load_sampler(run, num_steps=5000)
    for f in (run / "checkpoints").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * f.stat().st_size)  # every checkpoint corrupt
    with pytest.raises(ValueError, match="can be read"):
        load_sampler(run)


def test_sample_script_writes_png_npz_and_trajectory(trained_workdir, tmp_path):
    out = tmp_path / "s.png"
    cmd = [sys.executable, str(REPO / "scripts" / "sample.py"), f"--workdir={trained_workdir}",
           "--num_images=4", f"--out={out}", f"--npz={tmp_path / 's.npz'}", "--trajectory", "--steps=5",
           "--sampler=dpm++2m", "--karras"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists() and (tmp_path / "s_trajectory.png").exists()
    # DPM-Solver++ with Karras sigmas visits 999, 998, 997, 937, 0 on the cosine schedule (its
    # largest sigma is huge); without them 999, 799, 599, 400, 200 (DDIM: 800, 600, 400, 200, 0).
    assert "after the steps from t = [937, 937, 0, 0, 0]" in proc.stdout, proc.stdout
    data = np.load(tmp_path / "s.npz")
    assert data["images"].shape == (4, 16, 16, 1) and data["images"].dtype == np.uint8
    bad = subprocess.run(cmd[:3] + ["--labels=1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unconditional" in bad.stderr
    for flag, word in [("--steps=0", "num_steps"), ("--eta=-1", "eta"), ("--num_images=0", "num_images"),
                       ("--labels=a", "--labels")]:  # fmt: skip
        bad = subprocess.run(cmd[:3] + [flag], capture_output=True, text=True, timeout=300)
        assert bad.returncode != 0 and word in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]


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


def test_a_run_trained_on_eight_devices_samples_on_one(trained_workdir):
    """Train on a GPU box, sample on a laptop: the checkpoint restores onto any device count."""
    import os

    code = (
        "import jax, numpy as np, jaxdiff\n"
        "assert jax.device_count() == 1, jax.devices()\n"
        f"sample, params = jaxdiff.load_sampler({str(trained_workdir)!r}, num_images=2, num_steps=2)\n"
        "print('images', np.asarray(sample(params, jax.random.key(0))).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "images (2, 16, 16, 1)" in proc.stdout
    assert "corrupt" not in proc.stderr and "Topology" not in proc.stderr


def test_sampler_quality_script_on_a_smoke_run(trained_workdir, tmp_path):
    """scripts/sampler_quality.py: 2 samplers x 2 step counts x 20 images; tables, plot and the verdict."""
    import json

    cmd = [sys.executable, str(REPO / "scripts" / "sampler_quality.py"), f"--workdir={trained_workdir}",
           "--samplers=ddim,dpm++2m_karras", "--steps=3,2", "--num_images=20", "--batch_size=10",
           "--reference=ddim:3", "--noise_seeds=2", "--fd=iid", f"--out={tmp_path}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "quality.jsonl").read_text().splitlines()]
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddim", 2), ("ddim", 3), ("dpm++2m_karras", 2),
                                                          ("dpm++2m_karras", 3)]  # fmt: skip
    for r in rows:
        assert r["fd"] > 0 and r["fd_real"] > 0 and r["fd_ratio"] == pytest.approx(r["fd"] / r["fd_real"])
        assert 0 < r["confidence"] <= 1 and r["images_per_s"] > 0 and r["network_calls"] == r["steps"]
    reference = [r for r in rows if r["reference"]]
    assert len(reference) == 1 and len(reference[0]["fd_seeds"]) == 2 and reference[0]["fd_seeds"][0] == reference[0]["fd"]
    assert reference[0]["fd_seeds"][1] != reference[0]["fd"]  # another seed, other images
    assert "| dpm++2m_karras | 3 | 3 |" in (tmp_path / "quality.md").read_text()
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    assert "ddim-3 FD" in proc.stdout and "reached at FD <=" in proc.stdout
    verdicts = [line for line in proc.stdout.splitlines() if line.strip().startswith(("ddim:", "dpm++2m_karras:"))]
    assert len(verdicts) == 2 and ("steps (FD" in verdicts[0])  # DDIM-3 reaches itself


@pytest.mark.parametrize("name", ["dpm++2m", "unipc", "euler", "heun"])
def test_solvers_started_where_abar_is_zero_warn_and_leading_spacing_does_not(name):
    """Cosine's abar at t = T - 1 is 2.4e-9: sigma-space solvers started there lose the samples."""
    import re
    import warnings

    config = load_config("digits", "smoke")
    config.schedule.name = "cosine"
    config.sample.spacing = "linspace"  # starts at t = T - 1
    with pytest.warns(UserWarning, match=re.escape(f"sampler='{name}' starts at noise level sigma=2.03e+04")):
        make_sampler(config, sampler=name, num_steps=5)
    config.sample.spacing = "leading"  # starts at t = T - T // 5
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        make_sampler(config, sampler=name, num_steps=5)
        make_sampler(config, sampler="ddim", num_steps=5)  # DDIM clips its x0: never warns
    config.schedule.name = "linear"  # abar_T = 4e-5: sigma 157, fine
    config.sample.spacing = "linspace"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        make_sampler(config, sampler=name, num_steps=5)
