"""Measure the samples of a trained run: Frechet distance, classifier confidence, near-copies.

    python scripts/evaluate.py --workdir=runs/digits                       # 500 samples, EMA and raw
    python scripts/evaluate.py --workdir=runs/digits_cond --guidance_scale=2
    python scripts/evaluate.py --workdir=runs/digits --num_images=500 --json=quality.json
    python scripts/evaluate.py --workdir=runs/digits --sampler=dpm++2m --karras --steps=10
    python scripts/evaluate.py --workdir=runs/digits --seeds=12 --params=ema  # means, std and sem over seeds

Digits runs are scored with the shipped digits classifier against the images the run trained
on, next to the same numbers for 500 held-out real digits (see ``jaxdiff.evaluation``):
``fd_ratio`` (class-balanced FD of the samples over that of the held-out digits) is the number to
compare runs by, taken at N = 500 on both sides (sampling goes on past ``--num_images`` until
every digit has 50); one seed's ratio moves by about +-0.2, so use ``--seeds`` and read
``fd_ratio_sem``, its standard error. The plain ``fd`` of 500 i.i.d. samples varies by +-6
from seed to seed. Other runs get the Frechet distance to their own data with CLIP image
features when ``--clip_checkpoint`` points at local CLIP weights.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags, logging

from jaxdiff.builders import SAMPLERS

flags.DEFINE_string("workdir", None, "A scripts/train.py workdir (config.json + checkpoints/).")
flags.DEFINE_integer("num_images", 500, "How many samples to draw and score.")
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance for conditional runs (default: the config's).")
flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's).")
flags.DEFINE_enum("sampler", None, list(SAMPLERS), "Sampler (default: the config's).")
flags.DEFINE_bool("karras", None, "Karras et al. noise levels (dpm++*, unipc, euler*, heun; default: the config's).")
flags.DEFINE_float("eta", None, "DDIM eta (default: the config's).")
flags.DEFINE_integer("seed", 0, "Sampling seed (the first, with --seeds > 1).")
flags.DEFINE_integer("seeds", 1, "Repeat with this many seeds; report means and the FDs' standard deviations.")
flags.DEFINE_list("params", ["ema", "raw"], "Which params to score: ema, raw or both.")
flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
flags.DEFINE_string("clip_checkpoint", None, "Local open_clip/OpenAI CLIP weights: FD with CLIP image features.")
flags.DEFINE_string("clip_model", "ViT-B-32", "open_clip model name of --clip_checkpoint, or a .json config file.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def _clip_features():
    """CLIP image embeddings of images in [0, 1] (resized to the model's input size, normalised)."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.clip import CLIP, load_open_clip
    from jaxdiff.clip.loss import normalize_images

    config = FLAGS.clip_model
    if config.endswith(".json"):
        with open(config) as f:
            config = json.load(f)
    model, params, _ = load_open_clip(FLAGS.clip_checkpoint, config)
    size = model.image_size

    @jax.jit
    def encode(p, x):
        x = jnp.broadcast_to(x, x.shape[:3] + (3,)) if x.shape[-1] == 1 else x
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear")
        return model.apply({"params": p}, normalize_images(x * 2.0 - 1.0), method=CLIP.encode_image)

    return lambda images: encode(params, jnp.asarray(images, jnp.float32))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from jaxdiff import evaluation

    bad = sorted(set(FLAGS.params) - {"ema", "raw"})
    if bad:
        sys.exit(f"error: --params={','.join(FLAGS.params)}: {bad} is not ema or raw.")
    if FLAGS.num_images < 2:
        sys.exit(f"error: --num_images={FLAGS.num_images} must be >= 2 (FD needs a covariance).")
    t0 = time.perf_counter()
    try:
        features_fn = _clip_features() if FLAGS.clip_checkpoint else None
        report = evaluation.evaluate_run(
            FLAGS.workdir, num_images=FLAGS.num_images, guidance_scale=FLAGS.guidance_scale,
            num_steps=FLAGS.steps, sampler=FLAGS.sampler, eta=FLAGS.eta, use_karras_sigmas=FLAGS.karras,
            seed=FLAGS.seed, num_seeds=FLAGS.seeds,
            which=tuple(FLAGS.params), features_fn=features_fn,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(evaluation.format_report(report))
    print(f"({time.perf_counter() - t0:.0f} s)")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"Wrote {FLAGS.json}.")


if __name__ == "__main__":
    app.run(main)
