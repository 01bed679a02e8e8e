"""Throughput, compile time, memory, FLOPs and MFU of jaxdiff, beside a PyTorch peer, in one run.

    python scripts/benchmark.py                                   # CPU: small model, 16x16
    python scripts/benchmark.py --model=book                      # the book's 64x64 model (GPU default)
    python scripts/benchmark.py --config=configs/digits.py --train_batch=64
    python scripts/benchmark.py --peer_model=book                 # the same architecture in PyTorch
    python scripts/benchmark.py --sweep --json=bench.json         # try the speed options

What is measured, for the U-Net a config (or ``--model``) describes:

* training: images/s of the real ``jaxdiff.train.make_train_step`` (AdamW, the config's loss,
  random timesteps and noise drawn inside the step) jitted over a mesh of all local devices,
  in steady state (after compilation and warm-up; the best of ``--repeats`` windows of
  ``--train_iters`` steps), its compile time, and XLA's FLOPs per image
  (``cost_analysis()["flops"]`` of the lowered global program, counted with loop-free
  attention: see :func:`_counting_config`);
* sampling: images/s of a DDIM loop (``--sample_steps``, eta 0) from ``jaxdiff.make_sampler``
  on one device, its compile time, and FLOPs per image (XLA's count for one forward pass times
  the number of steps: cost analysis counts a ``while`` loop body once);
* memory: the compiled program's footprint (``memory_analysis()``: temporaries + arguments +
  outputs - aliased) everywhere, and ``device.memory_stats()["peak_bytes_in_use"]`` where the
  backend reports it (GPU, TPU);
* achieved TFLOP/s = FLOPs per image x images/s, and MFU against the device's peak
  (:data:`PEAK_TFLOPS`; none for CPUs).

The peer is diffusers' ``UNet2DModel`` built as close to our ``UNet`` as its block types allow
(:func:`peer_unet_kwargs`; both parameter counts are printed), timed the same way in the same
process on the same device: eager PyTorch forward + backward + AdamW with the same loss, and a
50-step ``diffusers.DDIMScheduler`` loop under ``torch.inference_mode``. The architectures
differ (diffusers has 3 ResNets per up level, one more downsampling and narrower attention:
about half our FLOPs per image for the small model), so besides images/s ratios the table
shows the achieved FLOP/s of each, counted by XLA for JAX and by ``torch.utils.flop_counter``
for PyTorch. ``--peer_model=book`` times instead the book's own PyTorch U-Net
(:func:`book_unet_torch`: the same architecture, tested to compute the same function as ours
from the same weights), where images/s ratios compare like with like.

Speed options: ``--dtype=bfloat16``, ``--nodonate``, ``--attention_impl``, ``--remat``,
``--train_batch``/``--sample_batch``, ``--cpu_fusion`` (which dots and convolutions XLA:CPU
hands to the YNNPACK library: ``auto`` as the library, ``off``, ``dot`` or ``jax_default``; see
:func:`jaxdiff.train.cpu_fusion_mode`). ``--sweep`` varies each option alone from the base
configuration, then measures all the options that helped together, and reports the best configuration.

Text-to-image (``--task=text_to_image``): UNet2DCondition's forward pass on a guided step's batch
and the whole Stable Diffusion pipeline (``--t2i_steps`` steps with classifier-free guidance, text
encoder and VAE included), jaxdiff against diffusers' PyTorch ``StableDiffusionPipeline`` loading
the same random-weight folder, in one run (:func:`text_to_image_benchmark`)::

    python scripts/benchmark.py --task=text_to_image                      # CPU: 'small', 64x64
    python scripts/benchmark.py --task=text_to_image --dtype=bfloat16     # GPU: SD 1.5 sizes, 512x512

Music (``--task=music``): the music Transformer's KV-cached generation against the book's
recompute loop in PyTorch, and its training step against PyTorch's, interleaved in one run
(``scripts/music_benchmark.py``)::

    python scripts/benchmark.py --task=music --repeats=2

Timings on a CPU shared with other processes are noisy; compare only ratios from one run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff import train as train_lib
from jaxdiff.config_defaults import base_config
from jaxdiff.sampling import make_sampler

# Dense peak TFLOP/s per chip: (16-bit, 32-bit). GPU fp32 is the non-tensor-core figure; XLA
# runs fp32 matmuls on GPUs in TF32 by default, so fp32 "MFU" can exceed what this suggests.
# TPUs multiply in bf16 passes either way: one figure.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "V100": (125.0, 15.7),
    "L4": (121.0, 30.3),
    "TPU v4": (275.0, 275.0),
    "TPU v5 lite": (197.0, 197.0),
    "TPU v5e": (197.0, 197.0),
    "TPU v5p": (459.0, 459.0),
    "TPU v5": (459.0, 459.0),
    "TPU v6 lite": (918.0, 918.0),
    "TPU v6e": (918.0, 918.0),
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak TFLOP/s for ``dtype`` (None for CPUs and unknown devices).

    >>> peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16"), peak_tflops("cpu", "float32")
    (989.0, None)
    """
    for name, (half, single) in PEAK_TFLOPS.items():  # Longer names first where they overlap.
        if name.lower() in device_kind.lower():
            return half if dtype in ("bfloat16", "float16") else single
    return None


@dataclasses.dataclass(frozen=True)
class Options:
    """What to measure and how (one benchmark configuration)."""

    dtype: str = "float32"
    donate: bool = True
    attention_impl: str = ""  # "": chosen by backend (cpu_fast on CPU, auto elsewhere)
    remat: bool = False
    train_batch: int = 32
    sample_batch: int = 16
    cpu_fusion: str = "auto"  # XLA:CPU library fusions (jaxdiff.train.CPU_FUSION_MODES or "auto")
    sample_steps: int = 50
    train_iters: int = 10
    sample_iters: int = 1
    window_seconds: float = 0.0  # > 0: train steps per window chosen to last about this long
    repeats: int = 3
    torch_threads: int = 0  # peer's intra-op threads; 0: the faster of torch's default and 1
    peer: str = "diffusers"  # "diffusers": UNet2DModel; "book": the same architecture in PyTorch

    def changed(self, base: Options) -> dict[str, Any]:
        """The fields that differ from ``base``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(base, f.name)}


# ---------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------

MODELS = {
    # name: (hidden_dims, image_size, channels, norm_groups, heads, head_dim)
    "small": ((16, 32, 64, 128), 16, 3, 8, 4, 32),  # the project's CPU comparison
    "book": ((128, 256, 512, 1024), 64, 3, 8, 4, 32),  # UNet(): the book's flowers model
    "tiny": ((8, 16, 16), 8, 1, 4, 2, 8),  # tests
}


def model_config(name: str) -> ml_collections.ConfigDict:
    """A training config for a named model, with the book's objective and optimizer.

    L1 loss on eps, ``book_cosine`` schedule, AdamW(1e-4, b1 0.95, b2 0.999, wd 1e-5).
    """
    if name not in MODELS:
        raise ValueError(f"--model={name!r} is not one of {tuple(MODELS)}.")
    dims, size, channels, groups, heads, head_dim = MODELS[name]
    c = base_config()
    c.data.image_size, c.data.channels = size, channels
    c.model.hidden_dims = dims
    c.model.norm_groups, c.model.heads, c.model.head_dim = groups, heads, head_dim
    c.loss = "l1"
    c.optim.learning_rate, c.optim.b1, c.optim.b2, c.optim.weight_decay = 1e-4, 0.95, 0.999, 1e-5
    c.optim.warmup_steps = 10
    return c


def with_options(config: ml_collections.ConfigDict, opts: Options) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the options' model fields, batch size and step counts."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.dtype = opts.dtype
    c.model.attention_impl = opts.attention_impl
    c.model.remat = opts.remat
    c.train.batch_size = opts.train_batch
    c.train.ema_decay = 0.0
    c.sample.num_images = opts.sample_batch
    c.sample.num_steps = opts.sample_steps
    c.sample.sampler, c.sample.eta = "ddim", 0.0
    return c


def _compiler_options(opts: Options) -> dict[str, str] | None:
    return train_lib.cpu_compiler_options(opts.cpu_fusion)


def _flops(program) -> float:
    """XLA's FLOP count of a lowered or compiled program (a loop body counts once)."""
    cost = program.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _counting_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same job with loop-free attention, for counting FLOPs.

    XLA's cost analysis counts a loop body once, and the CPU attention kernel (and
    ``attention_query_chunk``) run in loops over chunks; ``attention_impl="xla"`` computes the
    same maths without loops, so FLOPs are counted on that program (lowered, not compiled).
    """
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.attention_impl = "xla"
    if "attention_query_chunk" in c.model:
        c.model.attention_query_chunk = None
    return c


def _compiled_bytes(compiled) -> int | None:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes)


def _peak_bytes_in_use() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _best_window(run: Callable[[], Any], iters: int, repeats: int,
                 sync: Callable[[Any], Any] = jax.block_until_ready) -> tuple[float, list[float], Any]:
    """Seconds per call: the best of ``repeats`` windows of ``iters`` calls, all windows, and the
    last call's result. ``sync(result)`` waits for the device at the end of each window."""
    windows, run_result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            run_result = run()
        sync(run_result)
        windows.append((time.perf_counter() - start) / iters)
    return min(windows), windows, run_result


