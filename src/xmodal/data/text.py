"""Caption cleaning, tokenization and a word vocabulary."""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
_PUNCT = re.compile(r"[^\w\s]|_")


def clean_caption(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: 'A Dog, running!' -> 'a dog running'."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def tokenize(text: str) -> list[str]:
    return clean_caption(text).split()


class Vocabulary:
    """Word <-> id map with `<pad>`=0, `<start>`=1, `<end>`=2, `<unk>`=3."""

    def __init__(self, words: Sequence[str]):
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {tuple(words[:4])}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary words must be unique")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 1) -> Vocabulary:
        """Words seen at least `min_freq` times, most frequent first (ties alphabetical)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids = [self.index.get(w, self.unk_id) for w in tokenize(text)]
        return [self.start_id, *ids, self.end_id] if add_special else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first `<end>`, skipping `<pad>` and `<start>`."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            words.append(self.words[i] if 0 <= i < len(self.words) else UNK)
        return " ".join(words)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"words": self.words}, indent=0))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "words" not in data:
            raise ValueError(f"{path}: not a vocabulary file (expected {{'words': [...]}})")
        return cls(data["words"])


class UnknownWordsError(ValueError):
    """A prompt with words the text encoder cannot represent, asked to be strict about it."""


def check_texts(texts: Sequence[str]) -> list[str]:
    """Prompts as a list of non-empty strings (one string is one prompt), else a clear error."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("no prompts given")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"prompt {i} is a {type(t).__name__}, not a str")
        if not t.strip():
            raise ValueError(f"prompt {i} is empty")
    return texts


def report_unknown(unknown: dict[str, int], strict: bool) -> None:
    """Name every unknown word with its count: an error when strict, else a warning."""
    if not unknown:
        return
    listing = ", ".join(f"{w!r} x{n}" for w, n in sorted(unknown.items(), key=lambda kv: -kv[1]))
    message = f"{sum(unknown.values())} unknown word(s) the text encoder cannot represent: {listing}"
    if strict:
        raise UnknownWordsError(message)
    warnings.warn(message, stacklevel=4)


def word_ids(texts: Sequence[str], vocab: Vocabulary, strict: bool = False) -> list[list[int]]:
    """Each prompt's word ids in `vocab` (`<unk>` for a word it lacks, and for a prompt with no
    words); unknown words are named by `report_unknown`."""
    unknown: dict[str, int] = {}
    rows = []
    for t in check_texts(texts):
        words = tokenize(t)
        for w in words:
            if w not in vocab:
                unknown[w] = unknown.get(w, 0) + 1
        rows.append([vocab.index.get(w, Vocabulary.unk_id) for w in words] or [Vocabulary.unk_id])
    report_unknown(unknown, strict)
    return rows
