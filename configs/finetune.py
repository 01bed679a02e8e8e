"""Fine-tune a pretrained diffusers ``UNet2DModel`` on a folder of images.

The hands-on notebook's workflow: start from ``google/ddpm-cat-256`` and fine-tune it on dog
photos with a small learning rate, MSE loss and gradient accumulation, then sample with DDIM.

    # once, on a machine with internet access:
    huggingface-cli download google/ddpm-cat-256 --local-dir checkpoints/ddpm-cat-256
    python scripts/train.py --config=configs/finetune.py --workdir=runs/cat2dog \
        --config.model.pretrained=checkpoints/ddpm-cat-256 --config.data.path=photos/dogs

The schedule and prediction type come from the checkpoint's ``scheduler/scheduler_config.json``
(``schedule.name = "from_pretrained"``). Checkpoints, exact resume, metrics and sample grids are
those of every training run. Export the result for diffusers with
``jaxdiff.pretrained.save_diffusers(params, config_json, path)``.

Defaults follow the notebook: 256x256 RGB, batch 4 with 2 accumulation steps (an effective
batch of 8), AdamW lr 1e-5, L2 loss on eps, DDIM 40 steps for the sample grids. Expect a few
hundred updates on a GPU before the samples drift from cats to dogs.

Variant ``:smoke``: few steps at 32x32 with a larger learning rate (tests, with a tiny
random-weight stand-in checkpoint).
"""

from jaxdiff.config_defaults import base_config, shrink_for_smoke


def get_config(arg: str | None = None):
    if arg not in (None, "", "smoke"):
        raise ValueError(f"Unknown finetune config variant {arg!r}; use smoke or nothing.")
    c = base_config()
    c.model.kind = "diffusers"
    c.model.pretrained = ""  # required: the diffusers checkpoint folder

    c.data.name = "image_folder"
    c.data.path = ""  # required: the folder of images
    c.data.image_size = 256
    c.data.channels = 3
    c.data.random_flip = True

    c.schedule.name = "from_pretrained"
    c.loss = "l2"
    c.prediction_type = "epsilon"

    c.optim.learning_rate = 1e-5
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.optim.grad_accum_steps = 2

    c.train.batch_size = 4
    c.train.num_steps = 2000
    c.train.checkpoint_every = 200
    c.train.log_every = 10
    c.train.sample_every = 500
    c.train.ema_decay = 0.0

    c.sample.num_images = 8
    c.sample.num_steps = 40
    c.sample.eta = 0.0

    if arg == "smoke":
        shrink_for_smoke(c)  # the network comes from the checkpoint: only the run shrinks
        c.data.image_size = 32
        c.optim.learning_rate = 1e-3
        c.train.batch_size = 8
        c.train.num_steps = 20
        c.train.checkpoint_every = 10
        c.train.log_every = 1
        c.sample.num_images = 2
    return c