def _iters_for(opts: Options, run: Callable[[], Any],
               sync: Callable[[Any], Any] = jax.block_until_ready) -> int:
    """Train steps per timing window: ``opts.train_iters``, or with ``opts.window_seconds`` set,
    as many as fill about that many seconds (at least 2), from one timed call of ``run``.

    Large batches on an accelerator take up to a second a step; fixed windows of 20 steps would
    spend minutes of a short device lease on one figure.
    """
    if opts.window_seconds <= 0:
        return opts.train_iters
    start = time.perf_counter()
    sync(run())
    return max(2, round(opts.window_seconds / (time.perf_counter() - start)))


def _rates(flops_per_image: float, images_per_sec: float, device_kind: str, dtype: str,
           num_devices: int = 1) -> dict[str, float | None]:
    tflops = flops_per_image * images_per_sec / 1e12
    peak = peak_tflops(device_kind, dtype)
    return {"tflops": tflops, "mfu": tflops / (peak * num_devices) if peak else None}


# ---------------------------------------------------------------------------------------------
# jaxdiff.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """A train step as training runs it, with a fixed random batch: what the benchmark times and
    ``scripts/profile_step.py`` traces."""

    config: ml_collections.ConfigDict  # with the options applied
    mesh: jax.sharding.Mesh
    tx: Any
    lr: Any
    schedule: Any
    state: Any  # replicated over the mesh
    batch: dict[str, jax.Array]  # sharded along "data"
    key: jax.Array
    step_fn: Any  # jitted, not yet lowered

    def compile(self, opts: Options):
        return self.step_fn.lower(self.state, self.batch, self.key).compile(
            compiler_options=_compiler_options(opts))

    def stepper(self, compiled) -> Stepper:
        """Repeated steps of ``compiled`` (from :meth:`compile`) on the fixed batch and key."""
        return Stepper(compiled, self.state, self.batch, self.key)


class Stepper:
    """``stepper()`` runs one train step from the latest state and returns its loss; the state
    it leaves is ``stepper.state`` (the old one may have been donated)."""

    def __init__(self, compiled, state, batch, key):
        self.compiled, self.state, self.batch, self.key = compiled, state, batch, key

    def __call__(self) -> jax.Array:
        self.state, metrics = self.compiled(self.state, self.batch, self.key)
        return metrics["loss"]


def train_setup(config: ml_collections.ConfigDict, opts: Options) -> TrainSetup:
    """Builds ``make_train_step`` (or, with ``opts.donate`` off, the same step without
    donation) for ``config`` with ``opts`` over all local devices, its state and a batch."""
    config = with_options(config, opts)
    mesh = train_lib.make_mesh(jax.local_devices())
    if opts.train_batch % mesh.size:
        raise ValueError(f"train_batch={opts.train_batch} must be a multiple of the {mesh.size} devices.")
    model = train_lib.build_model(config)
    schedule = train_lib.build_schedule(config)
    tx, lr = train_lib.make_optimizer(config)
    replicated = NamedSharding(mesh, P())
    state = jax.jit(functools.partial(train_lib.init_state, config, model, tx),
                    out_shardings=replicated)(jax.random.key(0))
    if opts.donate:
        step_fn = train_lib.make_train_step(config, model, tx, schedule, lr, mesh)
    else:  # make_train_step always donates; the same binding without donation.
        step_fn = jax.jit(
            functools.partial(
                train_lib.train_step, model=model, tx=tx, schedule=schedule, lr_schedule=lr,
                loss_type=config.loss, prediction_type=config.prediction_type,
            ),
            in_shardings=(replicated, NamedSharding(mesh, P("data")), replicated),
            out_shardings=(replicated, replicated),
        )
    rng = np.random.default_rng(0)
    s, ch = config.data.image_size, config.data.channels
    batch = train_lib.shard_batch(
        {"image": rng.uniform(-1, 1, (opts.train_batch, s, s, ch)).astype(np.float32),
         "label": np.zeros((opts.train_batch,), np.int32)}, mesh)
    return TrainSetup(config, mesh, tx, lr, schedule, state, batch, jax.random.key(1), step_fn)


def jax_train_benchmark(config: ml_collections.ConfigDict, opts: Options) -> tuple[dict[str, Any], Any]:
    """Steady-state training throughput of ``make_train_step`` on all local devices.

    Returns ``(metrics, params)``; params (on one device) feed the sampling benchmark.
    """
    setup = train_setup(config, opts)
    config, mesh, state, batch, key = setup.config, setup.mesh, setup.state, setup.batch, setup.key
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))

    start = time.perf_counter()
    compiled = setup.compile(opts)
    compile_s = time.perf_counter() - start

    run = setup.stepper(compiled)
    for _ in range(2):  # warm-up
        jax.block_until_ready(run())
    iters = _iters_for(opts, run)
    seconds, windows, _ = _best_window(run, iters, opts.repeats)
    loss = float(run())
    counting = _counting_config(config)
    count_step = train_lib.make_train_step(counting, train_lib.build_model(counting), setup.tx,
                                           setup.schedule, setup.lr, mesh)
    flops_per_image = _flops(count_step.lower(state, batch, key)) / opts.train_batch  # global program
    images_per_sec = opts.train_batch / seconds
    kind = jax.local_devices()[0].device_kind
    out = {
        "images_per_sec": images_per_sec,
        "step_seconds": seconds,
        "step_seconds_windows": windows,
        "steps_per_window": iters,
        "compile_seconds": compile_s,
        "flops_per_image": flops_per_image,
        **_rates(flops_per_image, images_per_sec, kind, opts.dtype, mesh.size),
        "compiled_bytes": _compiled_bytes(compiled),
        "peak_bytes_in_use": _peak_bytes_in_use(),
        "num_params": num_params,
        "num_devices": mesh.size,
        "final_loss": loss,
    }
    params = jax.device_put(run.state.params, jax.local_devices()[0])
    return out, params


def jax_sampling_benchmark(config: ml_collections.ConfigDict, opts: Options, params: Any) -> dict[str, Any]:
    """Throughput of ``make_sampler``'s DDIM loop (one compiled ``scan``) on one device."""
    config = with_options(config, opts)
    model = train_lib.build_model(config)
    sampler = make_sampler(config, model=model)
    key = jax.random.key(2)
    start = time.perf_counter()
    compiled = sampler.compile(params, key, compiler_options=_compiler_options(opts))
    compile_s = time.perf_counter() - start
    run = lambda: compiled(params, key)
    images = jax.block_until_ready(run())  # warm-up
    seconds, windows, _ = _best_window(run, opts.sample_iters, opts.repeats)

    s, ch = config.data.image_size, config.data.channels
    x = jnp.zeros((opts.sample_batch, s, s, ch), jnp.float32)
    t = jnp.zeros((opts.sample_batch,), jnp.int32)
    counting_model = train_lib.build_model(_counting_config(config))
    forward = jax.jit(lambda p, x, t: counting_model.apply({"params": p}, x, t))
    forward_flops = _flops(forward.lower(params, x, t))
    flops_per_image = forward_flops * opts.sample_steps / opts.sample_batch
    images_per_sec = opts.sample_batch / seconds
    return {
        "images_per_sec": images_per_sec,
        "loop_seconds": seconds,
        "loop_seconds_windows": windows,
        "compile_seconds": compile_s,
        "flops_per_image": flops_per_image,
        **_rates(flops_per_image, images_per_sec, jax.local_devices()[0].device_kind, opts.dtype),
        "compiled_bytes": _compiled_bytes(compiled.executable),
        "peak_bytes_in_use": _peak_bytes_in_use(),
        "images_finite": bool(np.isfinite(np.asarray(images)).all()),
    }


