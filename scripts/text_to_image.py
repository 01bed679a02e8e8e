"""Text-to-image with a local Stable Diffusion pipeline folder: writes a PNG grid.

    python scripts/text_to_image.py --model=checkpoints/stable-diffusion-v1-5 \
        --prompt="a photo of an astronaut riding a horse" --num_images=4 --out=grid.png
    python scripts/text_to_image.py --model=checkpoints/stable-diffusion-2-1-base --prompt="a red fox" \
        --negative_prompt="blurry" --steps=30 --guidance_scale=7.5 --sampler=ddim --seed=1 --out=fox.png

The folder is a diffusers ``StableDiffusionPipeline`` folder (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``); nothing is downloaded. Fetch one once with
``huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir checkpoints/stable-diffusion-v1-5``.
``--sampler`` overrides the folder's scheduler (ddim, ddpm, pndm or a diffusers class name);
``--dtype=bfloat16`` halves the memory of the networks (use it on GPUs).
"""

from __future__ import annotations

import time

from absl import app, flags

flags.DEFINE_string("model", None, "A StableDiffusionPipeline folder.")
flags.DEFINE_string("prompt", None, "The text prompt.")
flags.DEFINE_string("negative_prompt", None, "What to steer away from (default: the empty prompt).")
flags.DEFINE_integer("num_images", 4, "How many images of the prompt.")
flags.DEFINE_integer("steps", 30, "Sampler steps.")
flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance scale (<= 1: none).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("height", None, "Image height in pixels (default: the model's).")
flags.DEFINE_integer("width", None, "Image width in pixels (default: the model's).")
flags.DEFINE_string("sampler", None, "Override the folder's scheduler: ddim, ddpm, pndm or a class name.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype of the networks.")
flags.DEFINE_integer("ncols", None, "Grid columns (default: square-ish).")
flags.DEFINE_string("out", "grid.png", "Output PNG grid.")
flags.mark_flags_as_required(["model", "prompt"])
FLAGS = flags.FLAGS


def generate(model: str, prompt: str, *, negative_prompt: str | None = None, num_images: int = 4,
             steps: int = 30, guidance_scale: float = 7.5, seed: int = 0, height: int | None = None,
             width: int | None = None, sampler: str | None = None, dtype: str = "float32"):
    """``(images [N, H, W, 3] in [0, 1], seconds)`` for ``num_images`` samples of ``prompt``."""
    import jax
    import jax.numpy as jnp

    from jaxdiff import pretrained

    pipe = pretrained.load_text_to_image(model, height, width, dtype=getattr(jnp, dtype), sampler=sampler)
    ids = pipe.tokenize([prompt] * num_images)
    negative_ids = None if negative_prompt is None else pipe.tokenize([negative_prompt])
    start = time.perf_counter()
    images = pipe(pipe.params, jax.random.key(seed), ids, negative_ids, num_steps=steps,
                  guidance_scale=guidance_scale)
    return jax.device_get(images), time.perf_counter() - start


def main(argv) -> None:
    del argv
    from jaxdiff.images import save_image_grid

    images, seconds = generate(
        FLAGS.model, FLAGS.prompt, negative_prompt=FLAGS.negative_prompt, num_images=FLAGS.num_images,
        steps=FLAGS.steps, guidance_scale=FLAGS.guidance_scale, seed=FLAGS.seed, height=FLAGS.height,
        width=FLAGS.width, sampler=FLAGS.sampler, dtype=FLAGS.dtype,
    )
    path = save_image_grid(images, FLAGS.out, ncols=FLAGS.ncols)
    print(f"{len(images)} images {images.shape[1]}x{images.shape[2]} in {seconds:.1f} s (with compilation) -> {path}")


if __name__ == "__main__":
    app.run(main)
