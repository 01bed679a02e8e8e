"""Checks of the music fields of a config, naming the field (called by ``validate_config``).

The ``train`` and ``optim`` fields are checked by :func:`jaxdiff.builders.validate_config` for
every task; this module checks ``data``, ``model``, ``eval`` and ``sample`` of a music config.
"""

from __future__ import annotations

import ml_collections

from jaxdiff.builders import DTYPES, _bool_field, _choice_field, _int_field, _real_field
from jaxdiff.music.data import COLLECTIONS, SPLITS
from jaxdiff.music.events import VOCAB_SIZE
from jaxdiff.music.training import MODEL_FIELDS


def validate_music_config(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the first bad music field of ``config``."""
    _choice_field(config, "data.name", COLLECTIONS)
    for name in ("split", "eval_split"):
        if name in config.data:
            _choice_field(config, f"data.{name}", SPLITS + ("train+validation",))
    _int_field(config, "data.max_pieces", low=0, hint="0 takes every piece.")
    _int_field(config, "data.num_threads", low=0)
    _int_field(config, "data.prefetch", low=0)
    unknown = sorted(set(config.model.keys()) - set(MODEL_FIELDS))
    if unknown:
        raise ValueError(f"config.model has fields MusicTransformer does not take: {unknown}; known: {list(MODEL_FIELDS)}.")
    num_layers = _int_field(config, "model.num_layers", low=1)
    heads = _int_field(config, "model.num_heads", low=1)
    width = _int_field(config, "model.embed_dim", low=1)
    if width % heads:
        raise ValueError(
            f"config.model.embed_dim={width} is not divisible by config.model.num_heads={heads}; "
            "each head takes embed_dim / num_heads channels."
        )
    _int_field(config, "model.vocab_size", low=VOCAB_SIZE, high=VOCAB_SIZE, hint="The event vocabulary has 390 ids.")
    max_len = _int_field(config, "model.max_len", low=2)
    _real_field(config, "model.dropout_rate", low=0.0, high=1.0, high_open=True)
    _choice_field(config, "model.dtype", tuple(DTYPES))
    del num_layers
    seq_len = _int_field(config, "data.seq_len", low=2, high=max_len,
                         hint=f"Windows cannot be longer than config.model.max_len={max_len} positions.")  # fmt: skip
    _int_field(config, "data.window_stride", low=0, hint="0 keeps the first window of each piece (the book).")
    del seq_len
    _int_field(config, "eval.max_windows", low=0, hint="0 evaluates every held-out window.")
    prompt = _int_field(config, "sample.prompt_len", low=1)
    tokens = _int_field(config, "sample.num_tokens", low=0)
    if prompt + tokens > max_len:
        raise ValueError(
            f"config.sample.prompt_len={prompt} + config.sample.num_tokens={tokens} exceeds "
            f"config.model.max_len={max_len}: the model has no positions past it."
        )
    _real_field(config, "sample.temperature", low=0.0, low_open=True)
    _bool_field(config, "sample.greedy")
    _bool_field(config, "sample.at_end")
