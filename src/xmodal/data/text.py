"""Caption cleaning, tokenization and a word vocabulary."""

from __future__ import annotations

import json
import re
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
