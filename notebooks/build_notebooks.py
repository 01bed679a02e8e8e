"""Writes the walkthrough notebooks ``notebooks/0*.ipynb`` from the cell sources below.

The notebooks are generated so that they stay reviewable as Python and have no outputs in git
(cell ids are deterministic, so a rebuild without changes is a no-op)::

    python notebooks/build_notebooks.py            # rewrite the .ipynb files
    python notebooks/build_notebooks.py --check    # exit 1 if a committed notebook is stale

``tests/test_notebooks.py`` executes every notebook (with ``JAXDIFF_NOTEBOOK_FAST=1``) and checks
that the committed files match this script.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------
# Cells shared by every notebook.
# ---------------------------------------------------------------------------------------------

SETUP = '''
import os
import sys
import time
from pathlib import Path

# JAXDIFF_NOTEBOOK_FAST=1 shrinks every step count and model so the notebook runs in well under
# a minute (the test suite runs it that way); pictures are then noise-like but every cell runs.
FAST = os.environ.get("JAXDIFF_NOTEBOOK_FAST") == "1"


def find_repo_root(start: Path) -> Path:
    """The jaxdiff checkout this notebook lives in (the folder holding configs/ and jaxdiff/)."""
    for folder in (start, *start.parents):
        if (folder / "configs" / "digits.py").is_file() and (folder / "jaxdiff").is_dir():
            return folder
    raise FileNotFoundError(f"no jaxdiff checkout above {start}; start Jupyter inside the repository")


ROOT = find_repo_root(Path.cwd().resolve())
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # import this checkout's jaxdiff even when it is not installed
# Runs (checkpoints, metrics) go to runs/notebooks/ unless JAXDIFF_NOTEBOOK_RUNS says otherwise.
RUNS = Path(os.environ.get("JAXDIFF_NOTEBOOK_RUNS") or ROOT / "runs" / "notebooks")
NOTEBOOK_START = time.perf_counter()
print(f"FAST={FAST}  repository: {ROOT}  runs: {RUNS}")
'''

LOAD_CONFIG = '''
import importlib.util


def load_config(name: str, arg: str | None = None):
    """configs/<name>.py -> get_config(arg), as `--config=configs/<name>.py:<arg>` does."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
'''

SHOW = '''
import matplotlib.pyplot as plt
import numpy as np

from jaxdiff.images import make_grid


def show(images, title=None, ncols=None, ax=None, scale=3.0):
    """Shows images [N, H, W, C] with values in [0, 1] as one grid."""
    grid = make_grid(np.asarray(images), ncols=ncols)
    if ax is None:
        rows, cols = grid.shape[:2]
        _, ax = plt.subplots(figsize=(scale * cols / max(rows, cols) * 2, scale * rows / max(rows, cols) * 2))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def to_unit(x):
    """Model range [-1, 1] -> picture range [0, 1]."""
    return np.clip((np.asarray(x) + 1.0) / 2.0, 0.0, 1.0)
