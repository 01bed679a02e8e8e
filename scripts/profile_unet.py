"""Forward+backward time and compiled peak memory of the book's U-Net, with and without remat.

Run:
  .venv/bin/python scripts/profile_unet.py                      # UNet() at batch 4, 64x64
  .venv/bin/python scripts/profile_unet.py --attention-chunk 1024  # chunked 64x64 attention
  .venv/bin/python scripts/profile_unet.py --hidden-dims 16,32,64,128 --size 16 --batch 32

Memory is XLA's static estimate for the compiled program (``memory_analysis()``): temporaries +
arguments + outputs. On CPU the program is compiled with jaxdiff's XLA:CPU library-fusion choice
(:func:`jaxdiff.train.cpu_fusion_mode`); ``--cpu-fusion`` overrides it. FLOPs are XLA's count,
in which a loop body counts once (the CPU attention kernel loops over chunks of heads).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import UNet
from jaxdiff.train import CPU_FUSION_MODES, cpu_compiler_options



def random_params(model: UNet, x: jax.Array, seed: int = 0) -> dict:
    """Fan-in scaled normal params drawn with numpy (no slow compile of ``model.init``)."""
    t = jnp.zeros(x.shape[:1], jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
        return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in))

    return jax.tree.map(draw, shapes)


def profile(model: UNet, batch: int, size: int, repeats: int, cpu_fusion: str, run: bool) -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, model.in_channels), np.float32))
    eps = jnp.asarray(rng.standard_normal(x.shape, np.float32))
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    params = random_params(model, x)

    def loss(params, x, t, eps):
        return jnp.mean(jnp.abs(model.apply({"params": params}, x, t) - eps))  # the book's L1

    step = jax.jit(jax.value_and_grad(loss), compiler_options=cpu_compiler_options(cpu_fusion))
    start = time.perf_counter()
    compiled = step.lower(params, x, t, eps).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    gib = 2.0**30
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    print(f"remat={model.remat}: compile {compile_s:.1f} s; memory: temp "
          f"{mem.temp_size_in_bytes / gib:.2f} GiB + arguments "
          f"{mem.argument_size_in_bytes / gib:.2f} GiB + outputs "
          f"{mem.output_size_in_bytes / gib:.2f} GiB = {total / gib:.2f} GiB; "
          f"XLA flops {flops / 1e9:.1f} GFLOP", flush=True)
    if not run:
        return
    jax.block_until_ready(compiled(params, x, t, eps))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x, t, eps))
        times.append(time.perf_counter() - start)
    best = min(times)
    print(f"remat={model.remat}: forward+backward {', '.join(f'{s:.2f}' for s in times)} s "
          f"(best {best:.2f} s, {batch / best:.2f} img/s, {flops / best / 1e9:.1f} GFLOP/s)",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-dims", default="128,256,512,1024")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cpu-fusion", default="auto", choices=["auto", *CPU_FUSION_MODES],
                        help="XLA:CPU library fusions (jaxdiff.train.cpu_fusion_mode)")
    parser.add_argument("--no-run", action="store_true", help="memory only, no timing")
    parser.add_argument("--attention-chunk", type=int, default=None,
                        help="UNet(attention_query_chunk=...): query chunk size of the attention")
    parser.add_argument("--no-remat-run", action="store_true", help="time only remat=False")
    args = parser.parse_args()
    dims = tuple(int(d) for d in args.hidden_dims.split(","))
    print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}; "
          f"UNet(hidden_dims={dims}, attention_query_chunk={args.attention_chunk}) "
          f"batch {args.batch}, {args.size}x{args.size}", flush=True)
    for remat in (False, True):
        run = not args.no_run and not (remat and args.no_remat_run)
        model = UNet(hidden_dims=dims, remat=remat, attention_query_chunk=args.attention_chunk)
        profile(model, args.batch, args.size, args.repeats,
                args.cpu_fusion, run)


if __name__ == "__main__":
    main()