# ---------------------------------------------------------------------------------------------
# The PyTorch peer: diffusers' UNet2DModel.
# ---------------------------------------------------------------------------------------------


def peer_unet_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``UNet2DModel`` arguments closest to the ``UNet`` of ``config``.

    Same widths (``block_out_channels = hidden_dims``), two ResNets per down level, GroupNorm
    groups, SiLU, time embedding (sinusoid with ``i / (half - 1)`` frequencies, sines first,
    MLP of width 4 d_0), attention in the down level of width ``d_{L-2}``, the middle and the
    full-resolution up level. Unavoidable differences: diffusers downsamples after every level
    but the last (one halving more: our last transition keeps the resolution), has 3 ResNets per
    up level, strided-conv downsampling instead of space-to-depth, and attention as wide as the
    level (heads of ``min(head_dim, d_0)`` channels) instead of a fixed heads x head_dim.
    """
    dims = tuple(config.model.hidden_dims)
    n = len(dims)
    down = ["AttnDownBlock2D" if i == n - 2 else "DownBlock2D" for i in range(n)]
    up = ["AttnUpBlock2D" if i == n - 1 else "UpBlock2D" for i in range(n)]
    return {
        "sample_size": config.data.image_size,
        "in_channels": config.data.channels,
        "out_channels": config.data.channels,
        "block_out_channels": dims,
        "down_block_types": tuple(down),
        "up_block_types": tuple(up),
        "layers_per_block": 2,
        "norm_num_groups": config.model.norm_groups,
        "attention_head_dim": min(config.model.head_dim, dims[0]),
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "act_fn": "silu",
    }


def book_unet_torch(model: Any) -> Any:
    """The book's PyTorch U-Net (ch. 15) for a :class:`jaxdiff.models.UNet`'s settings, NCHW.

    The same architecture and module names as the book's code, so
    :func:`jaxdiff.models.unet_params_to_torch` weights load into it with ``strict=True`` and it
    computes the same function as our ``UNet`` (checked in tests/test_benchmark.py): the
    exact-architecture peer (``--peer=book``; the project's CPU comparison). Unconditional only.
    Call as ``net(x [B, C, H, W], t [B]) -> eps``.
    """
    import einops
    import einops.layers.torch as et
    import torch
    from torch import nn as tnn
    from torch.nn import functional as F

    dims = tuple(model.hidden_dims)
    last = len(dims) - 2
    stages = model.resolved_attention_stages
    temb_dim = model.resolved_time_emb_dim
    emb = 4 * temb_dim
    groups, heads, head_dim = model.norm_groups, model.heads, model.head_dim

    class ResidualBlock(tnn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.time_emb_proj = tnn.Sequential(tnn.SiLU(), tnn.Linear(emb, cout))
            self.residual_conv = tnn.Conv2d(cin, cout, 1) if cin != cout else None
            self.conv1, self.conv2 = tnn.Conv2d(cin, cout, 3, padding=1), tnn.Conv2d(cout, cout, 3, padding=1)
            self.norm1, self.norm2 = tnn.GroupNorm(groups, cout), tnn.GroupNorm(groups, cout)

        def forward(self, x, temb):
            h = F.silu(self.norm1(self.conv1(x)))
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
            h = F.silu(self.norm2(self.conv2(h)))
            return h + (self.residual_conv(x) if self.residual_conv is not None else x)

    class LayerNorm(tnn.Module):  # over channels, gain only, biased variance
        def __init__(self, c):
            super().__init__()
            self.g = tnn.Parameter(torch.ones(1, c, 1, 1))

        def forward(self, x):
            var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
            return (x - mean) * (var + 1e-5).rsqrt() * self.g

    class Attention(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.to_qkv = tnn.Conv2d(c, 3 * heads * head_dim, 1, bias=False)
            self.to_out = tnn.Conv2d(heads * head_dim, c, 1)

        def forward(self, x):
            hh, ww = x.shape[2:]
            q, k, v = (einops.rearrange(a, "b (n d) x y -> b n (x y) d", n=heads)
                       for a in self.to_qkv(x).chunk(3, dim=1))
            out = F.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5)
            return self.to_out(einops.rearrange(out, "b n (x y) d -> b (n d) x y", x=hh, y=ww))

    class PreNorm(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.norm, self.fn = LayerNorm(c), Attention(c)

        def forward(self, x):
            return self.fn(self.norm(x))

    class Residual(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.fn = PreNorm(c)

        def forward(self, x):
            return x + self.fn(x)

    def maybe_attn(i, c):
        return Residual(c) if i in stages else tnn.Identity()

    class BookUNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.time_embedding = tnn.Sequential(tnn.Linear(temb_dim, emb), tnn.SiLU(), tnn.Linear(emb, emb))
            self.init_conv = tnn.Conv2d(model.in_channels, dims[0], 3, padding=1)
            self.down_blocks = tnn.ModuleList([
                tnn.ModuleList([
                    ResidualBlock(dims[i], dims[i]), ResidualBlock(dims[i], dims[i]), maybe_attn(i, dims[i]),
                    tnn.Sequential(et.Rearrange("b c (h p1) (w p2) -> b (c p1 p2) h w", p1=2, p2=2),
                                   tnn.Conv2d(4 * dims[i], dims[i + 1], 1))
                    if i < last else tnn.Conv2d(dims[i], dims[i + 1], 3, padding=1),
                ]) for i in range(len(dims) - 1)
            ])
            self.mid_block1 = ResidualBlock(dims[-1], dims[-1])
            self.mid_attn = Residual(dims[-1])
            self.mid_block2 = ResidualBlock(dims[-1], dims[-1])
            up = []
            for j in range(len(dims) - 1):
                c, s = dims[-1 - j], dims[-2 - j]
                up.append(tnn.ModuleList([
                    ResidualBlock(c + s, c), ResidualBlock(c + s, c), maybe_attn(j, c),
                    tnn.Sequential(tnn.Upsample(scale_factor=2, mode="nearest"), tnn.Conv2d(c, s, 3, padding=1))
                    if j < last else tnn.Conv2d(c, s, 3, padding=1),
                ]))
            self.up_blocks = tnn.ModuleList(up)
            self.out_block = ResidualBlock(2 * dims[0], dims[0])
            out_channels = model.out_channels or model.in_channels
            self.conv_out = tnn.Conv2d(dims[0], out_channels, 1)

        def forward(self, x, t):
            t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
            half = temb_dim // 2
            freqs = torch.exp(torch.arange(half, device=x.device) * (-math.log(10000.0) / (half - 1)))
            args = t[:, None] * freqs[None, :]
            temb = self.time_embedding(torch.cat([args.sin(), args.cos()], dim=-1))
            h = r = self.init_conv(x)
            skips = []
            for res0, res1, attn, down in self.down_blocks:
                h = res0(h, temb)
                skips.append(h)
                h = attn(res1(h, temb))
                skips.append(h)
                h = down(h)
            h = self.mid_block2(self.mid_attn(self.mid_block1(h, temb)), temb)
            for res0, res1, attn, up in self.up_blocks:
                h = res0(torch.cat([h, skips.pop()], dim=1), temb)
                h = res1(torch.cat([h, skips.pop()], dim=1), temb)
                h = up(attn(h))
            return self.conv_out(self.out_block(torch.cat([h, r], dim=1), temb))

    return BookUNet()


PEERS = ("diffusers", "book")


def build_peer(config: ml_collections.ConfigDict, peer: str) -> Any:
    """The PyTorch peer network: ``(x [B, C, H, W], t [B]) -> eps`` tensor."""
    if peer == "book":
        return book_unet_torch(train_lib.build_model(config))
    if peer == "diffusers":
        from diffusers import UNet2DModel

        net = UNet2DModel(**peer_unet_kwargs(config))
        return _SampleOutput(net)
    raise ValueError(f"peer={peer!r} is not one of {PEERS}.")


def _SampleOutput(net: Any) -> Any:
    """Wraps a diffusers model so that it returns the tensor, not ``UNet2DOutput``."""
    import torch

    class Unwrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            return self.net(x, t).sample

    return Unwrap()


def _torch_device() -> str:
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _torch_sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def choose_torch_threads(step: Callable[[], Any], opts: Options, device: str) -> dict[str, float]:
    """Sets torch's intra-op thread count: ``opts.torch_threads``, or on CPU the faster of
    torch's default and 1 thread (timed over 2 steps each).

    On a CPU shared with other processes, OpenMP's barriers make multi-threaded eager PyTorch
    collapse when a thread is descheduled (measured: 0.03 s per step on 1 thread, 13 s on 2,
    at load average 9 on 2 cores); the peer gets its best setting. Returns the probe times.
    """
    import torch

    if opts.torch_threads:
        torch.set_num_threads(opts.torch_threads)
        return {}
    default = torch.get_num_threads()
    if device != "cpu" or default == 1:
        return {}
    probe = {}
    for threads in (1, default):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        step()  # warm-up at this thread count
        if threads != 1 and time.perf_counter() - start > 5 * probe[1]:
            probe[threads] = time.perf_counter() - start  # collapsed: do not wait for more
            break
        start = time.perf_counter()
        step()
        step()
        probe[threads] = (time.perf_counter() - start) / 2
    torch.set_num_threads(min(probe, key=probe.get))
    return {str(k): v for k, v in probe.items()}


def peer_train_step(config: ml_collections.ConfigDict, opts: Options) -> tuple[Callable[[], Any], Any]:
    """``(step, model)``: one eager PyTorch train step of the ``opts.peer`` network (forward +
    backward + AdamW with the config's settings, L1 on eps of noised images) per ``step()``."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDIMScheduler

    device = _torch_device()
    torch.manual_seed(0)
    model = build_peer(with_options(config, opts), opts.peer).to(device).train()
    o = config.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2),
                            eps=o.eps, weight_decay=o.weight_decay)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    s, ch, b = config.data.image_size, config.data.channels, opts.train_batch
    x0 = torch.rand(b, ch, s, s, device=device) * 2 - 1
    autocast = opts.dtype in ("bfloat16", "float16")

    def step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (b,), device=device)
        x_t = scheduler.add_noise(x0, noise, t)
        with torch.autocast(device, dtype=getattr(torch, opts.dtype), enabled=autocast):
            pred = model(x_t, t)
        loss = F.l1_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step, model


