"""The book's music Transformer (chapter 14) trained on performance events.

    python scripts/train.py --config=configs/music.py --workdir=runs/music
    python scripts/generate_music.py --workdir=runs/music --out=out.mid --png=roll.png

The embedded default trains on the Bach scores of music21's corpus (410 works, no download;
every tenth piece held out), converted to MIDI and encoded once into ~/.cache/jaxdiff (a few
minutes the first time, with two processes). A 0.93M-parameter model of the book's design (4
blocks of 4 heads, width 128, 256 learned positions) learns from windows of 256 events cut every
128 events, batch 16, AdamW with warmup and cosine decay, for 360 steps: sized for 2 CPU cores
(6.6 minutes at a load average of 3.5-6; at most 15 minutes). Every 120 steps it logs the
held-out loss per event beside the unigram baseline (2.37 against 3.91 nats at the end) and
writes a continuation of a held-out prompt (64 events, decoded and re-encoded as the book does,
+ 192 new) to runs/music/samples/step_<n>.mid and .png.

Variants (``--config=configs/music.py:VARIANT``):
  book   the book's run: MAESTRO (``--config.data.path=DIR``; its csv split when present, else the
         json's), the first 2048 events of each performance (one pair per file), the 20.4M-parameter
         model, Adam(1e-4) with no schedule, gradient clipping at 1, batch 2, 100 epochs of the 967
         training files (48,400 steps); samples 1000 tokens after a 250-event prompt at temperature 1.
  smoke  a tiny model and a few steps on the first 10 chorales (tests).
"""

import ml_collections

from jaxdiff.config_defaults import base_config


def get_config(arg: str | None = None):
    variants = set(filter(None, (arg or "").replace("_", ",").split(",")))
    unknown = variants - {"book", "smoke"}
    if unknown:
        raise ValueError(f"Unknown music config variant(s) {sorted(unknown)}; use book or smoke.")

    c = base_config()  # train and optim fields shared with every task
    for section in ("data", "model", "schedule", "eval", "sample"):
        del c[section]
    for field in ("loss", "prediction_type", "loss_weighting", "min_snr_gamma"):
        del c[field]
    c.task = "music"

    c.data = ml_collections.ConfigDict()
    c.data.name = "bach_chorales"  # "bach_chorales" (embedded) | "maestro" (data.path)
    c.data.path = ""  # the MAESTRO folder
    c.data.cache_dir = ""  # "": $JAXDIFF_CACHE or ~/.cache/jaxdiff
    c.data.split = "train"
    c.data.eval_split = "validation"
    c.data.max_pieces = 0  # 0: all
    c.data.seq_len = 256  # events per training window
    c.data.window_stride = 128  # 0: only the first window of each piece (the book)
    c.data.num_threads = 2
    c.data.prefetch = 4

    # Fields of jaxdiff.music.MusicTransformer.
    c.model = ml_collections.ConfigDict()
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.embed_dim = 128
    c.model.vocab_size = 390
    c.model.max_len = 256
    c.model.dropout_rate = 0.1
    c.model.dtype = "float32"

    c.optim.learning_rate = 2e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.weight_decay = 0.01
    c.optim.warmup_steps = 30
    c.optim.grad_clip_norm = 1.0
    c.optim.schedule = "warmup_cosine"

    c.train.num_steps = 360
    c.train.batch_size = 16
    c.train.checkpoint_every = 120
    c.train.log_every = 10
    c.train.sample_every = 120

    c.eval = ml_collections.ConfigDict()
    c.eval.max_windows = 96  # held-out windows per evaluation (0: all)

    c.sample = ml_collections.ConfigDict()
    c.sample.prompt_len = 64  # events of the held-out prompt (before the book's decode/re-encode)
    c.sample.num_tokens = 192  # new events
    c.sample.temperature = 1.0
    c.sample.greedy = False
    c.sample.at_end = True

    if "book" in variants:
        c.data.name = "maestro"
        c.data.seq_len = 2048
        c.data.window_stride = 0
        c.model.num_layers, c.model.num_heads, c.model.embed_dim, c.model.max_len = 6, 8, 512, 2048
        c.optim.learning_rate = 1e-4
        c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay = 0.9, 0.999, 1e-8, 0.0
        c.optim.warmup_steps = 0
        c.optim.grad_clip_norm = 1.0
        c.optim.schedule = "constant"
        c.train.batch_size = 2
        c.train.num_steps = 100 * 484  # 100 epochs of 967 pairs in batches of 2 (the last one short)
        c.train.checkpoint_every = 2000
        c.train.log_every = 100
        c.train.sample_every = 4840
        c.eval.max_windows = 0
        c.sample.prompt_len = 250
        c.sample.num_tokens = 1000

    if "smoke" in variants:
        c.data.max_pieces = 10  # nine to train on, one held out
        c.data.seq_len = 32
        c.data.window_stride = 32
        c.data.num_threads = 1
        c.model.num_layers, c.model.num_heads, c.model.embed_dim, c.model.max_len = 1, 2, 16, 64
        c.optim.warmup_steps = 2
        c.train.num_steps = 6
        c.train.batch_size = 8
        c.train.checkpoint_every = 3
        c.train.log_every = 2
        c.train.sample_every = 0
        c.train.async_checkpointing = False
        c.eval.max_windows = 8
        c.sample.prompt_len = 16
        c.sample.num_tokens = 16
    return c
