"""The accelerator benchmark of the book's U-Net, in one command: every figure the README's GPU
table needs, the speed goals checked, results kept as they finish.

    python scripts/gpu_benchmark.py --out=gpu_bench                    # every run
    python scripts/gpu_benchmark.py --out=gpu_bench --runs=float32_b4,bfloat16_b4
    python scripts/gpu_benchmark.py --out=gpu_bench --budget_s=420     # start no run after 7 min
    python scripts/gpu_benchmark.py --out=/tmp/gb --model=tiny --memory_gb=1   # CPU dry run

The runs (:data:`RUNS`), on the book's flowers U-Net (64x64, 133,417,219 parameters) unless
``--model`` names another of ``benchmark.MODELS``:

* ``float32_b4``, ``bfloat16_b4``: training at batch 4 and a DDIM-50 loop of 10 images;
* ``float32_max``, ``bfloat16_max``: training at the largest batch that fits
  (:func:`largest_batch`: XLA's compiled memory analysis of the float32 train step at two batch
  sizes, extrapolated; float32 needs more memory than bfloat16, so both use it).

Float32 runs also time the PyTorch peers (``--peers``: diffusers' ``UNet2DModel``, the project's
named peer, and the book's own U-Net in PyTorch) in eager float32, the same way and in the same
process (``scripts/benchmark.py`` does the timing). XLA runs float32 matrix products on NVIDIA
GPUs in TF32 by default; PyTorch does so for convolutions and not for matmuls.

Each finished run is appended to ``OUT/runs.jsonl`` at once, so a run cut short by a time limit
keeps what it finished; ``OUT/summary.md`` then holds a table and the speed goals checked
(:func:`goals`): training at >= 3x the peer's float32 eager images/s, >= 40% MFU in bfloat16,
and DDIM-50 of 10 images in under 1 s. Without network access, install the pure-Python
dependencies the machine lacks from wheels first (README, "GPU").
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import benchmark as bench  # noqa: E402  (timing, peers, named models)

# name: (dtype, batch: "small" (Settings.train_batch) or "max", DDIM sampling timed, peers timed)
RUNS: dict[str, tuple[str, str, bool, bool]] = {
    "float32_b4": ("float32", "small", True, True),
    "bfloat16_b4": ("bfloat16", "small", True, False),
    "float32_max": ("float32", "max", False, True),
    "bfloat16_max": ("bfloat16", "max", False, False),
}

GOAL_TRAIN_RATIO = 3.0  # x the peer's float32 eager training images/s
GOAL_BF16_MFU = 0.40
GOAL_DDIM_SECONDS = 1.0  # DDIM-50 of GOAL_DDIM_IMAGES images
GOAL_DDIM_IMAGES = 10


@dataclasses.dataclass(frozen=True)
class Settings:
    """How the runs are timed (shared by all runs)."""

    train_batch: int = 4  # the "_b4" runs' batch (the issue's; tests on 8 devices need 8)
    sample_batch: int = GOAL_DDIM_IMAGES
    sample_steps: int = 50
    window_seconds: float = 2.0
    repeats: int = 3
    peers: tuple[str, ...] = ("diffusers", "book")
    max_batch: int = 0  # 0: estimate with largest_batch
    memory_bytes: int | None = None  # None: the device's own limit
    memory_fraction: float = 0.8
    batch_multiple: int = 8
    batch_cap: int = 1024
    budget_s: float = 0.0  # > 0: start no run after this many seconds


def device_memory_bytes() -> int | None:
    """The first local device's memory limit, where the backend reports one (GPU, TPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def search_batch(measure: Callable[[int], int], budget: float, *, probe: tuple[int, int] = (8, 32),
                 multiple: int = 8, cap: int = 1024, tries: int = 4) -> tuple[int, dict[str, Any]]:
    """The largest batch (a multiple of ``multiple``, at most ``cap``) with ``measure(batch) <=
    budget``, for a ``measure`` that is about, not exactly, a fixed part plus a part per image.

    The line through the two ``probe`` batches gives a first guess; each guess is measured, and
    one that does not fit is shrunk in proportion to its own measured bytes per image, up to
    ``tries`` times. Returns the batch and the measurements.

    >>> search_batch(lambda b: 100 + 10 * b, 1000, probe=(8, 16))[0]
    88
    """
    sizes = {b: measure(b) for b in probe}
    (b1, m1), (b2, m2) = sorted(sizes.items())
    per_image = max((m2 - m1) / (b2 - b1), 1.0)
    fixed = m1 - per_image * b1
    round_down = lambda b: min(max(multiple, int(b) // multiple * multiple), cap)  # noqa: E731
    batch, checked = round_down((budget - fixed) / per_image), {}
    for shrinks in range(tries + 1):
        if batch not in sizes:
            sizes[batch] = measure(batch)
        checked[batch] = sizes[batch]
        if sizes[batch] <= budget or batch == multiple or shrinks == tries:
            break
        grown = max((sizes[batch] - fixed) / batch, 1.0)  # this size's own bytes per image
        batch = min(round_down((budget - fixed) / grown), batch - multiple)
    if sizes[batch] > budget:
        raise RuntimeError(f"No batch of {multiple} or more fits {budget / 2**30:.3g} GiB "
                           f"(batch {batch} needs {sizes[batch] / 2**30:.3g} GiB); pass --max_batch.")
    return batch, {"probe_bytes": {str(b): sizes[b] for b in probe}, "bytes_per_image": per_image,
                   "fixed_bytes": fixed, "checked_bytes": {str(k): v for k, v in checked.items()},
                   "bytes": sizes[batch]}


def largest_batch(config, opts: bench.Options, memory_bytes: int, *, fraction: float = 0.8,
                  **search) -> tuple[int, dict[str, Any]]:
    """The largest training batch whose compiled train step fits ``fraction`` of
    ``memory_bytes``: :func:`search_batch` over XLA's memory analysis of the compiled step
    (temporaries + arguments + outputs - aliased). Nothing runs, so nothing can run out of memory
    while searching. The footprint is not exactly affine in the batch (XLA's buffer assignment
    changes with the sizes; on CPU a tiny model measured 3.4 KB per image between batches 8 and
    16, 7.7 KB per image at 144), hence the checked search rather than one extrapolation.

    Example:
      >>> batch, fit = largest_batch(bench.model_config("book"), bench.Options(), 80 * 2**30)  # doctest: +SKIP
    """
    def compiled_bytes(b: int) -> int:
        setup = bench.train_setup(config, dataclasses.replace(opts, train_batch=b))
        size = bench._compiled_bytes(setup.compile(opts))
        del setup
        gc.collect()
        if size is None:
            raise RuntimeError("This backend gives no compiled memory analysis; pass --max_batch.")
        return size

    batch, fit = search_batch(compiled_bytes, fraction * memory_bytes, **search)
    return batch, {**fit, "memory_bytes": memory_bytes, "fraction": fraction}


def _release() -> None:
    """Frees the previous run's device buffers and compiled programs before the next run."""
    gc.collect()
    jax.clear_caches()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def one_run(config, name: str, batch: int, s: Settings) -> dict[str, Any]:
    """One named run: jaxdiff training (and sampling), then each peer, with ratios."""
    dtype, _, sampling, with_peers = RUNS[name]
    opts = bench.Options(dtype=dtype, train_batch=batch, sample_batch=s.sample_batch,
                         sample_steps=s.sample_steps, repeats=s.repeats,
                         window_seconds=s.window_seconds, torch_threads=0)
    result = bench.run_benchmark(config, opts, peer=False, sampling=sampling)
    result["run"] = name
    if with_peers:
        result["peers"] = {}
        for peer in s.peers:
            part = {"jaxdiff": result["jaxdiff"]}
            bench.add_peer(part, config, dataclasses.replace(opts, peer=peer), sampling=sampling)
            result["peers"][peer] = {k: v for k, v in part.items() if k != "jaxdiff"}
            _release()
    return result


def run_all(config, names: Sequence[str], s: Settings, out_dir: pathlib.Path, *,
            model_name: str, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Runs ``names`` in order, appending each result to ``out_dir/runs.jsonl`` as it finishes,
    and writes ``out_dir/summary.md``. A run that fails is recorded with its error; the rest go
    on. With ``s.budget_s`` set, runs not started by then are recorded as skipped."""
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise ValueError(f"--runs has {unknown}; choose from {list(RUNS)}.")
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "runs.jsonl"
    start = time.perf_counter()
    header = {"machine": bench.machine_info(), "model": model_name,
              "image_size": config.data.image_size, "hidden_dims": list(config.model.hidden_dims),
              "settings": dataclasses.asdict(s)}
    results: list[dict[str, Any]] = []
    max_batch = s.max_batch or None
    with jsonl.open("a") as fh:
        fh.write(json.dumps({"header": header}, default=str) + "\n")
        for name in names:
            elapsed = time.perf_counter() - start
            if s.budget_s and elapsed > s.budget_s:
                result = {"run": name, "skipped": f"time budget: {elapsed:.0f} s of {s.budget_s:.0f} s used"}
            else:
                try:
                    batch, fit = s.train_batch, None
                    if RUNS[name][1] == "max":
                        if max_batch is None:
                            memory = s.memory_bytes or device_memory_bytes()
                            if memory is None:
                                raise RuntimeError("The device reports no memory limit; pass "
                                                   "--memory_gb or --max_batch.")
                            max_batch, fit = largest_batch(
                                config, bench.Options(), memory, fraction=s.memory_fraction,
                                multiple=s.batch_multiple, cap=s.batch_cap)
                            log(f"largest batch: {max_batch} ({fit['bytes_per_image'] / 2**20:.1f} MiB "
                                f"per image, {fit['fixed_bytes'] / 2**30:.2f} GiB fixed)")
                        batch = max_batch
                    log(f"{name}: batch {batch} ...")
                    result = one_run(config, name, batch, s)
                    if fit is not None:
                        result["largest_batch_fit"] = fit
                except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                    result = {"run": name, "error": f"{type(e).__name__}: {e}"[:2000]}
                _release()
            result["elapsed_seconds"] = time.perf_counter() - start
            results.append(result)
            fh.write(json.dumps(result, default=str) + "\n")
            fh.flush()
            log(_run_line(result))
    text = summary_markdown(header, results)
    (out_dir / "summary.md").write_text(text)
    log(text)
    return results


def _train(result: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return result.get("jaxdiff", {}).get("train")


def _peer_train(results: Sequence[Mapping[str, Any]], peer: str, batch: int) -> float | None:
    """The peer's float32 images/s at ``batch``, from whichever run timed it."""
    for r in results:
        train = _train(r)
        p = r.get("peers", {}).get(peer, {}).get("peer", {}).get("train")
        if train and p and r["options"]["train_batch"] == batch:
            return p["images_per_sec"]
    return None


def goals(results: Sequence[Mapping[str, Any]], peer: str = "diffusers") -> list[dict[str, Any]]:
    """The issue's speed goals against the runs that finished: name, value, target, met.

    Training: jaxdiff images/s (float32 and bfloat16) over ``peer``'s float32 eager images/s at
    the same batch; MFU of the bfloat16 training runs; DDIM-50 seconds for 10 images.
    """
    rows = []
    for r in results:
        train = _train(r)
        if not train:
            continue
        batch, dtype = r["options"]["train_batch"], r["options"]["dtype"]
        ref = _peer_train(results, peer, batch)
        if ref:
            ratio = train["images_per_sec"] / ref
            rows.append({"goal": f"training {dtype} batch {batch} / {peer} float32",
                         "value": ratio, "target": GOAL_TRAIN_RATIO, "met": ratio >= GOAL_TRAIN_RATIO})
        if dtype == "bfloat16" and train.get("mfu") is not None:
            rows.append({"goal": f"MFU bfloat16 training batch {batch}", "value": train["mfu"],
                         "target": GOAL_BF16_MFU, "met": train["mfu"] >= GOAL_BF16_MFU})
        sampling = r["jaxdiff"].get("sampling")
        if sampling and r["options"]["sample_batch"] == GOAL_DDIM_IMAGES and r["options"]["sample_steps"] == 50:
            rows.append({"goal": f"DDIM-50 of {GOAL_DDIM_IMAGES} images, {dtype}, seconds",
                         "value": sampling["loop_seconds"], "target": GOAL_DDIM_SECONDS,
                         "met": sampling["loop_seconds"] < GOAL_DDIM_SECONDS})
    return rows


def _num(x: Any, fmt: str = "{:.3g}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _run_line(r: Mapping[str, Any]) -> str:
    if "error" in r or "skipped" in r:
        return f"{r['run']}: {r.get('error') or r.get('skipped')}"
    t = _train(r)
    return (f"{r['run']}: batch {r['options']['train_batch']}, {t['images_per_sec']:.1f} img/s, "
            f"{_num(t['tflops'])} TFLOP/s, MFU {_num(t['mfu'], '{:.1%}')}, done at {r['elapsed_seconds']:.0f} s")


def summary_markdown(header: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> str:
    """The runs as a Markdown table, the goals checked, and runs that failed or were skipped."""
    m = header["machine"]
    machine = (f"{m['device_kind']} ({m['backend']}), jax {m['jax']}, torch {m.get('torch', '-')}, "
               f"host {m['cpu']} ({m['cpu_count']} CPUs).")
    columns = ("| run | batch | jaxdiff train img/s | TFLOP/s | MFU | compile s | peak GiB | "
               "diffusers fp32 img/s | book (PyTorch) fp32 img/s | DDIM-50 s (jaxdiff / diffusers) |")
    lines = [f"# GPU benchmark: {header['model']} U-Net, {header['image_size']}x{header['image_size']}",
             "", machine, "", columns, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = _train(r)
        if not t:
            continue
        batch = r["options"]["train_batch"]
        peers = [_peer_train(results, p, batch) for p in ("diffusers", "book")]
        sampling = r["jaxdiff"].get("sampling")
        peer_sampling = r.get("peers", {}).get("diffusers", {}).get("peer", {}).get("sampling")
        ddim = "-"
        if sampling:
            ddim = f"{sampling['loop_seconds']:.3f} / " + (
                f"{peer_sampling['loop_seconds']:.3f}" if peer_sampling else "-")
        peak = t.get("peak_bytes_in_use") or t.get("compiled_bytes")
        lines.append(
            f"| {r['run']} | {batch} | {t['images_per_sec']:.1f} | {_num(t['tflops'])} | "
            f"{_num(t['mfu'], '{:.1%}')} | {t['compile_seconds']:.1f} | "
            f"{_num(peak / 2**30 if peak else None, '{:.2f}')} | {_num(peers[0], '{:.1f}')} | "
            f"{_num(peers[1], '{:.1f}')} | {ddim} |")
    lines += ["", "| goal | value | target | met |", "|---|---|---|---|"]
    for g in goals(results):
        lines.append(f"| {g['goal']} | {g['value']:.3g} | {g['target']:g} | {'yes' if g['met'] else 'no'} |")
    for r in results:
        if "error" in r or "skipped" in r:
            lines.append(f"\n{r['run']}: {r.get('error') or r.get('skipped')}")
    return "\n".join(lines) + "\n"


def _main(argv) -> None:  # pragma: no cover - exercised by hand; tests call run_all.
    del argv
    from absl import flags

    f = flags.FLAGS
    if f.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", f.compilation_cache)
    config = bench.model_config(f.model)
    settings = Settings(
        train_batch=f.train_batch, sample_batch=f.sample_batch, window_seconds=f.window_seconds, repeats=f.repeats,
        peers=tuple(p for p in f.peers if p), max_batch=f.max_batch,
        memory_bytes=int(f.memory_gb * 2**30) if f.memory_gb else None,
        memory_fraction=f.memory_fraction, budget_s=f.budget_s)
    run_all(config, f.runs, settings, pathlib.Path(f.out), model_name=f.model)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("out", None, "Folder for runs.jsonl and summary.md.", required=True)
    flags.DEFINE_list("runs", list(RUNS), f"Runs, in order, from {list(RUNS)}.")
    flags.DEFINE_enum("model", "book", list(bench.MODELS), "A named model.")
    flags.DEFINE_list("peers", ["diffusers", "book"], "PyTorch peers timed in float32 runs (empty: none).")
    flags.DEFINE_integer("train_batch", 4, "The '_b4' runs' training batch.")
    flags.DEFINE_integer("sample_batch", GOAL_DDIM_IMAGES, "Images per DDIM-50 loop.")
    flags.DEFINE_float("window_seconds", 2.0, "Each timing window of train steps lasts about this long.")
    flags.DEFINE_integer("repeats", 3, "Timing windows per figure; the best is reported.")
    flags.DEFINE_integer("max_batch", 0, "The '_max' runs' batch (0: estimate from compiled memory).")
    flags.DEFINE_float("memory_gb", 0.0, "Device memory for the estimate (0: the device's own limit).")
    flags.DEFINE_float("memory_fraction", 0.8, "Share of device memory the largest batch may use.")
    flags.DEFINE_float("budget_s", 0.0, "If > 0, start no run after this many seconds.")
    flags.DEFINE_string("compilation_cache", None, "A persistent JAX compilation cache folder.")
    app.run(_main)