'''

FOOTER = '''
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s (FAST={FAST})")
'''


def md(text: str) -> tuple[str, str]:
    return ("markdown", textwrap.dedent(text).strip("\n"))


def code(text: str) -> tuple[str, str]:
    return ("code", textwrap.dedent(text).strip("\n"))


# ---------------------------------------------------------------------------------------------
# 01: corrupt, denoise in one step, the forward process.
# ---------------------------------------------------------------------------------------------

NB01 = [
    md("""
    # 1. Noise and denoise

    *Runs in about 5 minutes on a laptop CPU (about 30 seconds with `JAXDIFF_NOTEBOOK_FAST=1`).*

    This is the first part of the hands-on notebook ("from a basic encoder-decoder to stable
    diffusion"), in JAX:

    1. corrupt images by an *amount* of noise,
    2. train a small convolutional U-Net to predict the clean image in **one step**,
    3. see why one step is not enough, and what taking several small steps does,
    4. the forward process of DDPM (`jaxdiff.schedules.add_noise`) pictured over the timestep `t`.

    The data are scikit-learn's 8x8 handwritten digits, upsampled to 16x16 and embedded in jaxdiff
    (`jaxdiff.data.DigitsSource`), so nothing is downloaded.
    """),
    code(SETUP),
    code(SHOW),
    code('''
    import jax
    import jax.numpy as jnp

    from jaxdiff.data import DigitsSource

    digits = DigitsSource(image_size=16)
    images = jnp.asarray(digits.images)  # [1797, 16, 16, 1] in [-1, 1]
    print(images.shape, images.dtype, float(images.min()), float(images.max()))
    show(to_unit(images[:32]), "the embedded digits", ncols=16);
    '''),
    md("""
    ## Corrupting an image by an amount

    The hands-on notebook mixes an image `x` (values in [0, 1]) with uniform noise:
    `x * (1 - amount) + noise * amount`. `amount = 0` leaves the image alone, `amount = 1` leaves
    only noise. Randomness in JAX is explicit: every random draw takes a `jax.random.key`.
    """),
    code('''
    def corrupt(x01, amount, key):
        """Mixes images in [0, 1] with uniform noise: amount 0 = clean, 1 = pure noise."""
        noise = jax.random.uniform(key, x01.shape)
        amount = amount.reshape(-1, 1, 1, 1)  # one amount per image, broadcast over pixels
        return x01 * (1 - amount) + noise * amount


    x01 = (images + 1) / 2  # [N, 16, 16, 1] in [0, 1]
    batch = x01[:8]
    amount = jnp.linspace(0, 1, 8)  # left to right: more corruption
    noisy = corrupt(batch, amount, jax.random.key(0))

    fig, axes = plt.subplots(2, 1, figsize=(8, 2.6))
    show(batch, "input", ncols=8, ax=axes[0])
    show(noisy, "corrupted (amount 0 -> 1, left to right)", ncols=8, ax=axes[1]);
    '''),
    md("""
    ## A basic U-Net, trained to predict the clean image

    The network is a tiny Flax module: three 5x5 convolutions going down (with 2x2 max pooling),
    three going up (with nearest-neighbour upsampling), and *skip connections* that add each
    down-path activation to the up-path activation of the same size. It is trained with the mean
    squared error between its output and the **clean** image, for random amounts.
    """),
    code('''
    import functools

    import flax.linen as nn
    import optax


    class BasicUNet(nn.Module):
        """The hands-on notebook's BasicUNet, channels last: [B, H, W, C] -> [B, H, W, C]."""

        out_channels: int = 1
        widths: tuple[int, ...] = (32, 64, 64)

        @nn.compact
        def __call__(self, x):
            skips = []
            for i, width in enumerate(self.widths):  # down: 16x16 -> 8x8 -> 4x4
                x = nn.silu(nn.Conv(width, (5, 5))(x))
                if i < len(self.widths) - 1:
                    skips.append(x)
                    x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for i, width in enumerate((*reversed(self.widths[:-1]), self.out_channels)):  # up
                if i > 0:
                    b, h, w, c = x.shape
                    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")
                    x = x + skips.pop()  # skip connection
                x = nn.Conv(width, (5, 5))(x)
                if i < len(self.widths) - 1:
                    x = nn.silu(x)
            return x


    net = BasicUNet(widths=(16, 32, 32) if FAST else (32, 64, 64))
    params = net.init(jax.random.key(1), x01[:1])["params"]
    print(f"{sum(p.size for p in jax.tree.leaves(params)):,} parameters")
    '''),
    code('''
    BATCH = 32 if FAST else 128
    NUM_STEPS = 100 if FAST else 1000
    tx = optax.adam(1e-3)


    def loss_fn(params, x_clean, key):
        k_amount, k_noise = jax.random.split(key)
        amount = jax.random.uniform(k_amount, (x_clean.shape[0],))
        pred = net.apply({"params": params}, corrupt(x_clean, amount, k_noise))
        return jnp.mean((pred - x_clean) ** 2)  # how close is the output to the clean image?


    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, step, key):
        """One Adam step on a random batch; all randomness comes from fold_in(key, step)."""
        k_batch, k_loss = jax.random.split(jax.random.fold_in(key, step))
        idx = jax.random.randint(k_batch, (BATCH,), 0, x01.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(params, x01[idx], k_loss)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss


    opt_state = tx.init(params)
    train_key = jax.random.key(2)
    losses = []
    t0 = time.perf_counter()
    for step in range(NUM_STEPS):
        params, opt_state, loss = train_step(params, opt_state, step, train_key)
        losses.append(loss)
    losses = np.asarray(jax.device_get(losses))
    print(f"{NUM_STEPS} steps in {time.perf_counter() - t0:.1f} s, final loss {losses[-20:].mean():.4f}")

    plt.figure(figsize=(5, 2.5))
    plt.plot(losses)
    plt.xlabel("step"), plt.ylabel("MSE to the clean image"), plt.ylim(0, max(0.1, float(losses[5:].max())))
    plt.title("training loss");
    '''),
    code('''
    apply = jax.jit(lambda params, x: net.apply({"params": params}, x))

    batch = x01[100:108]
    amount = jnp.linspace(0, 1, 8)
    noisy = corrupt(batch, amount, jax.random.key(3))
    preds = apply(params, noisy)

    fig, axes = plt.subplots(3, 1, figsize=(8, 3.8))
    show(batch, "input", ncols=8, ax=axes[0])
    show(noisy, "corrupted (amount 0 -> 1)", ncols=8, ax=axes[1])
    show(np.clip(preds, 0, 1), "one-step prediction of the clean image", ncols=8, ax=axes[2]);
    '''),
    md("""
    ## Why one step is not enough

    At small amounts the prediction is excellent. At amount 1 there is nothing left of the input:
    the best the network can do in the mean-squared sense is to predict the *average* of all
    digits that could have produced that noise, a grey blur. Starting from pure noise, one step
    therefore gives blurs, not digits.

    The hands-on notebook's fix: take several small steps. At each step the network predicts the
    clean image, and we move only part of the way towards the prediction
    (`mix = 1 / (steps - i)`), so the next prediction is made from a less noisy input.
    """),
    code('''
    def iterative_denoise(params, x, n_steps):
        """Moves x towards the network's prediction by 1/(n_steps - i) at step i; returns the path."""
        history, predictions = [x], []
        for i in range(n_steps):
            pred = apply(params, x)
            predictions.append(pred)
            mix = 1.0 / (n_steps - i)
            x = x * (1 - mix) + pred * mix
            history.append(x)
        return history, predictions


    start = jax.random.uniform(jax.random.key(4), (8, 16, 16, 1))  # pure noise: amount 1
    history, predictions = iterative_denoise(params, start, n_steps=5)
    fig, axes = plt.subplots(5, 2, figsize=(9, 5))
    for i in range(5):
        show(np.clip(history[i], 0, 1), ax=axes[i, 0], ncols=8)
        show(np.clip(predictions[i], 0, 1), ax=axes[i, 1], ncols=8)
    axes[0, 0].set_title("x (model input)"), axes[0, 1].set_title("model prediction")
    fig.tight_layout();
    '''),
    code('''
    one_step = np.clip(apply(params, start), 0, 1)
    many_steps = np.clip(iterative_denoise(params, start, n_steps=20)[0][-1], 0, 1)
    fig, axes = plt.subplots(2, 1, figsize=(8, 2.6))
    show(one_step, "from pure noise, 1 step", ncols=8, ax=axes[0])
    show(many_steps, "from pure noise, 20 small steps", ncols=8, ax=axes[1]);
    '''),
    md("""
    Many small steps give sharper shapes than one step, but this network was never told *how much*
    noise its input has, and it predicts the clean image directly. Diffusion models (DDPM, Ho et
    al. 2020) make both ideas precise:

    * a fixed **forward process** adds Gaussian noise over `T = 1000` timesteps, with
      `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`, so that the amount of noise is known at
      every `t` and the image is never scaled out of range (`a^2 + b^2 = 1`);
    * the network gets `t` as an input and predicts the noise `eps`;
    * a **sampler** (DDPM, DDIM: notebook 2) walks back from pure noise with the exact maths of
      how much to remove at each step.

    ## The forward process of DDPM

    `jaxdiff.schedules` builds the schedule (the variances `beta_t` and `abar_t = prod (1 - beta_s)`),
    and `add_noise(schedule, x0, eps, t)` samples `q(x_t | x_0)`. Images are in [-1, 1] here.
    """),
    code('''
    from jaxdiff import schedules

    linear = schedules.linear(1000)  # Ho et al. 2020 (and google/ddpm-cat-256)
    cosine = schedules.cosine(1000)  # Nichol & Dhariwal 2021 (configs/digits.py)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    for name, s in (("linear", linear), ("cosine", cosine)):
        abar = np.asarray(s.alphas_cumprod)
        axes[0].plot(np.sqrt(abar), label=f"{name}: sqrt(abar_t), signal")
        axes[0].plot(np.sqrt(1 - abar), "--", label=f"{name}: sqrt(1 - abar_t), noise")
        axes[1].semilogy(np.asarray(schedules.snr(s, jnp.arange(1000))), label=name)
    axes[0].set_xlabel("t"), axes[0].legend(fontsize=7), axes[0].set_title("signal and noise scales")
    axes[1].set_xlabel("t"), axes[1].legend(), axes[1].set_title("signal-to-noise ratio");
    '''),
    code('''
    ts = jnp.array([0, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999])
    x0 = images[jnp.array([0, 7, 13, 42])]  # [4, 16, 16, 1]
    eps = jax.random.normal(jax.random.key(5), x0.shape)

    fig, axes = plt.subplots(2, 1, figsize=(10, 4.5))
    for ax, (name, s) in zip(axes, (("linear", linear), ("cosine", cosine))):
        # One row per digit: the same x0 and eps at every t (broadcast over a new leading axis).
        x_t = jax.vmap(lambda t: schedules.add_noise(s, x0, eps, t))(ts)  # [T, 4, 16, 16, 1]
        strip = jnp.swapaxes(x_t, 0, 1).reshape(-1, 16, 16, 1)  # row-major: digit, then t
        show(to_unit(strip), f"{name} schedule: x_t at t = " + ", ".join(map(str, ts.tolist())), ncols=len(ts), ax=ax)
    '''),
    md("""
    With the cosine schedule the digits stay recognisable for longer; with either, `x_999` is
    essentially pure Gaussian noise, which is where sampling starts.

    **Next:** notebook 2 trains jaxdiff's U-Net on these digits with `train_and_evaluate` and samples
    with DDPM and DDIM.
    """),
    code(FOOTER),
]

# ---------------------------------------------------------------------------------------------
# 02: train_and_evaluate, load_sampler, DDPM vs DDIM.
# ---------------------------------------------------------------------------------------------

NB02 = [
    md("""
    # 2. Train a diffusion model on digits, then sample with DDPM and DDIM

    *Runs in about 15 minutes on a laptop CPU (under a minute with `JAXDIFF_NOTEBOOK_FAST=1`, which
    trains for a few dozen steps only: the samples are then blobs, not digits).*

    The whole path with jaxdiff's own API:

    1. the config `configs/digits.py` (a ~1.2M-parameter U-Net on the embedded 16x16 digits),
    2. `jaxdiff.train_and_evaluate(config, workdir)`: the jitted train step, checkpoints,
       `metrics.jsonl` and sample grids, exactly what `scripts/train.py` runs,
    3. `jaxdiff.load_sampler(workdir, ...)`: a jitted `sample(params, key) -> images`,
    4. DDPM vs DDIM at several step counts, and the trajectory from noise to digit,
    5. the loss curve from `metrics.jsonl`.
    """),
    code(SETUP),
    code(LOAD_CONFIG),
    code(SHOW),
    code('''
    import shutil

    import jax

    import jaxdiff

    config = load_config("digits")
    if FAST:  # a tiny network and a few dozen steps, so the notebook runs in CI
        config.model.hidden_dims = (16, 32, 32)
        config.model.norm_groups = 4
        config.model.heads, config.model.head_dim = 2, 8
        config.train.num_steps = 30
        config.train.batch_size = 16
        config.train.log_every = 5
        config.optim.warmup_steps = 5
        config.sample.at_end = False
    config.train.checkpoint_every = config.train.num_steps
    config.train.async_checkpointing = False
    print(config)
    '''),
    md("""
    ## Train

    `train_and_evaluate` resumes when its workdir already holds checkpoints; we delete the workdir
    first so the notebook always trains from scratch. The same run from a shell:

    ```
    python scripts/train.py --config=configs/digits.py --workdir=runs/digits
    ```

    On a CPU this uses every core; with several (simulated or real) devices the batch is sharded
    over them.
    """),
    code('''
    WORKDIR = RUNS / "02_digits"
    shutil.rmtree(WORKDIR, ignore_errors=True)

    t0 = time.perf_counter()
    state = jaxdiff.train_and_evaluate(config, WORKDIR)
    print(f"trained {int(state.step)} steps in {time.perf_counter() - t0:.0f} s")
    print(sorted(p.name for p in WORKDIR.iterdir()))
    '''),
    md("""
    ## The loss curve

    Every `train.log_every` steps the loop appends one JSON line to `metrics.jsonl`: the mean loss,
    the gradient norm, the learning rate (linear warmup, then cosine decay) and the throughput.
    """),
    code('''
    import json

    records = [json.loads(line) for line in (WORKDIR / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    axes[0].plot(steps, [r["loss"] for r in records], "o-")
    axes[0].set_xlabel("step"), axes[0].set_ylabel("L2 loss on eps"), axes[0].set_yscale("log")
    axes[1].plot(steps, [r["learning_rate"] for r in records], "o-")
    axes[1].set_xlabel("step"), axes[1].set_ylabel("learning rate")
    print(records[-1])
    '''),
    code('''
    # The grid that train_and_evaluate wrote at the end of training (not in FAST mode).
    grids = sorted((WORKDIR / "samples").glob("step_*.png")) if (WORKDIR / "samples").is_dir() else []
    if grids:
        plt.figure(figsize=(4, 4))
        plt.imshow(plt.imread(grids[-1]), cmap="gray"), plt.axis("off"), plt.title(grids[-1].name)
    else:
        print("no sample grid written (FAST mode switches config.sample.at_end off)")
    '''),
    md("""
    ## Sample: `load_sampler`

    `load_sampler(workdir, **options)` reads the run's `config.json`, restores the newest
    checkpoint (the EMA parameters when the run kept them) and returns `(sample, params)`.
    `sample(params, key)` is one compiled program: the whole sampling loop is a `lax.scan`. The
    same key gives the same images; another key, other images.

    With `return_trajectory=True` it also returns every state from `x_T` to the sample (mapped to
    [0, 1]) and the timestep each one is at (the sample's is -1).
    """),
    code('''
    NUM_IMAGES = 16
    STEP_COUNTS = (4, 16) if FAST else (10, 50, 200)
    results = {}
    for sampler in ("ddim", "ddpm"):
        for num_steps in STEP_COUNTS:
            sample, params = jaxdiff.load_sampler(
                WORKDIR, num_images=NUM_IMAGES, sampler=sampler, num_steps=num_steps, return_trajectory=True
            )
            t0 = time.perf_counter()
            images, trajectory, timesteps = jax.block_until_ready(sample(params, jax.random.key(0)))
            results[sampler, num_steps] = (np.asarray(images), np.asarray(trajectory), np.asarray(timesteps))
            print(f"{sampler} {num_steps:4d} steps: {time.perf_counter() - t0:5.1f} s (with compilation)")
    '''),
    code('''
    fig, axes = plt.subplots(2, len(STEP_COUNTS), figsize=(3.2 * len(STEP_COUNTS), 6.6))
    for row, sampler in enumerate(("ddim", "ddpm")):
        for col, num_steps in enumerate(STEP_COUNTS):
            show(results[sampler, num_steps][0], f"{sampler.upper()}, {num_steps} steps", ncols=4, ax=axes[row, col])
    '''),
    md("""
    **DDPM** (Ho et al. 2020) adds fresh noise at every step; with few steps it uses the *strided*
    posterior between the visited timesteps. **DDIM** (Song et al. 2021) with `eta = 0` is
    deterministic given the starting noise and stays good with far fewer steps. Both start from the
    same `x_T` here (the key is the same), so DDIM pictures at different step counts resemble each
    other.

    ## The trajectory: from noise to a digit

    `trajectory[i]` is the state at `timesteps[i]`: `x_T` first, the sample last (at -1).
    """),
    code('''
    images, trajectory, timesteps = results["ddim", STEP_COUNTS[-1]]
    picks = np.unique(np.linspace(0, len(timesteps) - 1, 8).round().astype(int))
    strip = trajectory[picks][:, :4]  # [8 states, 4 images, H, W, C]
    strip = np.swapaxes(strip, 0, 1).reshape(-1, *strip.shape[2:])  # one row per image
    show(strip, "DDIM trajectory, the states at t = " + ", ".join(str(timesteps[i]) for i in picks),
         ncols=len(picks));
    '''),
    code('''
    # Another key, other images; the same key, the same images (sampling is a pure function).
    sample, params = jaxdiff.load_sampler(WORKDIR, num_images=NUM_IMAGES, num_steps=STEP_COUNTS[0])
    a, b, c = (np.asarray(sample(params, jax.random.key(k))) for k in (1, 1, 2))
    print("same key, same images:", np.array_equal(a, b), "| another key differs:", not np.array_equal(a, c))
    '''),
    md("""
    **Next:** notebook 3 steers the sampler: colour guidance, class conditioning with
    classifier-free guidance, context mixing and classifier guidance.
    """),
    code(FOOTER),
]

# ---------------------------------------------------------------------------------------------
# 03: guidance.
# ---------------------------------------------------------------------------------------------

NB03 = [
    md("""
    # 3. Guidance: steering the sampler

    *Runs in about 20 minutes on a laptop CPU (1-2 minutes with `JAXDIFF_NOTEBOOK_FAST=1`, where
    the models train for a few dozen steps and the pictures are not yet digits).*

    In jaxdiff every sampler takes a noise-prediction function `eps_fn(x, t)`, and guidance is a
    function that turns one `eps_fn` into another (`jaxdiff.guidance`). So guides compose, and
    they work with DDPM and DDIM alike:

    * **gradient guidance** with any differentiable loss of the predicted clean image, here the
      hands-on notebook's colour loss, in both of its forms (`form="score"` and `form="notebook"`);
    * **classifier-free guidance** (Ho & Salimans 2022) with a class-conditional model
      (`configs/digits.py:conditional`), across guidance scales;
    * **context mixing**: half one digit, half another, as the course mixes sprite categories;
    * **classifier guidance** (Dhariwal & Nichol 2021) with a small noisy classifier trained here.
    """),
    code(SETUP),
    code(LOAD_CONFIG),
    code(SHOW),
    code('''
    import functools
    import shutil

    import jax
    import jax.numpy as jnp

    import jaxdiff
    from jaxdiff import guidance, samplers
    from jaxdiff.sampling import labels_to_context
    from jaxdiff.train import build_model, build_schedule

    config = load_config("digits", "conditional")  # labels 0..9, 10% label dropout
    if FAST:
        config.model.hidden_dims = (16, 32, 32)
        config.model.norm_groups = 4
        config.model.heads, config.model.head_dim = 2, 8
        config.train.num_steps = 30
        config.train.batch_size = 16
        config.train.log_every = 10
        config.optim.warmup_steps = 5
    else:
        config.train.num_steps = 4000
    config.sample.at_end = False
    config.train.sample_every = 0
    config.train.checkpoint_every = config.train.num_steps
    config.train.async_checkpointing = False

    WORKDIR = RUNS / "03_digits_conditional"
    shutil.rmtree(WORKDIR, ignore_errors=True)
    t0 = time.perf_counter()
    state = jaxdiff.train_and_evaluate(config, WORKDIR)
    print(f"trained {int(state.step)} steps in {time.perf_counter() - t0:.0f} s")

    model, schedule = build_model(config), build_schedule(config)
    params = state.ema_params if state.ema_params is not None else state.params
    NUM_CLASSES, SIZE = model.num_classes, config.data.image_size
    '''),
    md("""
    ## One sampling function for everything below

    The network is `model.apply(variables, x, t, c)` with a context `c` of shape `[B, 10]`: one-hot
    labels, any mix of them, or zeros (the "null" context, which the model learnt thanks to the
    label dropout). The function below builds `eps_fn`, wraps it with classifier-free guidance and
    runs DDIM. Parameters, context, scale and key are *arguments* of the jitted function, so
    changing any of them reuses the compiled program.
    """),
    code('''
    NUM_STEPS = 20 if FAST else 50


    def cond_eps_fn(params):
        return lambda x, t, c: model.apply({"params": params}, x, t, c)


    @jax.jit
    def sample_cfg(params, context, scale, key):
        """DDIM samples [B, H, W, 1] in [0, 1] for contexts [B, 10] with guidance scale `scale`."""
        eps_fn = guidance.classifier_free(cond_eps_fn(params), context, scale)
        k_init, k_loop = jax.random.split(key)
        x_T = jax.random.normal(k_init, (context.shape[0], SIZE, SIZE, 1))
        x0 = samplers.ddim_sample(eps_fn, schedule, x_T, k_loop, num_steps=NUM_STEPS, clip_sample=True)
        return jnp.clip((x0 + 1) / 2, 0, 1)
    '''),
    md("""
    ## Colour guidance, in both forms

    The hands-on notebook steers a sampler towards a colour with the loss
    `mean |x0_hat - target|` of the *predicted clean image* `x0_hat`, differentiated with respect to
    the current noisy `x_t`. `guidance.gradient_guidance` offers two ways to use that gradient `g`:

    * `form="score"` (universal guidance): the noise prediction becomes
      `eps + sqrt(1 - abar_t) * scale * g`, a new `eps_fn` usable with any sampler;
    * `form="notebook"`: exactly the notebook's loop: move `x_t` by `-scale * g` before the
      scheduler step; it returns a `guide_x_fn` for `ddim_sample(..., guide_x_fn=...)`.

    Our digits are grey, so the "colour" is a single brightness value: `color_loss((1.0,))` asks
    for a white image (lots of ink), `color_loss((0.0,))` for a black one (little ink). On an RGB
    model pass an RGB triple, e.g. `color_loss((0.1, 0.9, 0.5))`.
    """),
    code('''
    @functools.partial(jax.jit, static_argnames=("form",))
    def sample_colour(params, target, scale, key, form):
        """Unconditional DDIM samples steered towards brightness `target` (in [0, 1])."""
        null = jnp.zeros((16, NUM_CLASSES))
        eps_fn = lambda x, t: model.apply({"params": params}, x, t, null)
        loss_fn = guidance.color_loss(target)
        guided = guidance.gradient_guidance(eps_fn, loss_fn, scale, schedule, form=form)
        k_init, k_loop = jax.random.split(key)
        x_T = jax.random.normal(k_init, (16, SIZE, SIZE, 1))
        if form == "score":
            x0 = samplers.ddim_sample(guided, schedule, x_T, k_loop, num_steps=NUM_STEPS, clip_sample=True)
        else:
            x0 = samplers.ddim_sample(eps_fn, schedule, x_T, k_loop, num_steps=NUM_STEPS, clip_sample=True,
                                      guide_x_fn=guided)
        return jnp.clip((x0 + 1) / 2, 0, 1)


    key = jax.random.key(0)
    panels = {
        "no guidance": sample_colour(params, jnp.array([1.0]), 0.0, key, form="score"),
        "score form, bright, scale 50": sample_colour(params, jnp.array([1.0]), 50.0, key, form="score"),
        "score form, dark, scale 50": sample_colour(params, jnp.array([0.0]), 50.0, key, form="score"),
        "notebook form, bright, scale 3": sample_colour(params, jnp.array([1.0]), 3.0, key, form="notebook"),
        "notebook form, dark, scale 3": sample_colour(params, jnp.array([0.0]), 3.0, key, form="notebook"),
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.6))
    for ax, (title, images) in zip(axes, panels.items()):
        show(images, f"{title}\\nmean brightness {float(images.mean()):.2f}", ncols=4, ax=ax)
    '''),
    md("""
    The gradient is per sample here (`per_sample=True`, the default): each image is pulled by its
    own loss (a mean over its 256 pixels), whatever the batch. The notebook form is much stronger
    near `t = 0` for the same scale (the docstring of `gradient_guidance` gives the exact
    relation), hence the smaller scale. Try other scales: too large a scale trades the digit's
    shape for the target brightness.

    ## Class conditioning with classifier-free guidance

    `eps = eps_u + w (eps_c - eps_u)`: `w = 0` ignores the label, `w = 1` is the plain conditional
    model, `w > 1` pushes further towards the class (sharper, less varied digits). One row per
    scale, one column per class; the same starting noise in every row.
    """),
    code('''
    labels = jnp.arange(NUM_CLASSES)
    context = labels_to_context(labels, NUM_CLASSES, NUM_CLASSES)  # one-hot [10, 10]
    SCALES = (0.0, 1.0, 3.0, 6.0)
    rows = [sample_cfg(params, context, scale, jax.random.key(1)) for scale in SCALES]
    show(np.concatenate(rows), "rows: guidance scale " + ", ".join(map(str, SCALES)) + "; columns: digits 0-9",
         ncols=NUM_CLASSES);
    '''),
    md("""
    `jaxdiff.make_sampler(config, labels=..., guidance_scale=...)` (and `load_sampler`) build the
    same thing from a config in one call:
    """),
    code('''
    sample = jaxdiff.make_sampler(config, num_images=10, num_steps=NUM_STEPS, labels=[3], guidance_scale=3.0,
                                  model=model, schedule=schedule)
    show(sample(params, jax.random.key(2)), "make_sampler(labels=[3], guidance_scale=3)", ncols=10);
    '''),
    md("""
    ## Context mixing

    The context does not have to be one-hot. `labels_to_context` also takes a float array
    `[num_images, num_classes]`: below, each row mixes two digits with weights from 1/0 to 0/1.
    """),
    code('''
    PAIRS = ((1, 7), (0, 6), (3, 8))
    weights = np.linspace(1, 0, 10)  # 10 images per row: the same batch shape as above, no recompilation
    mixed = np.zeros((len(PAIRS) * len(weights), NUM_CLASSES), np.float32)
    for i, (a, b) in enumerate(PAIRS):
        for j, w in enumerate(weights):
            mixed[i * len(weights) + j, [a, b]] = (w, 1 - w)
    context = labels_to_context(mixed, len(mixed), NUM_CLASSES)
    # The same noise for every image of a row: a row shows the effect of the context alone.
    n = len(weights)
    images = jnp.concatenate([sample_cfg(params, context[i * n:(i + 1) * n], 3.0, jax.random.key(3))
                              for i in range(len(PAIRS))])
    show(images, "rows: 1 -> 7, 0 -> 6, 3 -> 8 (weight of the first digit from 1 to 0)", ncols=len(weights));
    '''),
    md("""
    ## Classifier guidance

    Classifier guidance needs a classifier of *noisy* images `p(y | x_t, t)`. We train a small one
    here on digits noised by the model's own schedule, then steer the **unconditional** model (the
    null context) with `guidance.classifier_guidance`:
    `eps' = eps - sqrt(1 - abar_t) * scale * grad log p(y | x_t)`.
    """),
    code('''
    import flax.linen as nn
    import optax

    from jaxdiff import schedules
    from jaxdiff.data import DigitsSource
    from jaxdiff.models import sinusoidal_embedding


    class NoisyClassifier(nn.Module):
        """A small CNN: (x_t [B, 16, 16, 1], t [B]) -> logits [B, 10]."""

        @nn.compact
        def __call__(self, x, t):
            temb = nn.Dense(64)(sinusoidal_embedding(t, 32))  # [B, 64]
            for width in (32, 64):  # 16x16 -> 8x8 -> 4x4
                x = nn.silu(nn.Conv(width, (3, 3))(x))
                x = x + nn.Dense(width)(temb)[:, None, None, :]  # tell the classifier how noisy x is
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
            x = x.reshape(x.shape[0], -1)  # [B, 4 * 4 * 64]: keep where the strokes are
            return nn.Dense(10)(nn.silu(nn.Dense(64)(x)))


    digits = DigitsSource(image_size=SIZE)
    train_x, train_y = jnp.asarray(digits.images), jnp.asarray(digits.labels)
    clf = NoisyClassifier()
    clf_params = clf.init(jax.random.key(4), train_x[:1], jnp.zeros((1,), jnp.int32))["params"]
    clf_tx = optax.adam(2e-3)
    CLF_STEPS = 150 if FAST else 3000


    def clf_loss(clf_params, x0, y, key):
        k_t, k_eps = jax.random.split(key)
        t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_train_timesteps)
        x_t = schedules.add_noise(schedule, x0, jax.random.normal(k_eps, x0.shape), t)
        logits = clf.apply({"params": clf_params}, x_t, t)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def clf_step(clf_params, opt_state, step, key):
        k_batch, k_loss = jax.random.split(jax.random.fold_in(key, step))
        idx = jax.random.randint(k_batch, (64,), 0, train_x.shape[0])
        loss, grads = jax.value_and_grad(clf_loss)(clf_params, train_x[idx], train_y[idx], k_loss)
        updates, opt_state = clf_tx.update(grads, opt_state, clf_params)
        return optax.apply_updates(clf_params, updates), opt_state, loss


    opt_state = clf_tx.init(clf_params)
    clf_losses = []
    for step in range(CLF_STEPS):
        clf_params, opt_state, loss = clf_step(clf_params, opt_state, step, jax.random.key(5))
        clf_losses.append(loss)


    @jax.jit
    def accuracy(clf_params, t):
        x_t = schedules.add_noise(schedule, train_x, jax.random.normal(jax.random.key(6), train_x.shape), t)
        logits = clf.apply({"params": clf_params}, x_t, jnp.full((train_x.shape[0],), t))
        return jnp.mean(logits.argmax(-1) == train_y)


    for t in (0, 250, 500, 750, 999):
        print(f"classifier accuracy at t={t:3d}: {float(accuracy(clf_params, t)):.2f}")
    '''),
    code('''
    @jax.jit
    def sample_classifier_guided(params, clf_params, labels, scale, key):
        null = jnp.zeros((labels.shape[0], NUM_CLASSES))
        eps_fn = lambda x, t: model.apply({"params": params}, x, t, null)
        logits_fn = lambda x, t: clf.apply({"params": clf_params}, x, t)
        guided = guidance.classifier_guidance(eps_fn, logits_fn, labels, scale, schedule)
        k_init, k_loop = jax.random.split(key)
        x_T = jax.random.normal(k_init, (labels.shape[0], SIZE, SIZE, 1))
        x0 = samplers.ddim_sample(guided, schedule, x_T, k_loop, num_steps=NUM_STEPS, clip_sample=True)
        return jnp.clip((x0 + 1) / 2, 0, 1)


    CLF_SCALES = (0.0, 2.0, 5.0)
    rows = [sample_classifier_guided(params, clf_params, labels, s, jax.random.key(7)) for s in CLF_SCALES]
    show(np.concatenate(rows), "classifier guidance; rows: scale " + ", ".join(map(str, CLF_SCALES))
         + "; columns: target digit 0-9", ncols=NUM_CLASSES);
    '''),
    md("""
    Guides compose: `classifier_free(...)` returns an `eps_fn`, and so does
    `gradient_guidance(..., form="score")`, so
    `gradient_guidance(classifier_free(net, c, 3.0), color_loss((1.0,)), 2.0, schedule)` is a valid
    `eps_fn` as well.

    **Next:** notebook 4 builds the book's 133M-parameter flowers model.
    """),
    code(FOOTER),
]

# ---------------------------------------------------------------------------------------------
# 04: the book's flowers model.
# ---------------------------------------------------------------------------------------------

NB04 = [
    md("""
    # 4. The book's model: a U-Net for 64x64 flowers

    *Runs in a few minutes on a laptop CPU with random weights (about 20 seconds with
    `JAXDIFF_NOTEBOOK_FAST=1`, which samples a small network at 16x16).*

    *Learn Generative AI with PyTorch* (Mark Liu, 2024), chapter 15, trains a denoising U-Net with
    attention on the Oxford 102 flowers, and samples with DDIM: 50 steps, `eta = 1`, the predicted
    clean image clipped to [-1, 1]. jaxdiff's `UNet()` with its defaults *is* that model, the
    schedule is `schedules.book_cosine(1000)` and the sampler settings are
    `samplers.book_ddim_kwargs()`. Here we

    1. build `UNet()` and count its parameters without allocating them (`jax.eval_shape`),
    2. load the book's PyTorch weights if a checkpoint is on disk,
    3. sample with the book's settings and show the intermediates at t = 800, 600, 400, 200, 0,
    4. show how to train it with `configs/flowers.py` on a GPU.
    """),
    code(SETUP),
    code(LOAD_CONFIG),
    code(SHOW),
    code('''
    import jax
    import jax.numpy as jnp

    from jaxdiff import samplers, schedules
    from jaxdiff.models import UNet

    book = UNet()  # = the book's UNet(3, hidden_dims=[128, 256, 512, 1024], image_size=64)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(book.init, jax.random.key(0), x, t)["params"]  # shapes only, no memory
    num_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    print(f"UNet(): {num_params:,} parameters")
    assert num_params == 133_417_219

    by_block = {name: sum(int(np.prod(l.shape)) for l in jax.tree.leaves(tree)) for name, tree in shapes.items()}
    for name, count in sorted(by_block.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {name:24s} {count:>12,}")
    '''),
    md("""
    ## The book's schedule

    `book_cosine` is the cosine schedule (Nichol & Dhariwal 2021) with the betas clipped to
    [1e-4, 0.02], computed in float32 as the book's PyTorch code does. The clipping means that
    `abar_999 = 0.0032`, not 0: the last step is not quite pure noise.
    """),
    code('''
    book_schedule = schedules.book_cosine(1000)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    axes[0].plot(np.asarray(book_schedule.betas), label="book_cosine (clipped)")
    axes[0].plot(np.asarray(schedules.cosine(1000).betas).clip(max=0.03), "--", label="cosine (cut at 0.03 here)")
    axes[0].set_title("beta_t"), axes[0].legend()
    axes[1].plot(np.asarray(book_schedule.alphas_cumprod))
    axes[1].set_title("abar_t"), axes[1].set_xlabel("t")
    print("abar_999 =", float(book_schedule.alphas_cumprod[-1]))
    print("book sampler settings:", samplers.book_ddim_kwargs())
    '''),
    md("""
    ## Weights

    If you trained the book's model in PyTorch (or have its checkpoint), save its `state_dict`
    (`torch.save(model.state_dict(), "checkpoints/book_flowers_unet.pth")`) and point
    `JAXDIFF_BOOK_CHECKPOINT` at it, or put it at that default path. The conversion is one call:

    ```python
    params = unet_params_from_torch(torch.load(path, map_location="cpu", weights_only=True))
    ```

    It checks every name and shape (and infers the configuration) and moves the layouts:
    convolutions OIHW -> HWIO, linear layers transposed, GroupNorm `weight` -> `scale`.

    Without a checkpoint the notebook uses random weights: the pictures are then noise-like, but
    the sampling path is the real one. In FAST mode a small network at 16x16 stands in for
    `UNet()` so the cell runs in seconds on a CPU.
    """),
    code('''
    from jaxdiff.models import unet_params_from_torch

    checkpoint = Path(os.environ.get("JAXDIFF_BOOK_CHECKPOINT") or ROOT / "checkpoints" / "book_flowers_unet.pth")
    if checkpoint.is_file() and not FAST:
        import torch

        params = unet_params_from_torch(torch.load(checkpoint, map_location="cpu", weights_only=True))
        model, size, num_images = book, 64, 10
        print(f"loaded {checkpoint}")
    else:
        if FAST:
            model, size, num_images = UNet(hidden_dims=(16, 32, 32), norm_groups=4, heads=2, head_dim=8), 16, 4
        else:
            model, size, num_images = book, 64, 4
        params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32))["params"]
        print(f"no checkpoint at {checkpoint} (or FAST mode): random weights, "
              f"{sum(p.size for p in jax.tree.leaves(params)):,} parameters, {size}x{size}")
    '''),
    md("""
    ## Sampling with the book's settings

    `ddim_sample(eps_fn, book_cosine(1000), x_T, key, **book_ddim_kwargs())`: 50 "leading" steps
    (980, 960, ..., 0), `eta = 1` (fresh noise at every step, with the DDPM variance), the predicted
    `x0` clipped to [-1, 1] and the noise re-derived from the clipped `x0`
    (`use_clipped_model_output=True`), as the book's scheduler does. `trajectory[0]` is `x_T` and
    `trajectory[i + 1]` the state after the step from `timesteps[i]`.
    """),
    code('''
    book_kwargs = samplers.book_ddim_kwargs()
    timesteps = samplers.inference_timesteps(1000, book_kwargs["num_steps"])


    @jax.jit
    def sample_book(params, key):
        eps_fn = lambda x, t: model.apply({"params": params}, x, t)
        k_init, k_loop = jax.random.split(key)
        x_T = jax.random.normal(k_init, (num_images, size, size, 3))
        x0, trajectory = samplers.ddim_sample(eps_fn, book_schedule, x_T, k_loop, return_trajectory=True, **book_kwargs)
        return x0, trajectory


    t0 = time.perf_counter()
    x0, trajectory = jax.block_until_ready(sample_book(params, jax.random.key(1)))
    print(f"{num_images} images, {len(timesteps)} steps at {size}x{size}: {time.perf_counter() - t0:.1f} s")

    SHOW_AT = (800, 600, 400, 200, 0)
    picks = [int(np.flatnonzero(timesteps == t)[0]) for t in SHOW_AT]
    after = [i + 1 for i in picks]  # trajectory[0] is x_T
    strip = np.swapaxes(np.asarray(trajectory)[after], 0, 1).reshape(-1, size, size, 3)  # rows: images
    show(to_unit(strip), "after the steps from t = " + ", ".join(map(str, SHOW_AT)), ncols=len(SHOW_AT));
    '''),
    md("""
    ## Training it: `configs/flowers.py` on a GPU

    The config reproduces the book exactly (all 8,189 images, 64x64, random flips, L1 loss on the
    noise, AdamW 1e-4 with 300 warmup updates and cosine decay, batch 4 for 100 epochs =
    204,800 updates):
    """),
    code('''
    flowers = load_config("flowers")
    print("data:", flowers.data.name, flowers.data.image_size, "| loss:", flowers.loss,
          "| batch:", flowers.train.batch_size, "| updates:", flowers.train.num_steps,
          "| schedule:", flowers.schedule.name, "| model:", tuple(flowers.model.hidden_dims))
    '''),
    md("""
    On a machine with a GPU (after `pip install -e ".[cuda12]"`), prepare the data once and train:

    ```
    tfds build oxford_flowers102 --file_format=array_record --data_dir=DATA_DIR
    python scripts/train.py --config=configs/flowers.py --workdir=runs/flowers \\
        --config.data.data_dir=DATA_DIR
    ```

    The book's batch of 4 takes a day or more on one GPU; the config's docstring lists better
    settings that stay off by default (`--config.train.ema_decay=0.9999`,
    `--config.model.dtype=bfloat16`, `--config.train.batch_size=64`). The run resumes from its
    last checkpoint when restarted, and `jaxdiff.load_sampler("runs/flowers", num_images=10)` samples
    from it with the book's sampler (the config's `sample` section holds the book's settings).
    """),
    code(FOOTER),
]

# ---------------------------------------------------------------------------------------------
# 05: diffusers checkpoints: load, sample, fine-tune, export.
# ---------------------------------------------------------------------------------------------

NB05 = [
    md("""
    # 5. Pretrained diffusers models: load, sample, fine-tune, export

    *Runs in about 3 minutes on a laptop CPU with the stand-in model (under a minute with
    `JAXDIFF_NOTEBOOK_FAST=1`). With the real `google/ddpm-cat-256` (114M parameters, 256x256) use
    a GPU.*

    The workflow of the hands-on notebook's `DDPMPipeline.from_pretrained("google/ddpm-cat-256")`,
    in JAX:

    1. `jaxdiff.pretrained.load_diffusers(folder)` reads a diffusers `UNet2DModel` checkpoint from
       a **local folder** (jaxdiff never downloads) into `(model, params, schedule)`,
    2. DDIM sampling with the checkpoint's own scheduler settings,
    3. a short fine-tune on a folder of images,
    4. `save_diffusers(...)` writes it back, loadable by `diffusers.UNet2DModel.from_pretrained`.

    Get the real weights once with
    `huggingface-cli download google/ddpm-cat-256 --local-dir checkpoints/ddpm-cat-256`
    (or set `JAXDIFF_CAT_CHECKPOINT`). When they are not on disk (and always in FAST mode) the
    notebook makes a small stand-in with the same architecture family and random weights, using
    diffusers' own `UNet2DModel(...).save_pretrained`, so the files are in exactly the format the
    hub serves.
    """),
    code(SETUP),
    code(SHOW),
    code('''
    import shutil

    import diffusers
    import torch

    CAT = Path(os.environ.get("JAXDIFF_CAT_CHECKPOINT") or ROOT / "checkpoints" / "ddpm-cat-256")
    WORK = RUNS / "05_pretrained"
    shutil.rmtree(WORK, ignore_errors=True)

    if (CAT / "config.json").is_file() and not FAST:
        folder = CAT
        print(f"using the real checkpoint in {folder}")
    else:
        # ddpm-cat-256's architecture (ResNet blocks, attention at 16x16, the original DDPM's
        # embedding and padding conventions), narrower and shallower, with random weights.
        if FAST:
            blocks = dict(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "UpBlock2D"), sample_size=16)
        else:
            blocks = dict(block_out_channels=(32, 32, 64, 64), sample_size=32,
                          down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(
            in_channels=3, out_channels=3, layers_per_block=2 if not FAST else 1, attention_head_dim=None,
            norm_num_groups=8, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
            **blocks,
        )
        folder = WORK / "ddpm-cat-standin"
        unet.save_pretrained(folder)  # config.json + diffusion_pytorch_model.safetensors
        # ddpm-cat-256 ships its scheduler_config.json beside the weights: linear betas, 1000 steps.
        diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True).save_pretrained(folder)
        print(f"stand-in written to {folder}: {sorted(p.name for p in folder.iterdir())}")
    '''),
    code('''
    import jax
    import jax.numpy as jnp

    from jaxdiff import pretrained, samplers

    model, params, schedule, scheduler_config = pretrained.load_diffusers(folder, return_scheduler_config=True)
    SIZE = model.sample_size if isinstance(model.sample_size, int) else (model.sample_size or (32,))[0]
    print(f"{type(model).__name__}: {sum(p.size for p in jax.tree.leaves(params)):,} parameters, {SIZE}x{SIZE}")
    print(scheduler_config)
    '''),
    md("""
    ## Same numbers as PyTorch

    The Flax module reproduces diffusers' `UNet2DModel` (channels last). A quick check on one
    noisy input:
    """),
    code('''
    x = jax.random.normal(jax.random.key(0), (2, SIZE, SIZE, 3))
    t = jnp.array([10, 700])
    eps_jax = jax.jit(model.apply)({"params": params}, x, t)
    torch_unet = diffusers.UNet2DModel.from_pretrained(folder).eval()
    with torch.no_grad():
        eps_torch = torch_unet(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2)), torch.from_numpy(np.asarray(t))).sample
    print("max |JAX - PyTorch| =", float(np.abs(np.asarray(eps_jax) - eps_torch.numpy().transpose(0, 2, 3, 1)).max()))
    '''),
    md("""
    ## DDIM sampling with the checkpoint's settings

    `samplers.kwargs_from_diffusers_config` turns the scheduler config into sampler arguments
    (prediction type, clipping, timestep spacing, ...). The params are an argument of the jitted
    function, so the fine-tuned params below reuse the same compiled sampler.
    """),
    code('''
    NUM_IMAGES = 4
    NUM_STEPS = 10 if FAST else 50
    sampler_kwargs = samplers.kwargs_from_diffusers_config(scheduler_config.raw, schedule)
    print(sampler_kwargs)


    @jax.jit
    def sample(params, key):
        eps_fn = lambda x, t: model.apply({"params": params}, x, t)
        k_init, k_loop = jax.random.split(key)
        x_T = jax.random.normal(k_init, (NUM_IMAGES, SIZE, SIZE, 3))
        return samplers.ddim_sample(eps_fn, schedule, x_T, k_loop, num_steps=NUM_STEPS, **sampler_kwargs)


    t0 = time.perf_counter()
    before = np.asarray(sample(params, jax.random.key(1)))
    print(f"{NUM_IMAGES} images, {NUM_STEPS} DDIM steps: {time.perf_counter() - t0:.1f} s (with compilation)")
    show(to_unit(before), "DDIM samples before fine-tuning", ncols=NUM_IMAGES);
    '''),
    md("""
    ## Fine-tune on a folder of images

    Any folder of PNG/JPEG files works (`jaxdiff.data.ImageFolderSource` resizes and centre-crops
    them; set `JAXDIFF_FINETUNE_IMAGES` to use your own). Here we draw a small folder of orange
    "cats" (discs with two ears) so the notebook needs nothing from the internet.

    The loop is the DDPM objective written out: noise a batch at random timesteps with
    `schedules.add_noise`, regress the model output on the noise, one optax AdamW step, all in one
    jitted function of explicit inputs.
    """),
    code('''
    from PIL import Image, ImageDraw

    from jaxdiff.data import ImageFolderSource

    images_dir = os.environ.get("JAXDIFF_FINETUNE_IMAGES")
    if not images_dir:
        images_dir = WORK / "cats"
        images_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(32):
            img = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(150, 230, 3)))
            draw = ImageDraw.Draw(img)
            cx, cy, r = (int(v) for v in (rng.integers(24, 40), rng.integers(28, 40), rng.integers(12, 18)))
            fur = (int(rng.integers(200, 256)), int(rng.integers(90, 150)), int(rng.integers(0, 60)))
            draw.polygon([(cx - r, cy - r // 2), (cx - r // 2, cy - 2 * r), (cx, cy - r)], fill=fur)
            draw.polygon([(cx + r, cy - r // 2), (cx + r // 2, cy - 2 * r), (cx, cy - r)], fill=fur)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fur)
            img.save(images_dir / f"cat_{i:02d}.png")

    source = ImageFolderSource(images_dir, image_size=SIZE, channels=3)
    data = jnp.asarray(np.stack([source[i]["image"] for i in range(len(source))]))  # [N, S, S, 3] in [-1, 1]
    print(f"{len(source)} images from {images_dir}, array {data.shape}")
    show(to_unit(data[:16]), "fine-tuning images", ncols=8);
    '''),
    code('''
    import functools

    import optax

    from jaxdiff import schedules

    FINETUNE_STEPS = 20 if FAST else 400
    BATCH = 8
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, FINETUNE_STEPS), weight_decay=0.0)


    def loss_fn(params, x0, key):
        """The DDPM loss: E || eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) - eps ||^2."""
        k_t, k_eps = jax.random.split(key)
        t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_train_timesteps)
        eps = jax.random.normal(k_eps, x0.shape)
        x_t = schedules.add_noise(schedule, x0, eps, t)
        return jnp.mean((model.apply({"params": params}, x_t, t) - eps) ** 2)


    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def finetune_step(params, opt_state, step, key):
        k_batch, k_flip, k_loss = jax.random.split(jax.random.fold_in(key, step), 3)
        x0 = data[jax.random.randint(k_batch, (BATCH,), 0, data.shape[0])]
        flip = jax.random.bernoulli(k_flip, 0.5, (BATCH, 1, 1, 1))
        x0 = jnp.where(flip, x0[:, :, ::-1], x0)  # random horizontal flips
        loss, grads = jax.value_and_grad(loss_fn)(params, x0, k_loss)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss


    tuned = jax.tree.map(jnp.copy, params)  # keep the pretrained params (the step donates its input)
    opt_state = tx.init(tuned)
    losses = []
    t0 = time.perf_counter()
    for step in range(FINETUNE_STEPS):
        tuned, opt_state, loss = finetune_step(tuned, opt_state, step, jax.random.key(2))
        losses.append(loss)
    print(f"{FINETUNE_STEPS} fine-tuning steps in {time.perf_counter() - t0:.1f} s")
    plt.figure(figsize=(5, 2.5))
    plt.plot(np.asarray(jax.device_get(losses))), plt.xlabel("step"), plt.ylabel("L2 loss on eps");
    '''),
    code('''
    after = np.asarray(sample(tuned, jax.random.key(1)))  # the same compiled sampler, new params
    fig, axes = plt.subplots(2, 1, figsize=(6, 3.5))
    show(to_unit(before), "before fine-tuning", ncols=NUM_IMAGES, ax=axes[0])
    show(to_unit(after), "after fine-tuning (same starting noise)", ncols=NUM_IMAGES, ax=axes[1]);
    '''),
    md("""
    With the real `ddpm-cat-256` weights the fine-tune nudges a model that already draws cats
    towards your images. The random-weight stand-in starts from nothing, so a few hundred steps
    only teach it the colours of the folder: the point here is the mechanics.

    For a long fine-tune of the full-size model, `load_diffusers(folder, remat=True,
    dtype=jnp.bfloat16)` rematerialises the ResNet and attention layers and computes in bfloat16
    (the params stay float32), and `optax.MultiSteps` accumulates gradients over micro-batches.

    ## Export back to diffusers

    `save_diffusers(params, model, folder, scheduler_config=...)` writes a `DDPMPipeline` folder
    (`model_index.json`, `unet/`, `scheduler/`). PyTorch users load it as usual:
    """),
    code('''
    out = pretrained.save_diffusers(tuned, model, WORK / "cat-finetuned", scheduler_config=scheduler_config)
    print("wrote", sorted(str(p.relative_to(WORK)) for p in (WORK / "cat-finetuned").rglob("*") if p.is_file()))

    pipeline = diffusers.DDPMPipeline.from_pretrained(WORK / "cat-finetuned")
    with torch.no_grad():
        eps_torch = pipeline.unet(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2)), torch.from_numpy(np.asarray(t))).sample
    eps_jax = jax.jit(model.apply)({"params": tuned}, x, t)
    print("exported model: max |JAX - PyTorch| =",
          float(np.abs(np.asarray(eps_jax) - eps_torch.numpy().transpose(0, 2, 3, 1)).max()))

    # ... and jaxdiff reads its own export back.
    _, reloaded, _ = pretrained.load_diffusers(WORK / "cat-finetuned")
    print("round trip exact:", all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), tuned, reloaded))))
    '''),
    code(FOOTER),
]

# ---------------------------------------------------------------------------------------------
# 06: the music Transformer: events, training on Bach chorales, generation at two temperatures.
# ---------------------------------------------------------------------------------------------

NB06 = [
    md("""
    # 6. A music Transformer

    *Runs in about 8 minutes on a 2-core CPU (about a minute with `JAXDIFF_NOTEBOOK_FAST=1`); the
    first run also converts the Bach scores of music21's corpus to events, about 3 minutes, once.*

    The book ends chapter 14 with a Transformer that writes piano music: MIDI is turned into a
    stream of **performance events** (Oore et al. 2018; Huang et al. 2018, "Music Transformer"),
    a decoder-only Transformer learns to predict the next event, and a temperature controls how
    bold the sampled continuation is. This notebook walks that path in JAX with `jaxdiff.music`:

    1. encode a piece into the book's 390-id vocabulary and look at the events,
    2. train briefly on the Bach chorales that ship with music21 (no download),
    3. continue a held-out prompt at temperatures 0.7 and 1.5, and look at the piano rolls.
    """),
    code(SETUP),
    code(LOAD_CONFIG),
    code("""
    import collections

    import jax
    import matplotlib.pyplot as plt
    import numpy as np

    from jaxdiff import music
    from jaxdiff.music import data as music_data
    from jaxdiff.music.roll import piano_roll

    path = music_data.chorale_paths()[0]
    ids = music.encode_midi(music_data.chorale_midi(path))
    print(f"{path.name}: {len(ids)} events")
    for i, name in enumerate(music.describe(ids[:16])):
        print(f"{ids[i]:4d}  {name}")
    kinds = collections.Counter(n.split()[0] for n in music.describe(ids))
    print(dict(kinds))
    """),
    md("""
    Four kinds of event: `note_on` and `note_off` (one per pitch), `time_shift` (10 ms to 1 s)
    and `velocity` (32 loudness bins). Nearly every `note_on` follows a `velocity` event: the
    book's encoder compares the previous *raw* velocity with the new *bin*, so it repeats the
    velocity even when it does not change (`jaxdiff.music.encode_midi` keeps this quirk so that
    weights trained with the book's code see the ids they were trained on; `book_quirks=False`
    gives a corrected encoding). Decoding walks the events back into notes:
    """),
    code("""
    notes = music.decode_notes(ids)
    print(f"{len(notes)} notes, {notes[-1][3]:.1f} s; first: {notes[:3]}")
    fig, ax = plt.subplots(figsize=(12, 3))
    ax.imshow(piano_roll(ids[:300]), aspect="auto", interpolation="nearest")
    ax.set_title(f"{path.stem}: the first 300 events as a piano roll (pitch up, time right)")
    ax.set_axis_off();
    """),
    md("""
    ## Training

    `configs/music.py` is the embedded default: the 410 Bach scores, encoded once and cached in
    `~/.cache/jaxdiff`, every tenth piece held out; windows of 256 events; a 4-block model of
    the book's design (the book's own is `configs/music.py:book`, on MAESTRO). The loop is
    the same `train_and_evaluate` as for diffusion (checkpoints, exact resume, `metrics.jsonl`);
    the music task logs the held-out loss per token beside the loss of the unigram frequencies.
    """),
    code("""
    from jaxdiff.train import train_and_evaluate

    config = load_config("music", "smoke" if FAST else None)
    if FAST:
        config.train.num_steps, config.train.sample_every = 8, 4
    else:
        config.train.num_steps, config.train.sample_every = 300, 100
    config.train.checkpoint_every = config.train.num_steps
    workdir = RUNS / "06_music"
    t0 = time.perf_counter()
    state = train_and_evaluate(config, workdir)
    print(f"trained to step {int(state.step)} in {time.perf_counter() - t0:.0f} s")
    """),
    code("""
    import json

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["step"] for r in train_records], [r["loss"] for r in train_records], label="training loss")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="held-out loss")
    ax.axhline(evals[-1]["unigram_loss"], color="grey", ls="--", label="unigram baseline")
    ax.set_xlabel("step"); ax.set_ylabel("nats per event"); ax.legend();
    print({k: round(v, 3) for k, v in evals[-1].items() if k != "step"})
    """),
    md("""
    ## Generation at two temperatures

    `music.generate` is one `lax.scan` inside one `jit`: the prompt goes through the network
    once, then each step feeds only the newest event and reads the earlier keys and values from
    a cache (the book's loop reruns the whole prefix for every event). The prompt is the start
    of a held-out chorale, decoded and encoded again as the book does. Events are drawn from
    `softmax(logits / T)` over the 388 event ids: a low temperature keeps to the likeliest
    moves, a high one takes risks.
    """),
    code("""
    from jaxdiff.music.roll import save_piano_roll
    from jaxdiff.music.training import build_music_model, held_out_prompt

    model = build_music_model(config)
    pieces = music_data.load_pieces(config.data, "validation")
    prompt = held_out_prompt(pieces, config.sample.prompt_len)
    fig, axes = plt.subplots(2, 1, figsize=(12, 6))
    for ax, temperature in zip(axes, (0.7, 1.5)):
        seq = np.asarray(music.generate(model, state.params, prompt[None], jax.random.key(0),
                                        num_tokens=config.sample.num_tokens, temperature=temperature))[0]
        out = workdir / f"continuation_T{temperature}.mid"
        music.decode_midi(seq, path=out)
        save_piano_roll(seq, out.with_suffix(".png"), prompt_len=len(prompt))
        new = music.decode_notes(seq[len(prompt):])
        print(f"T={temperature}: {len(new)} new notes, pitches {min((n[1] for n in new), default=0)}-"
              f"{max((n[1] for n in new), default=0)}, written to {out}")
        ax.imshow(piano_roll(seq, len(prompt)), aspect="auto", interpolation="nearest")
        ax.set_title(f"temperature {temperature}: prompt (blue) and continuation (orange)")
        ax.set_axis_off()
    """),
    md("""
    Listen to the `.mid` files in any MIDI player. The book's weights, if you have them
    (`musicTrans.pth`), load with `music.music_params_from_torch` into `music.MusicTransformer()`;
    `scripts/generate_music.py --checkpoint=musicTrans.pth` does it from the command line.
    """),
    code(FOOTER),
]

# ---------------------------------------------------------------------------------------------
# 07: text-to-image: a Stable Diffusion pipeline folder, its three components.
# ---------------------------------------------------------------------------------------------

NB07 = [
    md("""
    # 7. Text-to-image: latent diffusion from a Stable Diffusion folder

    *Runs in about a minute on a laptop CPU with the random stand-in pipeline (under a minute with
    `JAXDIFF_NOTEBOOK_FAST=1`). With a real Stable Diffusion folder (set `JAXDIFF_SD_CHECKPOINT`)
    use a GPU: 30 steps of a 512x512 image are minutes on a CPU.*

    The book closes its diffusion chapter with text-to-image models, built from three parts:

    1. a **text encoder** (CLIP) turns the prompt into vectors,
    2. the **image generator** (a U-Net) reads those vectors through attention,
    3. a **diffusion process** refines noise into an image, step by step.

    Latent diffusion (Rombach et al. 2022) is the open form of that system, and diffusers'
    `StableDiffusionPipeline` folders are what people have on disk. `pretrained.load_text_to_image`
    reads one (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) into JAX; below, one
    cell per part.

    Get real weights once with
    `huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir checkpoints/sd15`
    and set `JAXDIFF_SD_CHECKPOINT=checkpoints/sd15`. Without them (and always in FAST mode) the
    notebook writes a small pipeline with random weights using diffusers itself, so the files are
    in exactly the format the hub serves; its pictures are noise, but every step is the real one.
    """),
    code(SETUP),
    code(SHOW),
    code("""
    import shutil

    import jax
    import jax.numpy as jnp

    from jaxdiff import pretrained
    from jaxdiff.text_to_image import write_random_pipeline

    CHECKPOINT = os.environ.get("JAXDIFF_SD_CHECKPOINT")
    if CHECKPOINT and not FAST:
        folder = Path(CHECKPOINT)
        print(f"using the pipeline in {folder}")
    else:
        folder = RUNS / "07_text_to_image" / "random-sd"
        shutil.rmtree(folder, ignore_errors=True)
        write_random_pipeline(folder, "sd1", "tiny" if FAST else "small")
        print(f"random-weight stand-in written to {folder}: {sorted(p.name for p in folder.iterdir())}")

    pipe = pretrained.load_text_to_image(folder, dtype=jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)
    for name in ("text_encoder", "unet", "vae"):
        count = sum(p.size for p in jax.tree.leaves(pipe.params[name]))
        print(f"{name:13s} {type(getattr(pipe, name)).__name__:16s} {count:>13,} parameters")
    print(f"scheduler: {pipe.sampler}, images {pipe.height}x{pipe.width}")
    """),
    md("""
    ## 1. The text encoder

    The prompt becomes 77 token ids (start token, BPE tokens, end token, then padding with the
    tokenizer's own pad token), and CLIP's causal text transformer turns them into one vector per
    token: `[N, 77, D]` hidden states. The U-Net reads all 77 of them, not a single pooled vector.
    """),
    code("""
    prompts = ["a watercolour painting of a fox in the snow", "a photo of a red bicycle"]
    ids = pipe.tokenize(prompts)
    print("ids", ids.shape, ids.dtype, ids[0, :12].tolist(), "...")
    context = pipe.encode_text(pipe.params, ids)
    print("text hidden states", context.shape, context.dtype)
    empty = pipe.encode_text(pipe.params, pipe.tokenize([""]))
    cosine = jnp.sum(context * empty, -1) / (jnp.linalg.norm(context, axis=-1) * jnp.linalg.norm(empty, axis=-1))
    print("per-token cosine to the empty prompt, first 8 tokens:", np.round(np.asarray(cosine[0, :8]), 3))
    """),
    md("""
    ## 2. The image generator: a U-Net with cross-attention

    The U-Net works on latents, 8 times smaller than the image per side for Stable Diffusion
    (4 channels). Inside each of its transformer blocks, the second attention takes its queries
    from the image positions and its keys and values from the text vectors: this is where the
    prompt enters. Same noisy latents, two prompts, two different predictions:
    """),
    code("""
    shape = pipe.latent_shape(1)
    z_t = jax.random.normal(jax.random.key(0), shape)
    unet = jax.jit(pipe.unet.apply)
    eps_fox = unet({"params": pipe.params["unet"]}, z_t, 500, context[:1])
    eps_bike = unet({"params": pipe.params["unet"]}, z_t, 500, context[1:])
    print("latents", z_t.shape, "-> prediction", eps_fox.shape)
    print("relative change from the prompt:", float(jnp.linalg.norm(eps_fox - eps_bike) / jnp.linalg.norm(eps_fox)))
    """),
    md("""
    ## 3. The diffusion process, then back to pixels

    `pipe(...)` is one jitted program: encode the prompts (and the negative prompt, empty by
    default), run the folder's sampler (PLMS for SD 1.x folders, DDIM for SD 2.x) as a `lax.scan`
    with classifier-free guidance, `eps = eps_uncond + w (eps_text - eps_uncond)` computed in one
    batched U-Net call per step, then decode the latents with the VAE. `guidance_scale <= 1`
    drops the unconditional half.
    """),
    code("""
    NUM_STEPS = 4 if FAST else 30
    t0 = time.perf_counter()
    images = pipe(pipe.params, jax.random.key(1), ids, num_steps=NUM_STEPS, guidance_scale=7.5)
    images = np.asarray(images)
    print(f"{len(images)} images {images.shape[1:]} in {time.perf_counter() - t0:.1f} s (with compilation)")
    unguided = np.asarray(pipe(pipe.params, jax.random.key(1), ids, num_steps=NUM_STEPS, guidance_scale=1.0))
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    show(images, "guidance 7.5", ax=axes[0])
    show(unguided, "no guidance", ax=axes[1]);
    """),
    md("""
    The VAE alone: `pipe.vae.apply(..., method="encode")` gives the latent mean of an image and
    `method="decode"` maps latents back (divided by `scaling_factor` first, as the sampler's
    latents are scaled). A round trip of a generated image:
    """),
    code("""
    vae_params = {"params": pipe.params["vae"]}
    mean = pipe.vae.apply(vae_params, jnp.asarray(images) * 2 - 1, method="encode")
    back = pipe.vae.apply(vae_params, mean, method="decode")
    print("latent", mean.shape, "scaling_factor", pipe.vae.scaling_factor)
    print("round-trip mean |error| in [0, 1] units:", float(jnp.mean(jnp.abs((back + 1) / 2 - images))))
    """),
    code(FOOTER),
]

NOTEBOOKS = {
    "01_noise_and_denoise": NB01,
    "02_train_and_sample_digits": NB02,
    "03_guidance": NB03,
    "04_book_flowers": NB04,
    "05_pretrained_and_finetune": NB05,
    "06_music_transformer": NB06,
    "07_text_to_image": NB07,
}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A v4 notebook without outputs, with deterministic cell ids."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, source) in enumerate(cells):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cell = make(source)
        cell["id"] = f"{name[:2]}-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def _content(nb: nbformat.NotebookNode) -> list[tuple[str, str, str, bool]]:
    """What a notebook says (cell kinds, ids, sources, whether outputs are stored), not how
    a given nbformat version serialises it."""
    return [
        (c.cell_type, c.get("id", ""), c.source, bool(c.get("outputs")) or c.get("execution_count") is not None)
        for c in nb.cells
    ]


def render(name: str) -> str:
    return nbformat.writes(build(name, NOTEBOOKS[name])) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the notebooks are up to date")
    parser.add_argument("names", nargs="*", help="only these notebooks (e.g. 07_text_to_image; default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(NOTEBOOKS))
    if unknown:
        parser.error(f"unknown notebooks {unknown}; known: {sorted(NOTEBOOKS)}")
    stale = []
    for name, cells in NOTEBOOKS.items():
        if args.names and name not in args.names:
            continue
        path = HERE / f"{name}.ipynb"
        text = render(name)
        if args.check:
            if not path.is_file() or _content(nbformat.reads(path.read_text(), as_version=4)) != _content(
                build(name, cells)
            ):
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(HERE.parent)}")
    if stale:
        print(f"stale notebooks (run python notebooks/build_notebooks.py): {stale}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
