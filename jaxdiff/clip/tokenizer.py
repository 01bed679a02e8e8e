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
import json
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


def _read_hf_vocab(folder: str) -> tuple[dict[str, int], list[tuple[str, ...]], dict[str, int]]:
    """``(vocab, merges, added_tokens)`` of a Hugging Face BPE tokenizer folder."""
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    json_path = os.path.join(folder, "tokenizer.json")
    added: dict[str, int] = {}
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        added_path = os.path.join(folder, "added_tokens.json")
        if os.path.isfile(added_path):
            with open(added_path, encoding="utf-8") as f:
                added = {str(k): int(v) for k, v in json.load(f).items()}
    elif os.path.isfile(json_path):
        with open(json_path, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec["model"]
        if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
            raise ValueError(f"{json_path!r} is not a CLIP BPE tokenizer (model {model.get('type')!r})")
        vocab = model["vocab"]
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        added = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])}
    else:
        raise FileNotFoundError(
            f"no CLIP tokenizer in {folder!r}: expected vocab.json and merges.txt (or tokenizer.json), as "
            "`CLIPTokenizer.save_pretrained` writes them"
        )
    return vocab, merges, added



class Tokenizer:
    """CLIP's byte-level BPE tokenizer (open_clip ``SimpleTokenizer`` with ``clean="lower"``).

    Calling it returns ``int32`` ids of shape ``[len(texts), context_length]``: each row is
    ``<start_of_text>``, the BPE tokens of the cleaned, lower-cased text and ``<end_of_text>``,
    padded with ``pad_token_id`` (0). A text too long for the context is truncated and its last id is replaced by
    ``<end_of_text>``, exactly as open_clip does, so EOT pooling still finds it.

    Args:
        bpe_path: merges file (gzip text); defaults to the vocabulary bundled with jaxdiff.
        context_length: default context length for ``__call__``.
        pad_token_id: the id that fills each row after ``<end_of_text>`` (0, as open_clip).

    :meth:`from_pretrained` reads instead a Hugging Face ``CLIPTokenizer`` folder (Stable
    Diffusion's ``tokenizer/``) and reproduces that tokenizer: its vocabulary, its own pad token
    (``<|endoftext|>`` for SD 1.x, ``!`` for SD 2.x), and its special tokens, which are split off
    the raw text before cleaning and BPE, so with SD 2.x's tokenizer a ``!`` inside a prompt is
    the pad token's id too. :meth:`save_pretrained` writes such a folder.

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
        *,
        pad_token_id: int = 0,
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
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [v + "</w>" for v in byte_chars]
        vocab.extend("".join(m) for m in merges)
        special_tokens = ["<start_of_text>", "<end_of_text>"]
        vocab.extend(special_tokens)
        self._setup(
            {t: i for i, t in enumerate(vocab)}, merges, special_tokens, "<start_of_text>", "<end_of_text>",
            context_length=context_length, pad_token_id=pad_token_id, split_specials_first=False,
        )

    def _setup(
        self,
        encoder: dict[str, int],
        merges: Sequence[tuple[str, ...]],
        special_tokens: Sequence[str],
        bos_token: str,
        eos_token: str,
        *,
        context_length: int,
        pad_token_id: int,
        split_specials_first: bool,
    ) -> None:
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.encoder: dict[str, int] = dict(encoder)
        self.decoder: dict[int, str] = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, ...], int] = {tuple(m): i for i, m in enumerate(merges)}
        self.special_tokens: dict[str, int] = {t: self.encoder[t] for t in special_tokens}
        self._cache: dict[str, str] = {t: t for t in special_tokens}
        # open_clip matches its two special tokens inside the cleaned text; Hugging Face splits
        # every special token off the raw text first (longest first), then cleans the pieces.
        self._special_split = None
        if split_specials_first:
            alternatives = "|".join(regex.escape(t) for t in sorted(special_tokens, key=len, reverse=True))
            self._special_split = regex.compile(f"({alternatives})")
        in_text = [regex.escape(t) for t in (bos_token, eos_token)]
        self._pat = regex.compile(
            "|".join(in_text) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder[bos_token]
        self.eot_token_id = self.encoder[eos_token]
        self.pad_token_id = int(pad_token_id)
        self.context_length = context_length
        self._bos_token, self._eos_token = bos_token, eos_token

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], context_length: int | None = None) -> Tokenizer:
        """The tokenizer of a Hugging Face ``CLIPTokenizer`` folder (e.g. Stable Diffusion's ``tokenizer/``).

        Reads ``vocab.json`` + ``merges.txt`` or ``tokenizer.json``, and the special tokens and
        ``model_max_length`` from ``tokenizer_config.json`` / ``special_tokens_map.json``
        (defaults as ``CLIPTokenizer``: ``<|startoftext|>``, ``<|endoftext|>``, pad
        ``<|endoftext|>``). ``context_length`` defaults to ``model_max_length`` (77 when unset).

        Example:
            >>> tok = Tokenizer.from_pretrained("sd-2-1/tokenizer")  # doctest: +SKIP
            >>> tok(["wow!"], context_length=6).tolist()              # doctest: +SKIP
            [[49406, 2781, 0, 49407, 0, 0]]
        """
        folder = os.fspath(folder)
        vocab, merges, added = _read_hf_vocab(folder)
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    config.update({k: v for k, v in json.load(f).items() if v is not None})

        def token(key: str, default: str) -> str:
            value = config.get(key, default)
            return value["content"] if isinstance(value, dict) else str(value)

        bos, eos = token("bos_token", "<|startoftext|>"), token("eos_token", "<|endoftext|>")
        pad, unk = token("pad_token", "<|endoftext|>"), token("unk_token", "<|endoftext|>")
        vocab = {**vocab, **added}
        specials = [t for t in dict.fromkeys([bos, eos, pad, unk, *added]) if t in vocab]
        if context_length is None:
            max_length = config.get("model_max_length")
            context_length = int(max_length) if max_length and max_length < 10**6 else DEFAULT_CONTEXT_LENGTH
        tok = cls.__new__(cls)
        tok._setup(vocab, merges, specials, bos, eos, context_length=context_length, pad_token_id=vocab[pad],
                   split_specials_first=True)
        return tok

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write a Hugging Face ``CLIPTokenizer`` folder (``vocab.json``, ``merges.txt``, configs).

        ``transformers.CLIPTokenizer.from_pretrained(folder)`` and :meth:`from_pretrained` read it
        back with the same ids; the open_clip names of the start / end tokens are written as
        ``<|startoftext|>`` / ``<|endoftext|>`` (same ids).
        """
        os.makedirs(folder, exist_ok=True)
        rename = {self._bos_token: "<|startoftext|>", self._eos_token: "<|endoftext|>"}
        vocab = {rename.get(t, t): i for t, i in self.encoder.items()}
        pad = rename.get(self.decoder[self.pad_token_id], self.decoder[self.pad_token_id])
        merges = sorted(self.bpe_ranks, key=self.bpe_ranks.get)
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges))
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": pad}
        with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump(special, f, indent=2)
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": self.context_length,
                       "do_lower_case": True, "errors": "replace", "add_prefix_space": False}, f, indent=2)

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
        if self._special_split is not None:
            ids: list[int] = []
            for i, piece in enumerate(self._special_split.split(text)):
                ids.extend([self.special_tokens[piece]] if i % 2 else self._encode_clean(piece))
            return ids
        return self._encode_clean(text)

    def _encode_clean(self, text: str) -> list[int]:
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
        result = np.full((len(texts), context_length), self.pad_token_id, dtype=np.int32)
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
