"""Train on any folder of PNG/JPEG images (searched recursively).

    python scripts/train.py --config=configs/image_folder.py --workdir=runs/mine \
        --config.data.path=/path/to/images --config.data.image_size=64

Images are resized on the shorter side to ``data.image_size`` (bilinear), centre-cropped,
randomly flipped and scaled to [-1, 1]; ``data.channels`` is 3 (RGB) or 1 (grey). An unreadable
file stops the run before training with its name; ``--config.data.skip_corrupt=True`` skips and
counts such files instead. The model is a mid-sized U-Net (hidden_dims (64, 128, 256, 256)) with
EMA; change any field from the command line.

Variant ``:smoke``: tiny network, few steps (tests).
"""

from jaxdiff.config_defaults import base_config, shrink_for_smoke


def get_config(arg: str | None = None):
    if arg not in (None, "", "smoke"):
        raise ValueError(f"Unknown image_folder config variant {arg!r}; use smoke or nothing.")
    c = base_config()
    c.data.name = "image_folder"
    c.data.path = ""
    c.data.image_size = 64
    c.data.channels = 3
    c.data.random_flip = True

    c.model.hidden_dims = (64, 128, 256, 256)
    c.schedule.name = "cosine"
    c.loss = "l2"
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 500
    c.optim.grad_clip_norm = 1.0
    c.train.num_steps = 20000
    c.train.batch_size = 32
    c.train.checkpoint_every = 1000
    c.train.log_every = 100
    c.train.sample_every = 2000
    c.train.ema_decay = 0.999
    c.sample.num_images = 16

    if arg == "smoke":
        shrink_for_smoke(c)
        c.data.image_size = 16
        c.train.batch_size = 4
    return c
