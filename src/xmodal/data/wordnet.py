"""Unseen words read as training words through WordNet's noun hierarchy (Miller 1995).

A text encoder that snaps prompts to training captions (`TextEncoderConfig.snap`) knows words
by their place in a sentence encoder's space, which places some garment words far from their
kind ("a jumper" nearest "a sneaker"). WordNet knows that a jumper is a sweater, a frock a
dress, a parka a coat. `hypernym_lexicon` builds, once at training time, the map from every
WordNet noun that is no training word to the training word it is a kind of; `rewrite` applies
it to a prompt before the snap. The map is saved with the model: WordNet itself is needed only
to build it (Debian's `wordnet-base` installs the database in /usr/share/wordnet).

- Targets: the head noun (last word) of each training caption, and the caption bigrams that
  are WordNet nouns ("t shirt", "shoulder bag"): the words that name what a caption shows.
- A word's meaning: its first sense, in WordNet's order (most frequent first), whose synset or
  hypernyms name a target, nearest first, at most `max_hops` levels up; a whole lemma beats the
  last word of a compound ("gym_shoe" names "shoe" only when no synonym names a target).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path

from xmodal.data.text import tokenize

DEFAULT_WORDNET = Path("/usr/share/wordnet")
MAX_HOPS = 8
_SUFFIXES = (("ies", "y"), ("ses", "s"), ("xes", "x"), ("ches", "ch"), ("shes", "sh"), ("men", "man"), ("s", ""))


class WordNetError(ValueError):
    """A WordNet folder that is missing or not readable as WordNet's database files."""


def _lemma(text: str) -> str:
    """A WordNet lemma ("flip-flop", "T-shirt", "blue_jean") as our words joined by "_"."""
    return "_".join(tokenize(text.replace("_", " ")))


def base_forms(word: str) -> list[str]:
    """The word, then its singulars by WordNet's suffix rules."""
    forms = [word]
    for suffix, replacement in _SUFFIXES:
        if word.endswith(suffix) and len(word) > len(suffix):
            forms.append(word[: -len(suffix)] + replacement)
    return forms


class NounHierarchy:
    """WordNet's nouns: lemma -> sense ids (most frequent first), sense id -> (lemmas, hypernym ids)."""

    def __init__(self, folder: str | Path = DEFAULT_WORDNET):
        folder = Path(folder)
        if not (folder / "index.noun").is_file() or not (folder / "data.noun").is_file():
            raise WordNetError(f"{folder}: no WordNet database (index.noun, data.noun); "
                               f"apt install wordnet-base installs one in {DEFAULT_WORDNET}")
        self.senses: dict[str, list[str]] = {}
        self.synsets: dict[str, tuple[list[str], list[str]]] = {}
        self._read(folder / "index.noun", self._index_line)
        self._read(folder / "data.noun", self._data_line)
        if not self.senses or not self.synsets:
            raise WordNetError(f"{folder}: index.noun or data.noun holds no entries")

    @staticmethod
    def _read(path: Path, parse) -> None:
        with path.open(encoding="latin-1") as f:
            for line_no, line in enumerate(f, start=1):
                if line[:1].isspace() or not line.strip():  # the licence header
                    continue
                try:
                    parse(line)
                except (IndexError, ValueError):
                    raise WordNetError(f"{path}:{line_no}: not a WordNet line: {line[:80]!r}") from None

    def _index_line(self, line: str) -> None:
        fields = line.split()
        count = int(fields[2])
        if count < 1 or len(fields) < 4 + count:
            raise ValueError("sense count")
        self.senses.setdefault(_lemma(fields[0]), fields[-count:])

    def _data_line(self, line: str) -> None:
        fields = line.split(" | ")[0].split()
        n_words = int(fields[3], 16)
        words = [_lemma(fields[4 + 2 * i]) for i in range(n_words)]
        at = 4 + 2 * n_words
        pointers = [fields[at + 1 + 4 * i: at + 5 + 4 * i] for i in range(int(fields[at]))]
        if any(len(p) != 4 for p in pointers):
            raise ValueError("pointer count")
        self.synsets[fields[0]] = (words, [p[1] for p in pointers if p[0] in ("@", "@i")])


def caption_targets(captions: Sequence[str], nouns: AbstractSet[str]) -> dict[str, str]:
    """The words that name what the captions show -> as the captions write them: head nouns
    (and their singulars), and bigrams that are WordNet nouns ("t_shirt" -> "t shirt")."""
    targets: dict[str, str] = {}
    for caption in captions:
        words = tokenize(caption)
        if not words:
            continue
        pairs = [f"{a}_{b}" for a, b in zip(words, words[1:])]
        for term in [words[-1], *(p for p in pairs if p in nouns)]:
            for form in base_forms(term):
                targets.setdefault(form, term.replace("_", " "))
    return targets


def hypernym_lexicon(wordnet: NounHierarchy, captions: Sequence[str], max_hops: int = MAX_HOPS) -> dict[str, str]:
    """Every WordNet noun that is no word of the captions -> the caption word (as written) it is
    a kind of, by its first sense that reaches one (see the module's notes)."""
    targets = caption_targets(captions, wordnet.senses.keys())
    seen = {w for c in captions for w in tokenize(c)}

    def named(lemmas: list[str]) -> str | None:
        whole = next((targets[w] for w in lemmas if w in targets), None)
        return whole or next((targets[w.rsplit("_", 1)[1]] for w in lemmas
                              if "_" in w and w.rsplit("_", 1)[1] in targets), None)

    @functools.cache
    def nearest(sense: str, depth: int) -> tuple[int, str] | None:
        lemmas, hypernyms = wordnet.synsets.get(sense, ([], []))
        if (target := named(lemmas)) is not None:
            return 0, target
        if depth == max_hops:
            return None
        found = [hit for h in hypernyms if (hit := nearest(h, depth + 1)) is not None]
        return min(((hops + 1, t) for hops, t in found), default=None)

    written = set(targets.values())
    lexicon = {}
    for lemma, senses in wordnet.senses.items():
        if lemma in seen or lemma.replace("_", " ") in written:
            continue
        hit = next((h for s in senses if (h := nearest(s, 0)) is not None), None)
        if hit is not None:
            lexicon[lemma] = hit[1]
    return lexicon


def rewrite(text: str, lexicon: dict[str, str], known: AbstractSet[str]) -> tuple[str, list[tuple[str, str]]]:
    """The text (as `tokenize` splits it) with each word, or two-word noun, that is not in `known`
    and is in `lexicon` replaced by its training word; returns (text, [(word, replacement)])."""
    words, out, changes, i = tokenize(text), [], [], 0
    while i < len(words):
        for span in (2, 1):
            part = words[i: i + span]
            if len(part) < span or all(w in known for w in part):
                continue
            term = "_".join(part)
            match = next((lexicon[f] for f in base_forms(term) if f in lexicon), None)
            if match is not None:
                if out and out[-1] in ("a", "an"):
                    out[-1] = "an" if match[0] in "aeiou" else "a"
                out.append(match)
                changes.append((term.replace("_", " "), match))
                i += span
                break
        else:
            out.append(words[i])
            i += 1
    return " ".join(out), changes
