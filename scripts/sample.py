"""Sample from a trained run: writes a PNG grid (and optionally an .npz and a trajectory strip).

    python scripts/sample.py --workdir=runs/digits --num_images=64 --out=samples.png
    python scripts/sample.py --workdir=runs/digits_cond --labels=0,1,2,3,4,5,6,7,8,9 \
        --guidance_scale=3 --out=cond.png --npz=cond.npz
    python scripts/sample.py --workdir=runs/flowers --num_images=10 --steps=50 --eta=1 \
        --trajectory --out=flowers.png       # the book's figure: t = 800, 600, 400, 200, 0
    python scripts/sample.py --workdir=runs/digits --sampler=dpm++2m --karras --steps=10

Flags: --labels (comma-separated class indices, cycled over the images; conditional models
only), --guidance_scale (classifier-free guidance), --steps, --eta (DDIM), --sampler (ddim, ddpm,
dpm++2m, dpm++3m, dpm++sde, unipc, euler, euler_a, heun, pndm), --karras (Karras noise levels),
--seed, --npz (uint8 images [N, H, W, C] and labels), --trajectory (writes OUT_trajectory.png:
one row per image, columns: the states after the steps from t = 800, 600, 400, 200, 0 or the
nearest visited timesteps; the last column is the sample).

CLIP guidance (the hands-on notebook's text steering), with weights on local disk:

    python scripts/sample.py --workdir=runs/flowers --clip_prompt="a red rose" \
        --clip_checkpoint=checkpoints/ViT-B-32.safetensors --clip_scale=50
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import app, flags, logging

from jaxdiff.builders import SAMPLERS

flags.DEFINE_string("workdir", None, "A scripts/train.py workdir (config.json + checkpoints/).")
flags.DEFINE_integer("num_images", 64, "How many images.")
flags.DEFINE_string("out", "samples.png", "Output PNG grid.")
flags.DEFINE_string("labels", None, "Comma-separated class indices (conditional models).")
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (needs --labels).")
flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's).")
flags.DEFINE_float("eta", None, "DDIM eta (0 deterministic, 1 DDPM-like).")
flags.DEFINE_enum("sampler", None, list(SAMPLERS), "Sampler (default: the config's).")
flags.DEFINE_bool("karras", None, "Karras et al. noise levels (dpm++*, unipc, euler*, heun; default: the config's).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("npz", None, "Also write images (uint8) and labels to this .npz file.")
flags.DEFINE_bool("trajectory", False, "Also write a strip of intermediate states.")
flags.DEFINE_integer("ncols", None, "Grid columns (default: square-ish).")
flags.DEFINE_string("clip_prompt", None, "Steer sampling toward this text with CLIP guidance.")
flags.DEFINE_string("clip_checkpoint", None, "Local open_clip/OpenAI CLIP weights (.safetensors/.bin/.pt).")
flags.DEFINE_string("clip_model", "ViT-B-32", "open_clip model name of --clip_checkpoint, or a .json config file.")
flags.DEFINE_float("clip_scale", 50.0, "CLIP guidance scale (score form).")
flags.DEFINE_integer("clip_cuts", 4, "Random cut-outs per image for the CLIP loss.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS

TRAJECTORY_TIMES = (800, 600, 400, 200, 0)


def _clip_guidance():
    """``eps_fn -> eps_fn`` steering toward ``--clip_prompt`` (CLIP score-form guidance)."""
    import jax

    from jaxdiff import guidance
    from jaxdiff.checkpoint import read_config
    from jaxdiff.clip import load_open_clip
    from jaxdiff.train import build_schedule

    if not FLAGS.clip_checkpoint:
        raise ValueError("--clip_prompt needs --clip_checkpoint=PATH to local CLIP weights.")
    clip_config = FLAGS.clip_model
    if clip_config.endswith(".json"):
        import json

        with open(clip_config) as f:
            clip_config = json.load(f)
    clip_model, clip_params, tokenizer = load_open_clip(FLAGS.clip_checkpoint, clip_config)
    loss_fn = guidance.clip_loss(
        clip_model, clip_params, FLAGS.clip_prompt, key=jax.random.key(FLAGS.seed + 1),
        n_cuts=FLAGS.clip_cuts, tokenizer=tokenizer,
    )  # fmt: skip
    schedule = build_schedule(read_config(FLAGS.workdir))
    return lambda eps_fn: guidance.gradient_guidance(eps_fn, loss_fn, FLAGS.clip_scale, schedule)


def _parse_labels(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--labels={text!r} must be comma-separated class indices, e.g. --labels=0,1,2.") from None


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np

    from jaxdiff import images as images_lib
    from jaxdiff.sampling import load_sampler

    try:
        labels = _parse_labels(FLAGS.labels)
        guidance_fn = _clip_guidance() if FLAGS.clip_prompt else None
        sample, params = load_sampler(
            FLAGS.workdir,
            num_images=FLAGS.num_images,
            num_steps=FLAGS.steps,
            eta=FLAGS.eta,
            sampler=FLAGS.sampler,
            use_karras_sigmas=FLAGS.karras,
            labels=labels,
            guidance_scale=FLAGS.guidance_scale,
            return_trajectory=FLAGS.trajectory,
            progress=True,
            guidance_fn=guidance_fn,
        )
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")

    t0 = time.perf_counter()
    print(f"Sampling {FLAGS.num_images} images (compiles once, then runs the whole loop)...", flush=True)
    out = jax.block_until_ready(sample(params, jax.random.key(FLAGS.seed)))
    dt = time.perf_counter() - t0
    images, trajectory, timesteps = out if FLAGS.trajectory else (out, None, None)
    images = np.asarray(images)
    path = images_lib.save_image_grid(images, FLAGS.out, ncols=FLAGS.ncols)
    print(f"Wrote {path} ({len(images)} images, {dt:.1f} s including compilation).")

    if FLAGS.npz:
        used = np.resize(np.asarray(labels), len(images)) if labels else np.full(len(images), -1)
        np.savez_compressed(FLAGS.npz, images=images_lib.to_uint8(images), labels=used.astype(np.int32))
        print(f"Wrote {FLAGS.npz}.")

    if trajectory is not None:
        timesteps = np.asarray(timesteps)
        # trajectory[i] is the state at timesteps[i] (x_T first, the sample last, at -1); the book's
        # figure shows the states after the steps from t = 800, 600, 400, 200, 0 (the last: the sample).
        visited = timesteps[:-1]
        picks = [int(np.argmin(np.abs(visited - t))) for t in TRAJECTORY_TIMES]
        strip = np.stack([np.asarray(trajectory[i + 1]) for i in picks], axis=1).reshape((-1,) + images.shape[1:])
        tpath = Path(FLAGS.out).with_name(Path(FLAGS.out).stem + "_trajectory.png")
        images_lib.save_image_grid(strip, tpath, ncols=len(TRAJECTORY_TIMES))
        print(f"Wrote {tpath} (columns: after the steps from t = {[int(visited[i]) for i in picks]}).")


if __name__ == "__main__":
    app.run(main)
