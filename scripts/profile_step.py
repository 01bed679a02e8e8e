"""Where the time of a train step (or a forward pass) goes: a ``jax.profiler`` trace, summed by op.

Run:
  python scripts/profile_step.py                          # small book model, batch 32 (CPU)
  python scripts/profile_step.py --model=book --batch=8   # the book's 64x64 model
  python scripts/profile_step.py --part=forward --batch=16 --top=40
  python scripts/profile_step.py --trace_dir=/tmp/trace   # keep the trace (TensorBoard/Perfetto)

It compiles ``jaxdiff.train.make_train_step`` (or the model's forward pass) exactly as training
and the benchmark do, times it, records ``--steps`` executions with ``jax.profiler.trace`` and
reads the Perfetto JSON the profiler writes. Each executed HLO operation is joined with its
``op_name`` metadata from the compiled program, which names the Flax module it came from
(``up_2_attn``, ``down_0_res_1/conv1``, ...) and whether it belongs to the backward pass
(``transpose(jvp(...))``). Two tables are printed: the operations that took the longest, and
the time by (pass, module kind, operation kind).

Instructions without an ``op_name`` (layout copies and transposes XLA inserts, for instance
around convolution weight gradients) land in ``forward/other``. Loop and conditional
instructions are left out: their bodies' instructions are counted themselves.

Op durations are summed over the host threads that ran them; on CPU some library kernels
(convolutions run by Eigen) execute outside the traced thunks, so the summed time can be less
than the step's wall time. Compare tables from the same machine only.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import benchmark as bench  # noqa: E402  (the benchmark's named models and options)

from jaxdiff import train as train_lib  # noqa: E402

_CONTROL_FLOW = ("while", "conditional", "call")
# Module kinds, matched against the last Flax scope in op_name that is one of them.
_MODULE_KINDS = ("attn", "res", "norm", "conv", "time_proj", "residual_conv", "to_qkv", "to_out",
                 "downsample", "upsample", "time_mlp", "context_mlp", "init_conv", "conv_out")


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """One instruction of the compiled program: result shape, opcode and ``op_name``."""

    shape: str
    opcode: str
    op_name: str


def hlo_op_info(hlo_text: str) -> dict[str, OpInfo]:
    """``{instruction name: OpInfo}`` for every instruction of an optimized HLO module's text."""
    info = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(", line)
        if m:
            name = re.search(r'op_name="([^"]*)"', line)
            info[m.group(1)] = OpInfo(m.group(2), m.group(3), name.group(1) if name else "")
    return info


def module_kind(op_name: str) -> str:
    """The Flax module an ``op_name`` comes from, coarsely: ``attn``, ``norm``, ``conv``, ...

    Example:
      >>> module_kind("jit(step)/transpose(jvp(UNet))/up_2_res_0/conv1/conv_general_dilated")
      'conv'
    """
    scopes = [s for s in re.split(r"[/()]", op_name) if s]
    for scope in reversed(scopes):
        for kind in _MODULE_KINDS:
            if scope == kind or scope.startswith(kind) or scope.endswith("_" + kind):
                return "attn" if kind in ("to_qkv", "to_out") else kind
    return "other"


def summarize(events: Iterable[Mapping[str, Any]], info: Mapping[str, OpInfo], steps: int,
              top: int = 25) -> dict[str, Any]:
    """Sums the traced ``X`` events of the program's instructions (``info``) by instruction and
    by (pass, module, operation kind), per step; runtime events and loop wrappers are left out.

    Returns ``{"total_ms", "ops": [(ms, name, OpInfo)], "groups": [(ms, count, key)]}`` with
    ``ms`` per step and the largest first.
    """
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        op = info.get(str(e.get("name", "")))
        # Only the program's instructions; a loop or conditional spans its body's instructions,
        # which are counted themselves.
        if e.get("ph") == "X" and op is not None and op.opcode not in _CONTROL_FLOW:
            per_op[e["name"]] += float(e.get("dur", 0.0)) / 1e3 / steps
    groups: dict[tuple[str, str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, ms in per_op.items():
        op = info[name]
        pass_ = "backward" if "transpose(" in op.op_name else "forward"
        kind = re.sub(r"(\.\d+)+$", "", name)  # fusion kind: ynn_fusion, transpose_copy_fusion...
        key = (pass_, module_kind(op.op_name), kind)
        groups[key][0] += ms
        groups[key][1] += 1
    ops = sorted(((ms, name, info[name]) for name, ms in per_op.items()), key=lambda r: -r[0])
    return {
        "total_ms": sum(per_op.values()),
        "ops": ops[:top],
        "groups": sorted(((v[0], v[1], k) for k, v in groups.items()), key=lambda r: -r[0])[:top],
    }


def trace_events(run: Callable[[], Any], steps: int, trace_dir: str) -> list[dict[str, Any]]:
    """Runs ``run`` ``steps`` times under ``jax.profiler.trace``; returns the trace's events."""
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(run())
    files = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {trace_dir}.")
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def build(config, opts: bench.Options, part: str) -> tuple[Callable[[], Any], Any]:
    """``(run, compiled)`` for the train step (``part="train"``) or the forward pass."""
    if part == "forward":
        config = bench.with_options(config, opts)
        model = train_lib.build_model(config)
        size, channels = config.data.image_size, config.data.channels
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((opts.train_batch, size, size, channels)), jnp.float32)
        t = jnp.asarray(rng.integers(0, 1000, opts.train_batch), jnp.int32)
        params = jax.jit(model.init)(jax.random.key(0), x, t)["params"]
        forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
        compiled = forward.lower(params, x, t).compile(compiler_options=bench._compiler_options(opts))
        return (lambda: compiled(params, x, t)), compiled
    setup = bench.train_setup(config, opts)
    compiled = setup.compile(opts)
    return setup.stepper(compiled), compiled


def profile(config, opts: bench.Options, *, part: str = "train", steps: int = 5, top: int = 25,
            trace_dir: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Times ``part``, traces ``steps`` runs of it and logs the two tables; returns the summary
    (with ``wall_ms``, the best of 10 untraced runs)."""
    run, compiled = build(config, opts, part)
    for _ in range(2):
        jax.block_until_ready(run())
    walls = []
    for _ in range(10):
        start = time.perf_counter()
        jax.block_until_ready(run())
        walls.append(1e3 * (time.perf_counter() - start))
    with tempfile.TemporaryDirectory() as tmp:
        events = trace_events(run, steps, trace_dir or tmp)
    summary = summarize(events, hlo_op_info(compiled.as_text()), steps, top)
    summary["wall_ms"] = min(walls)
    log(f"{part}: batch {opts.train_batch}, wall {summary['wall_ms']:.1f} ms per run (best of 10); "
        f"traced HLO operations {summary['total_ms']:.1f} ms per run (summed over threads)")
    log("\ntop operations (ms per run):")
    for ms, name, op in summary["ops"]:
        log(f"{ms:8.2f}  {name:34s} {op.shape:34s} {op.op_name[-70:]}")
    log("\nby pass, module and operation kind (ms per run, operations):")
    for ms, count, (pass_, kind, fusion) in summary["groups"]:
        log(f"{ms:8.2f} {count:5d}  {pass_:9s} {kind:14s} {fusion}")
    return summary


def _main(argv) -> None:  # pragma: no cover - exercised by hand; tests call profile().
    del argv
    f = flags.FLAGS
    gpu = jax.default_backend() != "cpu"
    config = bench.model_config(f.model or ("book" if gpu else "small"))
    opts = bench.Options(train_batch=f.batch or (16 if gpu else 32), dtype=f.dtype,
                         attention_impl=f.attention_impl, cpu_fusion=f.cpu_fusion)
    profile(config, opts, part=f.part, steps=f.steps, top=f.top, trace_dir=f.trace_dir)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_enum("model", None, list(bench.MODELS), "A named model (default: small on CPU, book elsewhere).")
    flags.DEFINE_enum("part", "train", ["train", "forward"], "The train step or the forward pass.")
    flags.DEFINE_integer("batch", None, "Batch size (default 32 on CPU, 16 elsewhere).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Computation dtype.")
    flags.DEFINE_enum("attention_impl", "", ["", "xla", "cudnn", "cpu_fast", "auto"], "'' by backend.")
    flags.DEFINE_enum("cpu_fusion", "auto", ["auto", *train_lib.CPU_FUSION_MODES], "XLA:CPU library fusions.")
    flags.DEFINE_integer("steps", 5, "Traced runs.")
    flags.DEFINE_integer("top", 25, "Rows per table.")
    flags.DEFINE_string("trace_dir", None, "Keep the trace here (default: a temporary folder).")
    app.run(_main)