def peer_train_benchmark(config: ml_collections.ConfigDict, opts: Options) -> tuple[dict[str, Any], Any]:
    """Eager PyTorch: ``UNet2DModel`` forward + backward + AdamW step, L1 on eps."""
    import torch

    device = _torch_device()
    step, model = peer_train_step(config, opts)
    num_params = sum(p.numel() for p in model.parameters())
    b = opts.train_batch
    flops_per_image = _torch_flops(step) / b  # also a warm-up step
    probe = choose_torch_threads(step, opts, device)
    step()
    _torch_sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync = lambda _: _torch_sync(device)  # noqa: E731
    iters = _iters_for(opts, step, sync=sync)
    seconds, windows, loss = _best_window(step, iters, opts.repeats, sync=sync)
    images_per_sec = b / seconds
    kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {
        "images_per_sec": images_per_sec,
        "step_seconds": seconds,
        "step_seconds_windows": windows,
        "steps_per_window": iters,
        "flops_per_image": flops_per_image,
        **_rates(flops_per_image, images_per_sec, kind, opts.dtype),
        "peak_bytes_in_use": int(torch.cuda.max_memory_allocated()) if device == "cuda" else None,
        "num_params": num_params,
        "final_loss": float(loss.detach()),
        "torch_threads": torch.get_num_threads(),
        "torch_threads_probe_seconds": probe,
        "device": device,
    }, model


