"""The book's music Transformer (chapter 14): MIDI events, the model, training data, generation.

Example::

    from jaxdiff import music
    ids = music.encode_midi("prelude.mid")                # np.int32 [N]: the book's event ids
    model = music.MusicTransformer()                       # the book's model, 20,363,264 parameters
    params = music.init_params(model, jax.random.key(0))
    seq = music.generate(model, params, ids[None, :250], jax.random.key(1), num_tokens=1000)
    music.decode_midi(seq[0], path="continuation.mid")
"""

from jaxdiff.music.events import (
    END_ID,
    NUM_EVENTS,
    PAD_ID,
    VOCAB_SIZE,
    decode_midi,
    decode_notes,
    describe,
    encode_midi,
)
from jaxdiff.music.model import (
    MusicTransformer,
    count_params,
    generate,
    generate_recompute,
    init_cache,
    init_params,
)
from jaxdiff.music.roll import piano_roll, save_piano_roll
from jaxdiff.music.state_dict import music_params_from_torch, music_params_to_torch

__all__ = [
    "END_ID",
    "NUM_EVENTS",
    "PAD_ID",
    "VOCAB_SIZE",
    "MusicTransformer",
    "count_params",
    "decode_midi",
    "decode_notes",
    "describe",
    "encode_midi",
    "generate",
    "generate_recompute",
    "init_cache",
    "init_params",
    "music_params_from_torch",
    "music_params_to_torch",
    "piano_roll",
    "save_piano_roll",
]
