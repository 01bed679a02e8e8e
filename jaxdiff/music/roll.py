"""Piano-roll pictures of event sequences (people look before they listen).

Example::

    save_piano_roll(seq, "roll.png", prompt_len=250)   # prompt notes blue, continuation orange
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jaxdiff.music.events import decode_notes, event_times

PROMPT_COLOUR = (52, 101, 164)
CONTINUATION_COLOUR = (230, 115, 0)
_BACKGROUND = (255, 255, 255)
_GRID = (225, 225, 225)


def prompt_end_time(ids: Sequence[int], prompt_len: int) -> float:
    """The decoder's clock (seconds) after the first ``prompt_len`` events."""
    return float(event_times(ids[:prompt_len])[-1]) if prompt_len > 0 else 0.0


def piano_roll(ids: Sequence[int], prompt_len: int = 0, *, pixels_per_second: float = 80.0, pitch_pixels: int = 6,
               max_width: int = 4000) -> np.ndarray:  # fmt: skip
    """``uint8 [H, W, 3]``: one bar per decoded note, pitch upwards, time to the right.

    Notes that start before the end of the first ``prompt_len`` events are drawn in
    :data:`PROMPT_COLOUR`, later ones in :data:`CONTINUATION_COLOUR`; a grey line marks the
    boundary and faint lines mark every C.
    """
    ids = np.asarray(ids)
    notes = decode_notes(ids)
    boundary = prompt_end_time(ids, prompt_len)
    end = max([n[3] for n in notes] + [float(event_times(ids)[-1]) if len(ids) else 0.0, 1.0])
    pps = min(pixels_per_second, max_width / end)
    pitches = [n[1] for n in notes] or [60]
    low, high = min(pitches) - 2, max(pitches) + 2
    if high - low < 24:
        low, high = (low + high) // 2 - 12, (low + high) // 2 + 12
    width, height = int(end * pps) + 2, (high - low + 1) * pitch_pixels
    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    y_of = lambda pitch: (high - pitch) * pitch_pixels  # noqa: E731
    for pitch in range(low, high + 1):
        if pitch % 12 == 0:
            draw.line([(0, y_of(pitch) + pitch_pixels - 1), (width, y_of(pitch) + pitch_pixels - 1)], fill=_GRID)
    for _, pitch, start, stop in notes:
        colour = PROMPT_COLOUR if start < boundary else CONTINUATION_COLOUR
        x0, x1 = int(start * pps), max(int(start * pps) + 1, int(stop * pps) - 1)
        draw.rectangle([x0, y_of(pitch), x1, y_of(pitch) + pitch_pixels - 2], fill=colour)
    if prompt_len > 0:
        draw.line([(int(boundary * pps), 0), (int(boundary * pps), height)], fill=(120, 120, 120), width=1)
    return np.asarray(image)


def save_piano_roll(ids: Sequence[int], path: str | os.PathLike, prompt_len: int = 0, **kwargs) -> Path:
    """Writes :func:`piano_roll` as a PNG (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(piano_roll(ids, prompt_len, **kwargs)).save(path)
    return path
