"""Continue a MIDI prompt with a trained music Transformer (what ``scripts/generate_music.py`` runs).

The weights come from a training run's ``workdir`` (its newest checkpoint and config) or from a
``.pth`` of the book's PyTorch weights (``music_params_from_torch``; the book's sizes are read
from the tensors, the head count cannot be and defaults to the book's 8).

Example::

    seq = continue_midi(workdir="runs/music", prompt_midi="in.mid", prompt_len=250,
                        num_tokens=1000, temperature=1.0, out="out.mid", png="roll.png")
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from jaxdiff.music.events import decode_midi, encode_midi
from jaxdiff.music.model import MusicTransformer, generate
from jaxdiff.music.roll import save_piano_roll
from jaxdiff.music.state_dict import music_params_from_torch


def load_book_checkpoint(path: str | os.PathLike, num_heads: int = 8) -> tuple[MusicTransformer, dict]:
    """``(model, params)`` from a ``.pth`` state_dict of the book's model (sizes from the tensors)."""
    import torch

    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    params = music_params_from_torch(state_dict)
    vocab, width = params["wte"]["embedding"].shape
    model = MusicTransformer(num_layers=sum(1 for k in params if k.startswith("h_")), num_heads=num_heads,
                             embed_dim=width, vocab_size=vocab, max_len=params["wpe"]["embedding"].shape[0])  # fmt: skip
    return model, params


def continue_midi(
    *,
    out: str | os.PathLike,
    workdir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    prompt_midi: str | os.PathLike | None = None,
    prompt_len: int = 250,
    num_tokens: int = 1000,
    temperature: float = 1.0,
    greedy: bool = False,
    seed: int = 0,
    png: str | os.PathLike | None = None,
    num_heads: int = 8,
) -> np.ndarray:
    """Generates a continuation and writes it as MIDI (and a piano roll); returns the ids ``[P + num_tokens]``.

    The prompt is the first ``prompt_len`` events of ``prompt_midi``; without one, the held-out
    prompt of the run's data (``workdir`` needed). ``checkpoint`` (a ``.pth``) takes precedence
    over the workdir's weights.
    """
    config = None
    if checkpoint is not None:
        model, params = load_book_checkpoint(checkpoint, num_heads)
    elif workdir is not None:
        from jaxdiff.music.training import load_music_run

        config, model, params, _ = load_music_run(str(workdir))
    else:
        raise ValueError("pass --workdir (a music training run) or --checkpoint (a .pth of the book's weights).")
    if prompt_midi is not None:
        prompt = encode_midi(prompt_midi)[:prompt_len]
        if prompt.size == 0:
            raise ValueError(f"{prompt_midi} encodes to no events: nothing to continue.")
    else:
        if config is None:
            from jaxdiff import checkpoint as ckpt

            if workdir is None:
                raise ValueError("without --prompt_midi the prompt is a held-out piece of a run: pass --workdir.")
            config = ckpt.read_config(workdir)
        from jaxdiff.music import data as music_data
        from jaxdiff.music.training import held_out_prompt

        pieces = music_data.load_pieces(config.data, config.data.get("eval_split", "validation"))
        prompt = held_out_prompt(pieces, prompt_len)
    room = model.max_len - len(prompt)
    if num_tokens > room:
        raise ValueError(
            f"--num_tokens={num_tokens} with a {len(prompt)}-event prompt exceeds the model's {model.max_len} "
            f"positions; use at most {room}."
        )
    seq = generate(model, params, prompt[None], jax.random.key(seed), num_tokens=num_tokens,
                   temperature=temperature, greedy=greedy)  # fmt: skip
    seq = np.asarray(jax.device_get(seq))[0]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    decode_midi(seq, path=out)
    if png is not None:
        save_piano_roll(seq, png, prompt_len=len(prompt))
    return seq