def peer_sampling_benchmark(config: ml_collections.ConfigDict, opts: Options, model: Any) -> dict[str, Any]:
    """Eager PyTorch: a ``DDIMScheduler`` loop (eta 0) over ``UNet2DModel``, inference mode."""
    import torch
    from diffusers import DDIMScheduler

    device = _torch_device()
    model = model.eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              clip_sample=bool(config.sample.get("clip_sample", True)))
    s, ch, b = config.data.image_size, config.data.channels, opts.sample_batch
    autocast = opts.dtype in ("bfloat16", "float16")
    generator = torch.Generator(device).manual_seed(0)

    def sample():
        scheduler.set_timesteps(opts.sample_steps)
        x = torch.randn(b, ch, s, s, device=device, generator=generator)
        with torch.inference_mode(), torch.autocast(device, dtype=getattr(torch, opts.dtype), enabled=autocast):
            for t in scheduler.timesteps:
                eps = model(x, t).float()
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        return ((x + 1) / 2).clamp(0, 1)

    with torch.inference_mode():
        forward_flops = _torch_flops(lambda: model(torch.zeros(b, ch, s, s, device=device),
                                                   torch.zeros(b, dtype=torch.long, device=device)))
    images = sample()  # warm-up
    _torch_sync(device)
    seconds, windows, _ = _best_window(sample, opts.sample_iters, opts.repeats,
                                       sync=lambda _: _torch_sync(device))
    flops_per_image = forward_flops * opts.sample_steps / b
    images_per_sec = b / seconds
    kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {
        "images_per_sec": images_per_sec,
        "loop_seconds": seconds,
        "loop_seconds_windows": windows,
        "flops_per_image": flops_per_image,
        **_rates(flops_per_image, images_per_sec, kind, opts.dtype),
        "peak_bytes_in_use": int(torch.cuda.max_memory_allocated()) if device == "cuda" else None,
        "images_finite": bool(torch.isfinite(images).all()),
    }


# ---------------------------------------------------------------------------------------------
# Runs, sweep, report.
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """The host and accelerator: CPU model, device kind and count, versions, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device_kind": jax.local_devices()[0].device_kind,
        "num_local_devices": jax.local_device_count(),
        "jax": jax.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def run_benchmark(config: ml_collections.ConfigDict, opts: Options, *, peer: bool = True,
                  sampling: bool = True) -> dict[str, Any]:
    """One benchmark configuration: jaxdiff (and the peer), with jaxdiff/peer ratios."""
    train, params = jax_train_benchmark(config, opts)
    result: dict[str, Any] = {"options": dataclasses.asdict(opts), "jaxdiff": {"train": train}}
    if sampling:
        result["jaxdiff"]["sampling"] = jax_sampling_benchmark(config, opts, params)
    if peer:
        add_peer(result, config, opts, sampling=sampling)
    return result


def add_peer(result: dict[str, Any], config: ml_collections.ConfigDict, opts: Options, *,
             sampling: bool = True) -> dict[str, Any]:
    """Adds the PyTorch peer's numbers and the jaxdiff/peer ratios to ``result`` (in place)."""
    if jax.default_backend() != "cpu" and _torch_device() == "cpu":
        result["peer_skipped"] = "torch has no CUDA here; the peer must run on the same device"
        return result
    peer_train, torch_model = peer_train_benchmark(config, opts)
    result["peer"] = {
        "model": "diffusers.UNet2DModel" if opts.peer == "diffusers" else "book UNet (PyTorch, same architecture)",
        "config": peer_unet_kwargs(config) if opts.peer == "diffusers" else "as jaxdiff",
        "train": peer_train,
    }
    if sampling:
        result["peer"]["sampling"] = peer_sampling_benchmark(config, opts, torch_model)
    result["ratios"] = {
        f"{part}_{metric}": result["jaxdiff"][part][metric] / result["peer"][part][metric]
        for part in ("train", "sampling") if part in result["peer"] and part in result["jaxdiff"]
        for metric in ("images_per_sec", "tflops")
    }
    return result


@contextlib.contextmanager
def _without_attention_kernels():
    """Inside: both sides' attention kernels return ``v`` unchanged (projections, norms and the
    residual stay). Models must be built and traced inside. Only for :func:`attention_share`."""
    from jaxdiff.models import unet as unet_lib

    saved = unet_lib.heads_major_attention, unet_lib.multihead_attention
    unet_lib.heads_major_attention = lambda q, k, v, scale=1.0: v * 1.0
    unet_lib.multihead_attention = lambda q, k, v, **kwargs: v * 1.0
    torch_f = None
    try:
        import torch.nn.functional as torch_f

        saved_torch = torch_f.scaled_dot_product_attention
        torch_f.scaled_dot_product_attention = lambda q, k, v, **kwargs: v * 1.0
    except ImportError:
        pass
    try:
        yield
    finally:
        unet_lib.heads_major_attention, unet_lib.multihead_attention = saved
        if torch_f is not None:
            torch_f.scaled_dot_product_attention = saved_torch


def attention_share(config: ml_collections.ConfigDict, opts: Options, *, rounds: int = 5,
                    peer: bool = True) -> dict[str, dict[str, float]]:
    """Train-step milliseconds with and without the attention kernels, for jaxdiff and (with
    ``peer``) the book's PyTorch U-Net, interleaved in one process: ``{side: {"step",
    "without_attention", "attention"}}``, each the minimum over ``rounds`` windows of
    ``opts.train_iters`` steps. Says how much of a step is attention and how much is the rest,
    on each side (README, Performance)."""

    def jax_step():
        setup = train_setup(config, opts)
        return setup.stepper(setup.compile(opts)), jax.block_until_ready

    def torch_step():
        step, _ = peer_train_step(config, dataclasses.replace(opts, peer="book"))
        return step, lambda _: _torch_sync(_torch_device())

    builders = {"jaxdiff": jax_step, **({"book_pytorch": torch_step} if peer else {})}
    runs = {}
    for side, build in builders.items():
        runs[(side, "step")] = build()
        with _without_attention_kernels():
            runs[(side, "without_attention")] = build()

    def window(key, iters):
        # PyTorch looks its kernel up at each call: the ablated model runs inside the patch too.
        patched = key == ("book_pytorch", "without_attention")
        with _without_attention_kernels() if patched else contextlib.nullcontext():
            run, sync = runs[key]
            return _best_window(run, iters, 1, sync=sync)[0]

    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for key in runs:
        window(key, 2)  # warm-up
    for _ in range(rounds):
        for key in runs:
            times[key].append(window(key, opts.train_iters))
    out: dict[str, dict[str, float]] = {}
    for side in builders:
        step, rest = min(times[(side, "step")]) * 1e3, min(times[(side, "without_attention")]) * 1e3
        out[side] = {"step": step, "without_attention": rest, "attention": step - rest}
    return out


