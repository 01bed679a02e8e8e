"""The fields every jaxdiff training config has, with neutral defaults.

Config files (``configs/*.py``) start from :func:`base_config` and set what their experiment
needs; scripts override any field from the command line (``--config.train.num_steps=100``).
Field names under ``train`` and ``data`` are a public contract used by the docs and scripts.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """A complete config with neutral defaults (unconditional, float32, no EMA)."""
    c = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # "digits" | "oxford_flowers102" | "image_folder"
    c.data.image_size = 16
    c.data.channels = 1
    c.data.data_dir = ""  # TFDS data_dir ("" = TFDS default)
    c.data.path = ""  # image_folder root
    c.data.split = "train+validation+test"
    c.data.random_flip = False
    c.data.skip_corrupt = False
    c.data.num_threads = 2
    c.data.prefetch = 4

    # Fields of jaxdiff.models.UNet (in/out channels come from data.channels).
    c.model = ml_collections.ConfigDict()
    c.model.kind = "unet"  # "unet" | "diffusers" (a pretrained diffusers UNet2DModel folder)
    c.model.pretrained = ""  # with kind="diffusers": the checkpoint folder
    c.model.hidden_dims = (128, 256, 512, 1024)
    c.model.num_classes = 0  # 0: unconditional
    c.model.dtype = "float32"  # computation dtype; params stay float32
    c.model.remat = False
    c.model.norm_groups = 8
    c.model.heads = 4
    c.model.head_dim = 32
    c.model.attention_impl = ""  # "": chosen by backend

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "book_cosine"
    c.schedule.num_train_timesteps = 1000

    c.loss = "l2"  # "l1" | "l2"
    c.prediction_type = "epsilon"  # "epsilon" | "v_prediction" | "sample"

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 0
    c.optim.grad_clip_norm = 0.0  # 0: off
    c.optim.grad_accum_steps = 1

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.batch_size = 64
    c.train.seed = 0
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.log_every = 50
    c.train.sample_every = 0  # 0: only at the end
    c.train.ema_decay = 0.0  # 0: no EMA
    c.train.label_dropout = 0.0  # classifier-free guidance dropout (conditional models)
    c.train.async_checkpointing = True
    c.train.distributed = False  # call jax.distributed.initialize() (multi-host)

    # Quality metrics computed on each sample grid and logged to metrics.jsonl.
    c.eval = ml_collections.ConfigDict()
    c.eval.digits_metrics = False  # digits FD and classifier confidence (digits data only)

    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ddim"
    c.sample.num_images = 64
    c.sample.num_steps = 50
    c.sample.eta = 0.0
    c.sample.clip_sample = True
    # Re-derive eps from the clipped x0 (the book's DDIM): keeps each step consistent. Without
    # it, clipping plus classifier-free guidance at scale 3 wrecked conditional digits samples
    # (label accuracy 14% vs 100% with it).
    c.sample.use_clipped_model_output = True
    c.sample.at_end = True
    return c


def shrink_for_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns a config into a seconds-long smoke run (tiny U-Net, few steps, synchronous saves).

    Used by the ``:smoke`` variants of every config, which tests and CI run.
    """
    c.model.hidden_dims = (8, 16, 16)
    c.model.norm_groups = 4
    c.model.heads = 2
    c.model.head_dim = 8
    c.optim.warmup_steps = min(c.optim.warmup_steps, 2)
    c.train.num_steps = 4
    c.train.checkpoint_every = 2
    c.train.log_every = 2
    c.train.sample_every = 0
    c.train.async_checkpointing = False
    c.data.num_threads = 1
    c.sample.num_images = 4
    c.sample.num_steps = 3
    return c
