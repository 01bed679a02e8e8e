"""Time one CLIP-guided DDIM step (ViT-B-32 architecture, random weights) on the local device.

The denoiser is a cheap stand-in (``eps = sqrt(1 - abar_t) x_t``), so the numbers are the cost
CLIP guidance adds to each step: ``n_cuts`` crops through CLIP's image tower, forward and
backward. Parameters are passed to the jitted step as arguments (not closed over), which keeps
ViT-B-32's 151M weights out of the compiled program.

Usage::

    python scripts/profile_clip.py [--size 64] [--batch 1] [--n-cuts 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jaxdiff import guidance, samplers, schedules
from jaxdiff.clip import CLIP, clip_loss, tokenize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ViT-B-32")
    parser.add_argument("--size", type=int, default=64, help="image side (x0_pred is size^2)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--n-cuts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="DDIM steps per timed run")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    model = CLIP.from_config(args.config)
    text = tokenize(["a cat on the grass"], context_length=model.context_length)
    t0 = time.perf_counter()
    params = jax.jit(model.init)(
        jax.random.key(0), jnp.zeros((1, model.image_size, model.image_size, 3)), text
    )["params"]
    jax.block_until_ready(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"{args.config}: {n_params:,} parameters, jitted init {time.perf_counter() - t0:.1f} s")

    schedule = schedules.linear(1000)
    abar = jnp.asarray(schedule.alphas_cumprod)

    def eps_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        return jnp.sqrt(1.0 - abar[t])[:, None, None, None] * x

    @jax.jit
    def guided_sample(params, x_T, key):
        loss_fn = clip_loss(model, params, text, key=jax.random.fold_in(key, 1), n_cuts=args.n_cuts)
        guided = guidance.gradient_guidance(eps_fn, loss_fn, 10.0, schedule)
        return samplers.ddim_sample(guided, schedule, x_T, key, num_steps=args.steps)

    @jax.jit
    def plain_sample(x_T, key):
        return samplers.ddim_sample(eps_fn, schedule, x_T, key, num_steps=args.steps)

    x_T = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 3))
    key = jax.random.key(2)
    t0 = time.perf_counter()
    jax.block_until_ready(guided_sample(params, x_T, key))
    print(f"compile + first run ({args.steps} guided steps): {time.perf_counter() - t0:.1f} s")
    jax.block_until_ready(plain_sample(x_T, key))

    def per_step(fn, *a) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            best = min(best, (time.perf_counter() - t0) / args.steps)
        return best

    guided_s = per_step(guided_sample, params, x_T, key)
    plain_s = per_step(plain_sample, x_T, key)
    print(
        f"device={jax.devices()[0].device_kind} batch={args.batch} size={args.size} "
        f"n_cuts={args.n_cuts}: guided DDIM step {guided_s * 1e3:.0f} ms "
        f"(unguided stand-in step {plain_s * 1e3:.2f} ms)"
    )


if __name__ == "__main__":
    main()