def sweep_variants(base: Options) -> list[Options]:
    """Each speed option changed alone from ``base``."""
    gpu = jax.default_backend() != "cpu"
    variants = [
        dataclasses.replace(base, dtype="bfloat16" if base.dtype == "float32" else "float32"),
        dataclasses.replace(base, donate=not base.donate),
        dataclasses.replace(base, remat=not base.remat),
        dataclasses.replace(base, train_batch=base.train_batch * 2, sample_batch=base.sample_batch * 2),
        dataclasses.replace(base, train_batch=max(base.train_batch // 2, jax.local_device_count()),
                            sample_batch=max(base.sample_batch // 2, 1)),
    ]
    attention = ("xla", "cudnn") if gpu else ("xla",)
    variants += [dataclasses.replace(base, attention_impl=a) for a in attention if a != base.attention_impl]
    if not gpu:
        resolved = train_lib.cpu_fusion_mode(base.cpu_fusion)
        variants += [dataclasses.replace(base, cpu_fusion=m) for m in train_lib.CPU_FUSION_MODES if m != resolved]
    return variants


def sweep(config: ml_collections.ConfigDict, base: Options, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measures ``base`` and each variant (jaxdiff only), then all helpful changes together.

    Batch-size changes are reported but left out of the combination (they change the job).
    Returns per-variant images/s for training and sampling and the best configuration.
    """
    log = functools.partial(print, flush=True) if log is None else log
    def measure(opts: Options) -> dict[str, Any]:
        try:
            r = run_benchmark(config, opts, peer=False)
            return {"changed": opts.changed(base), "train_images_per_sec": r["jaxdiff"]["train"]["images_per_sec"],
                    "sampling_images_per_sec": r["jaxdiff"]["sampling"]["images_per_sec"],
                    "train_compile_seconds": r["jaxdiff"]["train"]["compile_seconds"]}
        except Exception as e:  # noqa: BLE001 -- an option unsupported here (e.g. cudnn) is a result too
            return {"changed": opts.changed(base), "error": f"{type(e).__name__}: {e}"[:300]}

    base_row = measure(base)
    log(f"sweep: base {_row_text(base_row)}")
    rows = []
    for opts in sweep_variants(base):
        row = measure(opts)
        rows.append(row)
        log(f"sweep: {row['changed']} {_row_text(row)}")
    best: dict[str, Any] = {}
    for part in ("train", "sampling"):
        metric = f"{part}_images_per_sec"
        helpful = {}
        for row in rows:
            batch_change = "train_batch" in row["changed"]
            if "error" not in row and not batch_change and row[metric] > base_row.get(metric, float("inf")):
                helpful.update(row["changed"])
        combined_row = base_row
        if helpful:
            combined = dataclasses.replace(base, **helpful)
            combined_row = measure(combined) if len(helpful) > 1 else next(
                r for r in rows if r["changed"] == helpful)
            log(f"sweep: {part} best-of {helpful} {_row_text(combined_row)}")
        candidates = [base_row, combined_row] + [r for r in rows if "train_batch" not in r["changed"]]
        winner = max((r for r in candidates if "error" not in r), key=lambda r: r[metric])
        best[part] = {"changed": winner["changed"], "images_per_sec": winner[metric],
                      "speedup_over_base": winner[metric] / base_row[metric]}
    return {"base": base_row, "variants": rows, "best": best}


def _row_text(row: Mapping[str, Any]) -> str:
    if "error" in row:
        return f"failed: {row['error']}"
    return (f"train {row['train_images_per_sec']:.1f} img/s, sampling {row['sampling_images_per_sec']:.2f} img/s, "
            f"compile {row['train_compile_seconds']:.1f} s")


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if unit == "B":
            return f"{value / 2**20:.0f} MiB"
        if unit == "%":
            return f"{100 * value:.2f}%"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and unit == "B":
        return f"{value / 2**20:.0f} MiB"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_table(result: Mapping[str, Any]) -> str:
    """A human-readable table of :func:`run_benchmark`'s result (plus the sweep, if any)."""
    m = result["machine"]
    o = result["options"]
    torch_version = f", torch {m['torch']}" if "torch" in m else ""
    lines = [
        (f"machine: {m['cpu']} ({m['cpu_count']} CPUs), backend {m['backend']}, "
         f"{m['num_local_devices']} x {m['device_kind']}; jax {m['jax']}{torch_version}; "
         f"load average {m.get('load_average')}"),
        (f"model: {result['model']}, {result['image_size']}x{result['image_size']}x{result['channels']}; "
         f"train batch {o['train_batch']}, DDIM-{o['sample_steps']} batch {o['sample_batch']}; dtype {o['dtype']}, "
         f"donate {o['donate']}, attention {o['attention_impl'] or 'by backend'}, remat {o['remat']}, "
         f"cpu fusion {o['cpu_fusion']}"
         + (f" ({train_lib.cpu_fusion_mode(o['cpu_fusion'])})" if m["backend"] == "cpu" else "")),
    ]
    jt = result["jaxdiff"]["train"]
    peer = result.get("peer")
    lines.append(f"parameters: jaxdiff UNet {jt['num_params']:,}"
                 + (f"; peer {peer['model']} {peer['train']['num_params']:,} {peer['config']}" if peer else ""))
    if peer:
        lines.append(f"peer: eager PyTorch on {peer['train']['device']}, {peer['train']['torch_threads']} "
                     f"intra-op thread(s) (probe s/step by threads: {peer['train']['torch_threads_probe_seconds']})")
    rows = [("", "jaxdiff", "peer", "jaxdiff/peer")]
    for part, title in (("train", "train"), ("sampling", "DDIM")):
        if part not in result["jaxdiff"]:
            continue
        j = result["jaxdiff"][part]
        p = peer[part] if peer and part in peer else {}
        for key, label, unit in (
            ("images_per_sec", "images/s", ""),
            ("compile_seconds", "compile s", ""),
            ("flops_per_image", "GFLOP/image", "G"),
            ("tflops", "achieved TFLOP/s", ""),
            ("mfu", "MFU", "%"),
            ("compiled_bytes", "compiled memory", "B"),
            ("peak_bytes_in_use", "peak memory in use", "B"),
        ):
            jv, pv = j.get(key), p.get(key)
            if unit == "G":
                jv = None if jv is None else jv / 1e9
                pv = None if pv is None else pv / 1e9
            if jv is None and pv is None:
                continue
            ratio = jv / pv if isinstance(jv, (int, float)) and isinstance(pv, (int, float)) and pv else None
            rows.append((f"{title} {label}", _fmt(jv, unit), _fmt(pv, unit), _fmt(ratio) if ratio else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    if "sweep" in result:
        lines.append("sweep (jaxdiff only; each option alone, then the helpful ones together):")
        lines.append(f"  base: {_row_text(result['sweep']['base'])}")
        lines += [f"  {r['changed']}: {_row_text(r)}" for r in result["sweep"]["variants"]]
        for part, b in result["sweep"]["best"].items():
            lines.append(f"  best for {part}: {b['changed'] or 'the base options'} -> {b['images_per_sec']:.2f} img/s "
                         f"(x{b['speedup_over_base']:.2f})")
    return "\n".join(lines)


def benchmark(config: ml_collections.ConfigDict, opts: Options, *, model_name: str, peer: bool = True,
              do_sweep: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole report: machine, the base run with its peer, and optionally the sweep."""
    result = {"machine": machine_info(), "model": model_name, "image_size": config.data.image_size,
              "channels": config.data.channels, "hidden_dims": list(config.model.hidden_dims)}
    result.update(run_benchmark(config, opts, peer=peer))
    if do_sweep:
        result["sweep"] = sweep(config, opts, log=log)
    result["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return result


# ---------------------------------------------------------------------------------------------
# Text-to-image (--task=text_to_image): UNet2DCondition and the whole pipeline vs diffusers.
# ---------------------------------------------------------------------------------------------

# Stable Diffusion 1.5's U-Net, VAE and text encoder (configs as on the hub), for random-weight
# full-size runs on an accelerator (``--t2i_size=sd15``).
SD15_CONFIGS: dict[str, dict[str, Any]] = {
    "unet": {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
             "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2},
    "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "sample_size": 512},
    "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                     "num_hidden_layers": 12, "hidden_act": "quick_gelu", "max_position_embeddings": 77},
    "scheduler": {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1},
}


def random_sd15_pipeline(dtype: Any) -> Any:
    """A Stable Diffusion 1.5-sized :class:`jaxdiff.text_to_image.TextToImage` with random weights
    (initialised by JAX: no folder, no PyTorch)."""
    from jaxdiff.clip import CLIPTextEncoder, Tokenizer
    from jaxdiff.models import AutoencoderKL, UNet2DCondition
    from jaxdiff.text_to_image import TextToImage, pipeline_scheduler_config

    unet = UNet2DCondition.from_config(SD15_CONFIGS["unet"], dtype=dtype, param_dtype=dtype)
    vae = AutoencoderKL.from_config(SD15_CONFIGS["vae"], dtype=dtype, param_dtype=dtype)
    text = CLIPTextEncoder.from_config(SD15_CONFIGS["text_encoder"], dtype=dtype, param_dtype=dtype)
    keys = jax.random.split(jax.random.key(0), 3)
    params = {
        "unet": jax.jit(unet.init)(keys[0], jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 77, 768)))["params"],
        "vae": jax.jit(vae.init)(keys[1], jnp.zeros((1, 8, 8, 3)))["params"],
        "text_encoder": jax.jit(text.init)(keys[2], jnp.zeros((1, 77), jnp.int32))["params"],
    }
    return TextToImage(text_encoder=text, unet=unet, vae=vae, tokenizer=Tokenizer(pad_token_id=49407),
                       scheduler_config=pipeline_scheduler_config(SD15_CONFIGS["scheduler"]), params=params,
                       height=512, width=512, sampler="PNDMScheduler")


def text_to_image_benchmark(size: str = "small", *, batch: int = 1, steps: int = 30, guidance_scale: float = 7.5,
                            dtype: str = "float32", unet_iters: int = 5, repeats: int = 3, peer: bool = True,
                            torch_threads: int = 0, pipeline: bool = True) -> dict[str, Any]:
    """Seconds and images/s of the U-Net forward (the CFG batch, ``2 * batch``) and of the whole
    pipeline (``steps`` sampler steps with guidance, text encoding and VAE decoding included),
    jaxdiff and diffusers' PyTorch ``StableDiffusionPipeline`` on the same weights and device.

    ``size``: a key of :data:`jaxdiff.text_to_image.RANDOM_PIPELINE_SIZES` (a random SD 1.x-style
    pipeline written by diffusers, so both sides load the same folder), or ``"sd15"`` (Stable
    Diffusion 1.5's sizes at 512x512, random weights initialised by JAX; jaxdiff only).
    """
    import tempfile

    from jaxdiff import pretrained
    from jaxdiff.text_to_image import write_random_pipeline

    jdtype = getattr(jnp, dtype)
    result: dict[str, Any] = {"machine": machine_info(), "size": size, "batch": batch, "steps": steps,
                              "guidance_scale": guidance_scale, "dtype": dtype}
    torch_pipe = None
    with tempfile.TemporaryDirectory() as folder:
        if size == "sd15":
            pipe = random_sd15_pipeline(jdtype)
        else:
            written = write_random_pipeline(folder, "sd1", size)
            torch_pipe = written if peer else None
            pipe = pretrained.load_text_to_image(folder, dtype=jdtype)
    result["image_size"] = [pipe.height, pipe.width]
    result["num_params"] = {k: int(sum(p.size for p in jax.tree.leaves(v))) for k, v in pipe.params.items()}

    # The U-Net forward on the batch a guided step feeds it.
    rng = np.random.default_rng(0)
    latent = pipe.latent_shape(2 * batch)
    x = rng.standard_normal(latent).astype(np.float32)
    width = pipe.text_encoder.hidden_size
    context = rng.standard_normal((2 * batch, pipe.tokenizer.context_length, width)).astype(np.float32)
    t = np.full((2 * batch,), 500, np.int32)
    forward = jax.jit(pipe.unet.apply)
    start = time.perf_counter()
    compiled = forward.lower({"params": pipe.params["unet"]}, x, t, context).compile()
    unet_compile = time.perf_counter() - start
    run = lambda: compiled({"params": pipe.params["unet"]}, x, t, context)  # noqa: E731
    jax.block_until_ready(run())
    seconds, windows, out = _best_window(run, unet_iters, repeats)
    jax_res: dict[str, Any] = {"unet": {"seconds": seconds, "windows": windows, "compile_seconds": unet_compile,
                                        "images_per_sec": 2 * batch / seconds,
                                        "finite": bool(np.isfinite(np.asarray(out)).all())}}
    if pipeline:
        ids = pipe.tokenize(["a photo of an astronaut riding a horse"] * batch)
        call = lambda: pipe(pipe.params, jax.random.key(0), ids, num_steps=steps, guidance_scale=guidance_scale)  # noqa: E731
        start = time.perf_counter()
        images = jax.block_until_ready(call())  # compiles
        first = time.perf_counter() - start
        seconds, windows, images = _best_window(call, 1, repeats)
        jax_res["pipeline"] = {"seconds": seconds, "windows": windows, "first_call_seconds": first,
                               "images_per_sec": batch / seconds, "finite": bool(np.isfinite(np.asarray(images)).all())}
    result["jaxdiff"] = jax_res

    if torch_pipe is not None:
        import torch

        device = _torch_device()
        torch_pipe = torch_pipe.to(device)
        xt, tt, ct = (torch.from_numpy(np.ascontiguousarray(a)).to(device)
                      for a in (x.transpose(0, 3, 1, 2), t.astype(np.int64), context))

        def torch_forward():
            with torch.inference_mode():
                return torch_pipe.unet(xt, tt, ct).sample

        probe = choose_torch_threads(torch_forward, Options(torch_threads=torch_threads), device)
        torch_forward()
        _torch_sync(device)
        seconds, windows, _ = _best_window(torch_forward, unet_iters, repeats, sync=lambda _: _torch_sync(device))
        peer_res: dict[str, Any] = {"unet": {"seconds": seconds, "windows": windows, "images_per_sec": 2 * batch / seconds},
                                    "torch_threads": torch.get_num_threads(), "torch_threads_probe_seconds": probe,
                                    "device": device}
        if pipeline:
            prompts = ["a photo of an astronaut riding a horse"] * batch

            def torch_call():
                with torch.inference_mode():
                    return torch_pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale,
                                      output_type="np", generator=torch.Generator(device).manual_seed(0)).images

            torch_call()
            _torch_sync(device)
            seconds, windows, _ = _best_window(torch_call, 1, repeats, sync=lambda _: _torch_sync(device))
            peer_res["pipeline"] = {"seconds": seconds, "windows": windows, "images_per_sec": batch / seconds}
        result["peer"] = peer_res
        result["ratios"] = {part: jax_res[part]["images_per_sec"] / peer_res[part]["images_per_sec"]
                            for part in ("unet", "pipeline") if part in peer_res and part in jax_res}
    result["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return result


def format_text_to_image_table(result: Mapping[str, Any]) -> str:
    """A human-readable table of :func:`text_to_image_benchmark`'s result."""
    m = result["machine"]
    lines = [
        (f"machine: {m['cpu']} ({m['cpu_count']} CPUs), backend {m['backend']}, {m['num_local_devices']} x "
         f"{m['device_kind']}; jax {m['jax']}" + (f", torch {m['torch']}" if "torch" in m else "")
         + f"; load average {m.get('load_average')} -> {m.get('load_average_end')}"),
        (f"text-to-image '{result['size']}': {result['image_size'][0]}x{result['image_size'][1]} images, batch "
         f"{result['batch']} (U-Net batch {2 * result['batch']}), {result['steps']} steps, guidance "
         f"{result['guidance_scale']}, dtype {result['dtype']}; parameters {result['num_params']}"),
    ]
    peer = result.get("peer")
    if peer:
        lines.append(f"peer: diffusers StableDiffusionPipeline, eager PyTorch on {peer['device']}, "
                     f"{peer['torch_threads']} thread(s)")
    rows = [("", "jaxdiff", "diffusers", "jaxdiff/diffusers")]
    for part, label in (("unet", "U-Net forward images/s"), ("pipeline", "pipeline images/s")):
        if part not in result["jaxdiff"]:
            continue
        jv = result["jaxdiff"][part]["images_per_sec"]
        pv = peer[part]["images_per_sec"] if peer and part in peer else None
        ratio = result.get("ratios", {}).get(part)
        rows.append((label, _fmt(jv), _fmt(pv), _fmt(ratio) if ratio else "-"))
    j = result["jaxdiff"]
    rows.append(("U-Net compile s", _fmt(j["unet"]["compile_seconds"]), "-", "-"))
    if "pipeline" in j:
        rows.append(("pipeline first call s", _fmt(j["pipeline"]["first_call_seconds"]), "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def _main(argv) -> None:  # pragma: no cover - exercised by hand; tests call the functions.
    del argv
    from absl import flags

    f = flags.FLAGS
    gpu = jax.default_backend() != "cpu"
    if f.task == "music":  # scripts/music_benchmark.py: generation and training vs the book's PyTorch code
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import music_benchmark

        result = music_benchmark.music_benchmark(f.music_size, prompt_len=f.music_prompt_len, num_tokens=f.music_tokens,
                                                 rounds=f.repeats, torch_threads=f.torch_threads)  # fmt: skip
        print(music_benchmark.format_table(result))
        if f.json:
            with open(f.json, "w") as fh:
                json.dump(result, fh, indent=1, default=str)
            print(f"wrote {f.json}")
        return
    if f.task == "text_to_image":
        size = f.t2i_size or ("sd15" if gpu else "small")
        result = text_to_image_benchmark(size, batch=f.t2i_batch, steps=f.t2i_steps, dtype=f.dtype, repeats=f.repeats,
                                         peer=f.peer and size != "sd15", torch_threads=f.torch_threads,
                                         pipeline=f.t2i_pipeline)
        print(format_text_to_image_table(result))
        if f.json:
            with open(f.json, "w") as fh:
                json.dump(result, fh, indent=1, default=str)
            print(f"wrote {f.json}")
        return
    if f.config is not None:
        config, name = f.config, "config"
    else:
        name = f.model or ("book" if gpu else "small")
        config = model_config(name)
    opts = Options(
        dtype=f.dtype, donate=f.donate, attention_impl=f.attention_impl, remat=f.remat,
        train_batch=f.train_batch or (config.train.batch_size if f.config is not None else 16 if gpu else 32),
        sample_batch=f.sample_batch or (config.sample.num_images if f.config is not None else 16),
        cpu_fusion=f.cpu_fusion, sample_steps=f.sample_steps, train_iters=f.train_iters or (20 if gpu else 10),
        sample_iters=f.sample_iters, repeats=f.repeats, torch_threads=f.torch_threads, peer=f.peer_model,
        window_seconds=f.window_seconds,
    )
    if f.attention_share:
        share = attention_share(config, opts, peer=f.peer)
        print("train step ms (min of 5 windows): whole step / without the attention kernel / attention")
        for side, ms in share.items():
            print(f"{side:14s} {ms['step']:8.1f} {ms['without_attention']:8.1f} {ms['attention']:8.1f}")
        return
    result = benchmark(config, opts, model_name=name, peer=f.peer, do_sweep=f.sweep)
    print(format_table(result))
    if f.json:
        with open(f.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
        print(f"wrote {f.json}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "A training config (e.g. configs/digits.py).", lock_config=False)
    flags.DEFINE_enum("model", None, list(MODELS), "A named model (default: small on CPU, book elsewhere).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Computation dtype.")
    flags.DEFINE_bool("donate", True, "Donate the train state to the step.")
    flags.DEFINE_enum("attention_impl", "", ["", "xla", "cudnn", "cpu_fast", "auto"], "UNet.attention_impl ('' by backend).")
    flags.DEFINE_bool("remat", False, "Rematerialise residual and attention blocks.")
    flags.DEFINE_integer("train_batch", None, "Training batch (default: the config's; else 32 on CPU, 16 elsewhere).")
    flags.DEFINE_integer("sample_batch", None, "DDIM batch (default: the config's sample.num_images; else 16).")
    flags.DEFINE_integer("sample_steps", 50, "DDIM steps.")
    flags.DEFINE_integer("train_iters", None, "Timed train steps per window (default 10 on CPU, 20 elsewhere).")
    flags.DEFINE_integer("sample_iters", 1, "Timed DDIM loops per window.")
    flags.DEFINE_float("window_seconds", 0.0, "If > 0, train steps per window fill about this many "
                       "seconds (overrides --train_iters).")
    flags.DEFINE_integer("repeats", 3, "Timing windows; the best is reported.")
    flags.DEFINE_enum("cpu_fusion", "auto", ["auto", *train_lib.CPU_FUSION_MODES],
                      "XLA:CPU library fusions (jaxdiff.train.cpu_fusion_mode).")
    flags.DEFINE_integer("torch_threads", 0, "Peer intra-op threads (0: the faster of torch's default and 1).")
    flags.DEFINE_enum("peer_model", "diffusers", list(PEERS), "diffusers: UNet2DModel as close as its blocks allow; "
                      "book: the exact same architecture written in PyTorch.")
    flags.DEFINE_bool("peer", True, "Also time the PyTorch/diffusers peer.")
    flags.DEFINE_bool("sweep", False, "Try each speed option and report the best configuration.")
    flags.DEFINE_bool("attention_share", False, "Only time train steps with and without the attention "
                      "kernels, jaxdiff and the book's PyTorch U-Net (README, Performance).")
    flags.DEFINE_string("json", None, "Write the full result as JSON here.")
    flags.DEFINE_enum("task", "unet", ["unet", "text_to_image", "music"], "unet: the U-Net benchmark above; "
                      "text_to_image: UNet2DCondition and the Stable Diffusion pipeline vs diffusers; music: the "
                      "music Transformer's generation and training vs the book's PyTorch code.")
    flags.DEFINE_enum("music_size", "default", ["tiny", "default", "book"], "music: the embedded default's model "
                      "(configs/music.py) or the book's 20.4M model.")
    flags.DEFINE_integer("music_prompt_len", 250, "music: prompt events before generation.")
    flags.DEFINE_integer("music_tokens", 1000, "music: new tokens generated per timed call.")
    flags.DEFINE_enum("t2i_size", None, ["tiny", "small", "sd15"], "text_to_image: random pipeline size (default: "
                      "small on CPU, Stable Diffusion 1.5's sizes elsewhere).")
    flags.DEFINE_integer("t2i_batch", 1, "text_to_image: images per prompt batch (the U-Net sees twice as many).")
    flags.DEFINE_integer("t2i_steps", 30, "text_to_image: sampler steps of the pipeline.")
    flags.DEFINE_bool("t2i_pipeline", True, "text_to_image: also time the whole pipeline (not only the U-Net).")
    app.run(_main)
