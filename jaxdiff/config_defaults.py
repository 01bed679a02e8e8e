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
    c.task = "diffusion"  # "diffusion" | "music" (jaxdiff.train.TASKS)

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
    # Stages (0 .. len(hidden_dims) - 2) whose down and up blocks end with self-attention;
    # None: the book's rule (the last one). E.g. --config.model.attention_stages="()".
    c.model.attention_stages = ml_collections.config_dict.placeholder(tuple)
    # Up stages with attention when they differ from attention_stages (None: the same indices,
    # the book's rule; up stage j works at down stage len(hidden_dims) - 2 - j's resolution).
    c.model.up_attention_stages = ml_collections.config_dict.placeholder(tuple)
    c.model.time_emb_dim = ml_collections.config_dict.placeholder(int)  # None: hidden_dims[0]

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "book_cosine"
    c.schedule.num_train_timesteps = 1000
    # SNR x snr_scale at every timestep (schedules.scale_snr; Hoogeboom et al. 2023's shift for
    # small or large images); 1 = the schedule as published.
    c.schedule.snr_scale = 1.0

    c.loss = "l2"  # "l1" | "l2"
    c.prediction_type = "epsilon"  # "epsilon" | "v_prediction" | "sample"
    c.loss_weighting = "none"  # "none" | "min_snr" (Hang et al. 2023; train.min_snr_weight)
    c.min_snr_gamma = 5.0

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 0
    c.optim.schedule = "warmup_cosine"  # or "constant" (after the warmup)
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
    c.train.ema_decay = 0.0  # 0: no EMA; else the EMA's largest decay
    c.train.ema_warmup = True  # decay min(ema_decay, (1 + n) / (10 + n)) at update n (train.ema_decay_at)
    c.train.label_dropout = 0.0  # classifier-free guidance dropout (conditional models)
    c.train.async_checkpointing = True
    c.train.distributed = False  # call jax.distributed.initialize() (multi-host)

    # Quality metrics computed on each sample grid and logged to metrics.jsonl.
    c.eval = ml_collections.ConfigDict()
    c.eval.digits_metrics = False  # digits FD and classifier confidence (digits data only)

    c.sample = ml_collections.ConfigDict()
    # ddim | ddpm | dpm++2m | dpm++3m | dpm++sde | unipc | euler | euler_a | heun | pndm
    # (jaxdiff.builders.SAMPLERS; the fields below say which samplers read them).
    c.sample.sampler = "ddim"
    c.sample.num_images = 64
    c.sample.num_steps = 50
    c.sample.eta = 0.0  # ddim
    c.sample.clip_sample = True
    # Re-derive eps from the clipped x0 (the book's DDIM): keeps each step consistent. Without
    # it, clipping plus classifier-free guidance at scale 3 wrecked conditional digits samples
    # (label accuracy 14% vs 100% with it).
    c.sample.use_clipped_model_output = True
    c.sample.at_end = True
    # Conditional models: sample grids and scripts/evaluate.py draw every class equally often,
    # with classifier-free guidance at this scale (0 or 1: plain conditional sampling).
    c.sample.guidance_scale = 0.0
    # Timesteps: "leading" | "trailing" | "linspace"; "": the sampler's own (leading for ddim, ddpm and
    # pndm, linspace for the others). steps_offset shifts "leading" timesteps (every sampler).
    c.sample.spacing = ""
    c.sample.steps_offset = 0
    # Karras et al. (2022) noise levels: dpm++2m, dpm++3m, dpm++sde, unipc, euler, euler_a, heun.
    c.sample.use_karras_sigmas = False
    # Multistep solvers (dpm++*, unipc): order 1-3 (0: the sampler's own, 3 for dpm++3m, else 2),
    # lower orders over the last steps (below 15 steps), the last noise level ("zero" | "sigma_min").
    c.sample.solver_order = 0
    c.sample.lower_order_final = True
    c.sample.final_sigmas_type = "zero"
    # DPM-Solver (dpm++*): "dpmsolver++" | "dpmsolver" | "sde-dpmsolver++" ("": the sampler's own:
    # sde-dpmsolver++ for dpm++sde, else dpmsolver++), and the second-order form "midpoint" | "heun".
    c.sample.dpm_algorithm_type = ""
    c.sample.dpm_solver_type = "midpoint"
    # UniPC: B(h) "bh1" | "bh2", and whether it works with the data (x0) or the noise prediction.
    c.sample.unipc_solver_type = "bh2"
    c.sample.unipc_predict_x0 = True
    # ddim, pndm: alphas_cumprod after the last step (0: the sampler's own, 1 for ddim, abar_0 for pndm).
    c.sample.final_alpha_cumprod = 0.0
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
