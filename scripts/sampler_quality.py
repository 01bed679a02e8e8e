"""Sample quality against sampling steps, for several samplers: digits FD, confidence and images/s.

    python scripts/sampler_quality.py --workdir=runs/digits --workdir=runs/digits_cond \
        --samplers=ddim,dpm++2m,dpm++2m_karras,unipc,euler,heun --steps=5,10,20,50 \
        --num_images=500 --out=results/sampler_quality

For every run (its EMA params, else its raw ones), sampler and step count, it draws
``--num_images`` digits as ``scripts/evaluate.py`` does (conditional runs: every class equally
often, with classifier-free guidance at the run's ``config.sample.guidance_scale``) and records,
with the shipped digits classifier (:mod:`jaxdiff.evaluation`): the FD to the training digits
(``--fd=balanced``, the default: of the same number ``m`` of samples of each digit, which
leaves out the seed noise of the class mix, as its ratio to ``m`` held-out digits of each class
times the FD of all 500 held-out digits; ``--fd=iid``: the plain FD of all samples), its ratio
to the FD of the held-out real digits, the classifier's confidence (and for
conditional runs the label accuracy), and the compiled sampler's images/s. A sampler name is one
of ``jaxdiff.builders.SAMPLERS``; the suffix ``_karras`` adds Karras noise levels
(``config.sample.use_karras_sigmas``). Every other sampler setting is the run's ``config.sample``.

Writes ``OUT/quality.jsonl`` (one line per run, sampler and step count), ``OUT/quality.md``
(the tables) and ``OUT/quality.png`` (FD against steps, one line per sampler, one panel per run),
and prints, for every sampler, the fewest steps that reach the reference (``--reference``,
DDIM at 50 steps) and the speed-up in images/s there.

When a sampler "reaches" the reference: the FD of N samples varies with the seed. The reference
is drawn with ``--noise_seeds`` seeds (K, default 3); its FD is their mean ``m`` and its seed
noise their standard deviation ``s``. Every other point is one draw (the first seed), so its
difference to ``m`` has a standard deviation of about ``s sqrt(1 + 1/K)``. A sampler reaches the
reference at the fewest steps whose FD is at most ``m + 2 s sqrt(1 + 1/K)``: not worse by more
than two standard deviations of that difference. (All samplers start from the same noise, so
their FDs are correlated and the band is, if anything, wide.)

Timing: images/s of the compiled sampler at ``--batch_size`` images per call, from the calls
after the first (which compiles); with a single call the batch is drawn once more to be timed.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from absl import app, flags, logging

from jaxdiff.builders import SAMPLERS

KARRAS_SUFFIX = "_karras"

flags.DEFINE_multi_string("workdir", None, "A scripts/train.py digits run (repeat the flag for several).")
flags.DEFINE_list("samplers", ["ddim", "dpm++2m", "dpm++2m_karras", "unipc", "euler", "heun"],
                  f"Samplers: names of {list(SAMPLERS)}, with {KARRAS_SUFFIX!r} for Karras noise levels.")
flags.DEFINE_list("steps", ["5", "10", "20", "50"], "Sampling step counts.")
flags.DEFINE_integer("num_images", 500, "Images per sampler and step count (FD uses at most 500).")
flags.DEFINE_integer("batch_size", 100, "Images per sampler call (the timing unit).")
flags.DEFINE_string("reference", "ddim:50", "SAMPLER:STEPS whose FD the others must reach (one of the sweep's).")
flags.DEFINE_integer("noise_seeds", 3, "Seeds the reference is drawn with, for the FD's seed noise (>= 1).")
flags.DEFINE_integer("seed", 0, "Sampling seed (the reference also uses seed + 1, ...).")
flags.DEFINE_enum("fd", "balanced", ["balanced", "iid"],
                  "The FD compared: class-balanced (50 or fewer of each digit, low seed noise) or of all images.")
flags.DEFINE_string("out", None, "Output folder for quality.jsonl, quality.md and quality.png.")
flags.mark_flags_as_required(["workdir", "out"])
FLAGS = flags.FLAGS


def parse_sampler(name: str) -> tuple[str, bool]:
    """``"dpm++2m_karras"`` -> ``("dpm++2m", True)``; a clear error for unknown names."""
    base = name.removesuffix(KARRAS_SUFFIX)
    if base not in SAMPLERS:
        raise ValueError(f"--samplers: {name!r} is not one of {list(SAMPLERS)} (optionally + {KARRAS_SUFFIX!r}).")
    return base, base != name


class _TimedSampler:
    """Calls ``sample`` and records the seconds of each call (waiting for the result)."""

    def __init__(self, sample):
        self.sample, self.seconds = sample, []

    def __call__(self, *args, **kwargs):
        import jax

        start = time.perf_counter()
        out = jax.block_until_ready(self.sample(*args, **kwargs))
        self.seconds.append(time.perf_counter() - start)
        return out


def _fd_numbers(quality: dict[str, Any]) -> dict[str, float]:
    """``fd``, ``fd_real`` (held-out digits) and ``fd_ratio`` of one score, as ``--fd`` chooses."""
    if FLAGS.fd == "balanced":  # the seed noise of the class mix left out (jaxdiff.evaluation)
        # The balanced FD uses m samples of each digit, m the smallest class count, so its size
        # bias varies from row to row; its ratio to m held-out digits of each class does not.
        # On one scale for every row: that ratio times the FD of the 500 held-out digits.
        real = quality.get("fd_real", math.nan)
        return {"fd": quality.get("fd_ratio", math.nan) * real, "fd_real": real,
                "fd_ratio": quality.get("fd_ratio", math.nan), "fd_iid": quality["fd"]}  # fmt: skip
    fd, real = quality["fd"], quality.get("fd_real", math.nan)
    return {"fd": fd, "fd_real": real, "fd_ratio": fd / real}


def measure(config, params, name: str, steps: int, *, num_images: int, batch_size: int, labels, guidance_scale,
            seeds: list[int]) -> dict[str, Any]:  # fmt: skip
    """Quality numbers and images/s of one sampler at one step count (FD for each of ``seeds``)."""
    import jax

    from jaxdiff import evaluation
    from jaxdiff.sampling import make_sampler

    sampler, karras = parse_sampler(name)
    batch_size = min(batch_size, num_images)
    sample = _TimedSampler(make_sampler(config, num_images=batch_size, sampler=sampler, num_steps=steps,
                                        use_karras_sigmas=karras))  # fmt: skip
    draw = dict(labels=labels, guidance_scale=guidance_scale)
    images = evaluation.draw_samples(sample, params, num_images, batch_size, seed=seeds[0], **draw)
    if len(sample.seconds) == 1:  # the only call compiled: time the same batch again
        kwargs = {} if labels is None else {"labels": labels[:batch_size], "guidance_scale": guidance_scale}
        sample(params, jax.random.key(0), **kwargs)
    quality = evaluation.score_samples(config, images, labels)
    row = {
        "sampler": name,
        "steps": steps,
        "network_calls": SAMPLERS[sampler].evaluations(steps),  # per image (guidance doubles each call's batch)
        **_fd_numbers(quality),
        **{k: quality[k] for k in ("confidence", "confidence_real", "label_accuracy") if k in quality},
        "images_per_s": batch_size * (len(sample.seconds) - 1) / sum(sample.seconds[1:]),
    }
    for seed in seeds[1:]:  # the reference's other seeds
        more = evaluation.draw_samples(sample.sample, params, num_images, batch_size, seed=seed, **draw)
        row.setdefault("fd_seeds", [row["fd"]]).append(_fd_numbers(evaluation.score_samples(config, more, labels))["fd"])
    return row


def reference_band(row: dict[str, Any]) -> tuple[float, float, float]:
    """``(mean FD, seed standard deviation, threshold)`` of the reference (module docstring)."""
    fds = row.get("fd_seeds", [row["fd"]])
    k = len(fds)
    mean = sum(fds) / k
    std = math.sqrt(sum((f - mean) ** 2 for f in fds) / (k - 1)) if k > 1 else 0.0
    return mean, std, mean + 2.0 * std * math.sqrt(1.0 + 1.0 / k)


def reached(rows: list[dict[str, Any]], reference: dict[str, Any]) -> list[dict[str, Any]]:
    """Per sampler of one run: the fewest steps whose FD reaches the reference, and the speed-up."""
    _, _, threshold = reference_band(reference)
    out = []
    for name in dict.fromkeys(r["sampler"] for r in rows):
        ok = sorted((r for r in rows if r["sampler"] == name and r["fd"] <= threshold), key=lambda r: r["steps"])
        entry = {"sampler": name, "steps": None}
        if ok:
            entry.update(steps=ok[0]["steps"], fd=ok[0]["fd"], images_per_s=ok[0]["images_per_s"],
                         speedup=ok[0]["images_per_s"] / reference["images_per_s"])  # fmt: skip
        out.append(entry)
    return out


def run_sweep(workdir: str, samplers: list[str], steps: list[int], *, num_images: int, batch_size: int,
              reference: tuple[str, int], noise_seeds: int, seed: int) -> list[dict[str, Any]]:  # fmt: skip
    """Every (sampler, steps) of one run, as rows of ``quality.jsonl``."""
    from jaxdiff import checkpoint as ckpt
    from jaxdiff import evaluation
    from jaxdiff.builders import build_model, model_num_classes
    from jaxdiff.sampling import load_params

    config = ckpt.read_config(workdir)
    if config.data.name != "digits":
        raise ValueError(f"--workdir={workdir}: a {config.data.name!r} run; the digits FD needs a digits run.")
    labels = evaluation.evaluation_labels(num_images, model_num_classes(build_model(config)))
    scale = evaluation.evaluation_guidance(config, labels)
    params, step = load_params(workdir, config, use_ema=True)
    rows = []
    for name in samplers:
        for n in steps:
            seeds = [seed + k for k in range(noise_seeds if (name, n) == reference else 1)]
            start = time.perf_counter()
            row = measure(config, params, name, n, num_images=num_images, batch_size=batch_size, labels=labels,
                          guidance_scale=scale, seeds=seeds)  # fmt: skip
            row.update(run=workdir, checkpoint_step=step, num_images=num_images, guidance_scale=scale,
                       reference=(name, n) == reference)  # fmt: skip
            rows.append(row)
            print(f"{Path(workdir).name} {name:>16s} {n:4d} steps: FD {row['fd']:.3f} (x{row.get('fd_ratio', math.nan):.2f}"
                  f" real), confidence {row['confidence']:.3f}, {row['images_per_s']:.1f} images/s "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]], summaries: dict[str, list[dict[str, Any]]]) -> str:
    """The tables of ``quality.md``."""
    lines = ["# Sample quality against sampling steps", ""]
    for run, summary in summaries.items():
        run_rows = [r for r in rows if r["run"] == run]
        ref = next(r for r in run_rows if r["reference"])
        mean, std, threshold = reference_band(ref)
        conditional = any("label_accuracy" in r for r in run_rows)
        lines += [f"## {run}", "", f"Reference: {ref['sampler']} at {ref['steps']} steps, FD {mean:.3f} "
                  f"(seed std {std:.3f} over {len(ref.get('fd_seeds', [0]))} seeds); reached at FD <= {threshold:.3f}.",
                  "", "| sampler | steps | network calls | FD | FD / real | confidence |"
                  + (" label accuracy |" if conditional else "") + " images/s |",
                  "|---|---:|---:|---:|---:|---:|" + ("---:|" if conditional else "") + "---:|"]  # fmt: skip
        for r in run_rows:
            accuracy = f" {r.get('label_accuracy', math.nan):.3f} |" if conditional else ""
            lines.append(f"| {r['sampler']} | {r['steps']} | {r['network_calls']} | {r['fd']:.3f} | "
                         f"{r.get('fd_ratio', math.nan):.2f} | {r['confidence']:.3f} |{accuracy} "
                         f"{r['images_per_s']:.1f} |")  # fmt: skip
        lines += ["", f"Fewest steps reaching {ref['sampler']}-{ref['steps']}:", "",
                  "| sampler | steps | FD | images/s | speed-up |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for s in summary:
            if s["steps"] is None:
                lines.append(f"| {s['sampler']} | not reached | | | |")
            else:
                lines.append(f"| {s['sampler']} | {s['steps']} | {s['fd']:.3f} | {s['images_per_s']:.1f} | "
                             f"{s['speedup']:.2f}x |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], runs: list[str], path: Path) -> None:
    """FD against steps, one line per sampler, one panel per run (the reference's band shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.2), squeeze=False)
    for ax, run in zip(axes[0], runs):
        run_rows = [r for r in rows if r["run"] == run]
        for name in dict.fromkeys(r["sampler"] for r in run_rows):
            points = sorted((r["steps"], r["fd"]) for r in run_rows if r["sampler"] == name)
            ax.plot(*zip(*points), marker="o", label=name)
        ref = next(r for r in run_rows if r["reference"])
        mean, _, threshold = reference_band(ref)
        ax.axhspan(mean, threshold, color="grey", alpha=0.2, label=f"{ref['sampler']}-{ref['steps']} (+ seed noise)")
        steps = sorted({r["steps"] for r in run_rows})
        ax.set(xscale="log", yscale="log", xlabel="sampling steps", ylabel="digits FD", title=Path(run).name)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        samplers = list(dict.fromkeys(FLAGS.samplers))
        for name in samplers:
            parse_sampler(name)
        try:
            steps = sorted({int(s) for s in FLAGS.steps})
            ref_name, ref_steps = FLAGS.reference.rsplit(":", 1)
            reference = (ref_name, int(ref_steps))
        except ValueError:
            raise ValueError(f"--steps={','.join(FLAGS.steps)} and --reference={FLAGS.reference} must be ints and "
                             "SAMPLER:STEPS.") from None  # fmt: skip
        if reference[0] not in samplers or reference[1] not in steps:
            raise ValueError(f"--reference={FLAGS.reference} must be one of the sweep's samplers and --steps.")
        if FLAGS.noise_seeds < 1 or FLAGS.num_images < 2 or min(steps) < 1:
            raise ValueError("--noise_seeds and --steps must be >= 1, --num_images >= 2.")
        rows = []
        for workdir in FLAGS.workdir:
            rows += run_sweep(workdir, samplers, steps, num_images=FLAGS.num_images, batch_size=FLAGS.batch_size,
                              reference=reference, noise_seeds=FLAGS.noise_seeds, seed=FLAGS.seed)  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")

    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "quality.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    summaries = {}
    for run in FLAGS.workdir:
        run_rows = [r for r in rows if r["run"] == run]
        ref = next(r for r in run_rows if r["reference"])
        summaries[run] = reached(run_rows, ref)
        mean, std, threshold = reference_band(ref)
        print(f"\n{run}: {ref['sampler']}-{ref['steps']} FD {mean:.3f} +- {std:.3f} (seed std over "
              f"{len(ref.get('fd_seeds', [0]))} seeds), {ref['images_per_s']:.1f} images/s; reached at FD <= "
              f"{threshold:.3f} (mean + 2 std sqrt(1 + 1/K)):")  # fmt: skip
        for s in summaries[run]:
            if s["steps"] is None:
                print(f"  {s['sampler']:>16s}: not within {max(steps)} steps")
            else:
                print(f"  {s['sampler']:>16s}: {s['steps']:3d} steps (FD {s['fd']:.3f}), {s['images_per_s']:.1f} "
                      f"images/s: {s['speedup']:.2f}x")  # fmt: skip
    (out / "quality.md").write_text(markdown(rows, summaries))
    plot(rows, FLAGS.workdir, out / "quality.png")
    print(f"\nWrote {out / 'quality.jsonl'}, {out / 'quality.md'} and {out / 'quality.png'}.")


if __name__ == "__main__":
    app.run(main)
