"""The book's flowers model, exactly ("Learn Generative AI with PyTorch", chapter 15).

    python scripts/train.py --config=configs/flowers.py --workdir=runs/flowers \
        --config.data.data_dir=DATA_DIR

Data: all 8,189 images of Oxford 102 flowers (train+validation+test) through
``tfds.data_source`` (prepare once with ``tfds build oxford_flowers102 --file_format=array_record
--data_dir=DATA_DIR``), shorter side resized to 64 (bilinear), centre crop 64, random horizontal
flip, scaled to [-1, 1]. Model: ``UNet()`` (hidden_dims (128, 256, 512, 1024), 133,417,219
parameters). Schedule: ``book_cosine`` with 1000 steps. Loss: L1 on eps. AdamW(lr 1e-4, b1 0.95,
b2 0.999, weight decay 1e-5, eps 1e-8); lr linear warmup over 300 updates from 0, then cosine to
0 at the last update. Batch 4, 100 epochs = 100 * ceil(8189 / 4) = 204,800 updates. No EMA, no
clipping, float32. Samples: 10 images, DDIM 50 steps, eta 1, clipped x0 (the book's sampler).

What to expect: a day or more on one GPU at batch 4 (the book's setting); samples become
flower-like after ~20 epochs. Better-than-book options are fields here, off by default:
``--config.train.ema_decay=0.9999``, ``--config.model.dtype=bfloat16``,
``--config.train.batch_size=64``, ``--config.loss=l2``, ``--config.optim.grad_clip_norm=1.0``.

Variant ``:smoke``: the same pipeline with a tiny network and a few steps (for tests, on
``tfds.testing.mock_data``).
"""

from jaxdiff.config_defaults import base_config, shrink_for_smoke
from jaxdiff.train import steps_for_epochs

NUM_IMAGES = 8189


def get_config(arg: str | None = None):
    if arg not in (None, "", "smoke"):
        raise ValueError(f"Unknown flowers config variant {arg!r}; use smoke or nothing.")
    c = base_config()
    c.data.name = "oxford_flowers102"
    c.data.split = "train+validation+test"
    c.data.image_size = 64
    c.data.channels = 3
    c.data.random_flip = True

    c.model.hidden_dims = (128, 256, 512, 1024)

    c.schedule.name = "book_cosine"
    c.schedule.num_train_timesteps = 1000
    c.loss = "l1"
    c.prediction_type = "epsilon"

    c.optim.learning_rate = 1e-4
    c.optim.b1 = 0.95
    c.optim.b2 = 0.999
    c.optim.weight_decay = 1e-5
    c.optim.eps = 1e-8
    c.optim.warmup_steps = 300
    c.optim.grad_clip_norm = 0.0

    c.train.batch_size = 4
    c.train.num_steps = steps_for_epochs(NUM_IMAGES, c.train.batch_size, 100)  # 204,800
    c.train.checkpoint_every = 2048
    c.train.log_every = 100
    c.train.sample_every = 20480
    c.train.ema_decay = 0.0

    # The book's sampler: DDIM, 50 steps, eta 1, x0 clipped and eps re-derived from it.
    c.sample.num_images = 10
    c.sample.num_steps = 50
    c.sample.eta = 1.0
    c.sample.clip_sample = True
    c.sample.use_clipped_model_output = True

    if arg == "smoke":
        shrink_for_smoke(c)
        c.data.image_size = 16
        c.train.batch_size = 8
    return c
