"""CLIP's byte-level BPE tokenizer, token-for-token identical to open_clip's ``SimpleTokenizer``.

The vocabulary (``bpe_simple_vocab_16e6.txt.gz``, 49,408 tokens) is the one OpenAI released with
CLIP (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language
Supervision", https://arxiv.org/abs/2103.00020) and that open_clip (Ilharco et al., 2021,
https://github.com/mlfoundations/open_clip) ships; it is bundled with jaxdiff as package data
(MIT license, see ``THIRD_PARTY_LICENSE.txt``), so tokenizing needs no download.

Text cleaning follows open_clip's default (``clean="lower"``): ``ftfy.fix_text``, HTML unescaping
(twice), whitespace collapsing and lower-casing. ``ftfy`` is an optional dependency: without it a
small built-in subset of its fixes is used (NFC normalisation, straight quotes, Latin ligatures,
full-width characters), which agrees with ftfy on ordinary text but not on mojibake repair; a
``UserWarning`` says so once.

Example:
    >>> from jaxdiff.clip import Tokenizer
    >>> tok = Tokenizer()
    >>> ids = tok(["a photo of a cat", ""], context_length=8)
    >>> ids.shape, ids.dtype.name
    ((2, 8), 'int32')
    >>> ids[1].tolist()  # empty text: start, end, then zero padding
    [49406, 49407, 0, 0, 0, 0, 0, 0]
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import itertools
import os
import unicodedata
import warnings
from collections.abc import Sequence

import numpy as np
import regex

__all__ = [
    "DEFAULT_CONTEXT_LENGTH",
    "Tokenizer",
    "basic_clean",
    "bytes_to_unicode",
    "default_bpe_path",
    "tokenize",
    "whitespace_clean",
]

DEFAULT_CONTEXT_LENGTH = 77
"""Context length of every OpenAI / open_clip CLIP text tower."""

_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2


def default_bpe_path() -> str:
    """Path of the BPE merges file bundled with ``jaxdiff.clip``."""
    return str(importlib.resources.files(__package__).joinpath(_VOCAB_FILE))


@functools.lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Reversible map from the 256 byte values to printable unicode characters (GPT-2 / CLIP)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(itertools.pairwise(word))


# --- text cleaning ---------------------------------------------------------------------------

_QUOTES = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
        "\u02bc": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
        "\u2033": '"',
    }
)
_LIGATURES = str.maketrans(
    {"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
     "\ufb05": "ſt", "\ufb06": "st", "\u0132": "IJ", "\u0133": "ij", "\u01c7": "LJ",
     "\u01c8": "Lj", "\u01c9": "lj", "\u01ca": "NJ", "\u01cb": "Nj", "\u01cc": "nj"}
)


def _fallback_fix_text(text: str) -> str:
    """The subset of ``ftfy.fix_text`` that needs no statistics: used when ftfy is missing."""
    text = text.translate(_LIGATURES)
    # Full-width ASCII (U+FF01..U+FF5E) and the ideographic space to their half-width forms.
    text = "".join(
        chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else (" " if c == "\u3000" else c)
        for c in text
    )
    text = text.translate(_QUOTES)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u2028", "\n").replace("\u2029", "\n").replace("\x85", "\n")
    return unicodedata.normalize("NFC", text)


@functools.lru_cache(maxsize=1)
def _fix_text_fn():
    try:
        import ftfy
    except ImportError:
        warnings.warn(
            "jaxdiff.clip: `ftfy` is not installed; using a built-in subset of its text fixes. "
            "Token ids match open_clip's on ordinary text; `pip install ftfy` for exact parity.",
            UserWarning,
            stacklevel=3,
        )
        return _fallback_fix_text
    return ftfy.fix_text


def basic_clean(text: str) -> str:
    """open_clip's ``basic_clean``: ``ftfy.fix_text``, double HTML unescape, strip."""
    text = _fix_text_fn()(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return " ".join(text.split()).strip()


# --- tokenizer -------------------------------------------------------------------------------


class Tokenizer:
    """CLIP's byte-level BPE tokenizer (open_clip ``SimpleTokenizer`` with ``clean="lower"``).

    Calling it returns ``int32`` ids of shape ``[len(texts), context_length]``: each row is
    ``<start_of_text>``, the BPE tokens of the cleaned, lower-cased text and ``<end_of_text>``,
    padded with 0. A text too long for the context is truncated and its last id is replaced by
    ``<end_of_text>``, exactly as open_clip does, so EOT pooling still finds it.

    Args:
        bpe_path: merges file (gzip text); defaults to the vocabulary bundled with jaxdiff.
        context_length: default context length for ``__call__``.

    Example:
        >>> tok = Tokenizer()
        >>> tok.encode("Hello, world!")
        [3306, 267, 1002, 256]
        >>> tok.decode(tok.encode("Hello, world!"))
        'hello , world ! '
        >>> tok(["hello world"] , context_length=5)[0].tolist()
        [49406, 3306, 1002, 49407, 0]
    """

    def __init__(
        self,
        bpe_path: str | os.PathLike[str] | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
    ) -> None:
        bpe_path = default_bpe_path() if bpe_path is None else os.fspath(bpe_path)
        if not os.path.exists(bpe_path):
            raise FileNotFoundError(
                f"CLIP BPE vocabulary not found at {bpe_path!r}. It ships inside the jaxdiff "
                f"package as jaxdiff/clip/{_VOCAB_FILE}; reinstall jaxdiff or pass `bpe_path`."
            )
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(m.split()) for m in lines[1 : _NUM_MERGES + 1]]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend("".join(m) for m in merges)
        special_tokens = ["<start_of_text>", "<end_of_text>"]
        vocab.extend(special_tokens)
        self.encoder: dict[str, int] = {t: i for i, t in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, ...], int] = {m: i for i, m in enumerate(merges)}
        self._cache: dict[str, str] = {t: t for t in special_tokens}
        self._pat = regex.compile(
            "|".join(special_tokens)
            + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder["<start_of_text>"]
        self.eot_token_id = self.encoder["<end_of_text>"]
        self.context_length = context_length

    def _bpe(self, token: str) -> str:
        if token in self._cache:
            return self._cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _get_pairs(word)
        out = " ".join(word)
        self._cache[token] = out
        return out

    @staticmethod
    def clean(text: str) -> str:
        """open_clip's default cleaning: ``whitespace_clean(basic_clean(text)).lower()``."""
        return whitespace_clean(basic_clean(text)).lower()

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` after cleaning, without start/end tokens."""
        ids: list[int] = []
        for token in regex.findall(self._pat, self.clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(token).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (word ends become spaces); padding zeros must be removed first."""
        text = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """Token ids, ``int32`` of shape ``[len(texts), context_length]`` (see class doc)."""
        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        result = np.zeros((len(texts), context_length), dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_token_id
            result[row, : len(ids)] = ids
        return result


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
    """Tokenize with the bundled CLIP vocabulary (cached tokenizer); see :class:`Tokenizer`.

    Example:
        >>> tokenize("a diagram", context_length=6).tolist()
        [[49406, 320, 22697, 49407, 0, 0]]
    """
    return _default_tokenizer()(texts, context_length=context_length)
