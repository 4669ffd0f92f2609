"""One decoding module for every captioner: greedy, beam search, sampling.

A captioner provides `encode_images`, `init_state` and `step` (see
`xmodal.models.captioning`); states are dicts of batch-first tensors, so beams are
reordered generically. Scores are summed log-probabilities; beam search ranks finished
hypotheses by score / length ** length_penalty (0 = raw sum, 1 = per-word mean).
When no beam reaches `<end>` within `max_len`, the best unfinished beam is returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from xmodal.data.text import Vocabulary
from xmodal.models.base import image_chunk, in_cpu_chunks

Method = Literal["greedy", "beam", "sample"]
METHODS: tuple[str, ...] = ("greedy", "beam", "sample")


@dataclass
class DecodeOptions:
    method: Method = "beam"
    beam_size: int = 3
    max_len: int = 20  # words, not counting <end>
    min_len: int = 0  # words before <end> is allowed
    length_penalty: float = 0.0
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    no_repeat_ngram: int = 0  # block any n-gram from appearing twice; 0: off
    block_consecutive_repeats: bool = True  # never emit the same word twice in a row

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"decoding method {self.method!r} is not one of {METHODS}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"min_len must be in 0..max_len ({self.max_len}), got {self.min_len}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Decoded:
    tokens: list[int]  # word ids, without <start> and <end>
    score: float  # summed log-probability, <end> included when reached
    finished: bool  # reached <end>
    attention: torch.Tensor | None = None  # (L, N): one row per emitted word


def _reorder(state: dict, index: torch.Tensor) -> dict:
    return {k: v.index_select(0, index) for k, v in state.items()}


def _block(log_probs: torch.Tensor, previous: torch.Tensor, histories: list[list[int]], options: DecodeOptions) -> torch.Tensor:
    """Repetition guard: forbid tokens that would repeat the last word (`previous`, the words just
    fed to the step: <start>, itself forbidden, before the first) or an n-gram."""
    if options.block_consecutive_repeats:
        log_probs.scatter_(1, previous[:, None].cpu(), float("-inf"))
    n = options.no_repeat_ngram
    if not n:
        return log_probs
    for row, history in enumerate(histories):
        if len(history) >= n - 1:
            prefix = tuple(history[len(history) - n + 1:]) if n > 1 else ()
            for i in range(len(history) - n + 1):
                if tuple(history[i:i + n - 1]) == prefix:
                    log_probs[row, history[i + n - 1]] = float("-inf")
    return log_probs


_NEVER = [Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id]  # "<unk>" is never a useful word to write


def _forbid_specials(log_probs: torch.Tensor, length: int, options: DecodeOptions) -> torch.Tensor:
    log_probs[:, _NEVER] = float("-inf")
    if length < options.min_len:
        log_probs[:, Vocabulary.end_id] = float("-inf")
    return log_probs


@torch.no_grad()
def decode(model, images: torch.Tensor, options: DecodeOptions | None = None,
           generator: torch.Generator | None = None, return_attention: bool = False) -> list[Decoded]:
    """Caption a batch of preprocessed images (B, 3, H, W)."""
    options = options or DecodeOptions()
    memory = in_cpu_chunks(model.encode_images, images, image_chunk(images))
    state = model.init_state(memory)
    if options.method == "beam" and options.beam_size > 1:
        decoded = _beam(model, state, options, return_attention)
    else:
        decoded = _left_to_right(model, state, options, generator, return_attention)
    if isinstance(model, Rescorer) and options.method != "sample":
        decoded = model.rescore(memory, decoded, lambda ids: _allowed(ids, options), return_attention)
    return decoded


class Rescorer:
    """A captioner that reconsiders what the search found (the retrieval captioner: its retrieved
    captions, whole, compete with the decoded one): `decode` hands it its result."""

    def rescore(self, memory: dict, decoded: list[Decoded], allowed, return_attention: bool) -> list[Decoded]:
        raise NotImplementedError


def _allowed(ids: list[int], options: DecodeOptions) -> bool:
    """Whether a whole caption (word ids) keeps the rules the search keeps."""
    if not options.min_len <= len(ids) <= options.max_len:
        return False
    if any(i in (Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.end_id, Vocabulary.unk_id) for i in ids):
        return False
    if options.block_consecutive_repeats and any(a == b for a, b in zip(ids, ids[1:])):
        return False
    n = options.no_repeat_ngram
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)] if n else []
    return len(grams) == len(set(grams))


def _left_to_right(model, state, options, generator, return_attention) -> list[Decoded]:
    """Greedy (method 'greedy', or 'beam' with beam size 1) or sampling. Greedy rows that have
    ended leave the state (`_without_ended`); sampling keeps every row, so that one generator
    draws for the same rows at every step."""
    b = next(iter(state.values())).size(0)
    device = next(iter(state.values())).device
    tokens = torch.full((b,), Vocabulary.start_id, dtype=torch.long, device=device)
    histories: list[list[int]] = [[] for _ in range(b)]
    attentions: list[list[torch.Tensor]] = [[] for _ in range(b)]
    scores = [0.0] * b
    done = [False] * b  # Python lists, not tensors: indexing a tensor row by row costs more than the model's step
    reached_end = [False] * b
    rows = list(range(b))  # the caption of each row of the state
    for t in range(options.max_len + 1):
        log_probs, state, attention = model.step(state, tokens)
        log_probs = _block(_forbid_specials(log_probs.float().cpu(), t, options), tokens, [histories[r] for r in rows],
                           options)
        forced = t >= options.max_len  # every unfinished caption has max_len words now
        if forced:  # only <end> is left
            log_probs = torch.full_like(log_probs, float("-inf"))
            log_probs[:, Vocabulary.end_id] = 0.0
        if options.method == "sample":
            choice = _sample(log_probs, options, generator)
        else:
            choice = log_probs.argmax(dim=-1)
        chosen = log_probs.gather(1, choice[:, None].cpu())[:, 0].tolist()
        step_attention = attention.float().cpu() if (return_attention and attention is not None) else None
        for i, (r, token) in enumerate(zip(rows, choice.tolist())):
            if done[r]:
                continue
            scores[r] += chosen[i]
            if token == Vocabulary.end_id:
                done[r], reached_end[r] = True, not forced
            else:
                histories[r].append(token)
                if step_attention is not None:
                    attentions[r].append(step_attention[i])
        if all(done):
            break
        tokens = choice.to(device)
        if options.method != "sample":
            state, tokens, rows = _without_ended(state, tokens, rows, done)
    return [Decoded(h, s, e, torch.stack(a) if a else None) for h, s, e, a in zip(histories, scores, reached_end, attentions)]


def _without_ended(state: dict, tokens: torch.Tensor, rows: list[int], done: list[bool]):
    """The state, tokens and rows without the captions that have ended, once a quarter of the rows
    have: every later step then computes only the live ones (Shapes captions are 4, 9 or 12 words,
    so a batch computed a third of its rows' steps for captions already ended). Copying the state
    costs about a step; each row is computed alone, so the captions are the same."""
    live = [i for i, r in enumerate(rows) if not done[r]]
    if len(live) > 0.75 * len(rows):
        return state, tokens, rows
    index = torch.tensor(live, device=tokens.device)
    return _reorder(state, index), tokens.index_select(0, index), [rows[i] for i in live]


def _sample(log_probs: torch.Tensor, options: DecodeOptions, generator) -> torch.Tensor:
    logits = log_probs / options.temperature
    if options.top_k > 0:
        kth = logits.topk(min(options.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) > options.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _beam(model, state, options, return_attention) -> list[Decoded]:
    k = options.beam_size
    b = next(iter(state.values())).size(0)
    device = next(iter(state.values())).device
    state = _reorder(state, torch.arange(b, device=device).repeat_interleave(k))  # (B*K, ...)
    scores = torch.full((b, k), float("-inf"))
    scores[:, 0] = 0.0  # all beams start identical: only the first may expand
    histories: list[list[int]] = [[] for _ in range(b * k)]
    attentions: list[list[torch.Tensor]] = [[] for _ in range(b * k)]
    finished: list[list[Decoded]] = [[] for _ in range(b)]
    tokens = torch.full((b * k,), Vocabulary.start_id, dtype=torch.long, device=device)
    for t in range(options.max_len + 1):
        log_probs, state, attention = model.step(state, tokens)
        log_probs = _block(_forbid_specials(log_probs.float().cpu(), t, options), tokens, histories, options)  # (B*K, V)
        if t == options.max_len:
            log_probs = torch.full_like(log_probs, float("-inf"))
            log_probs[:, Vocabulary.end_id] = 0.0
        v = log_probs.size(-1)
        candidates = (scores[:, :, None] + log_probs.view(b, k, v)).view(b, k * v)  # (B, K*V)
        # take 2K so that K live beams remain after the ones that end are set aside
        top_scores, top_index = candidates.topk(min(2 * k, k * v), dim=-1)
        # plain Python lists here: element-wise tensor indexing is slow in a loop
        new_scores = [[float("-inf")] * k for _ in range(b)]
        new_rows = [[i * k] * k for i in range(b)]
        new_tokens = [[Vocabulary.end_id] * k for _ in range(b)]
        new_histories, new_attentions = [], []
        step_attention = attention.float().cpu() if (return_attention and attention is not None) else None
        for i, (row_scores, row_index) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
            live = 0
            for score, index in zip(row_scores, row_index):
                if score == float("-inf"):
                    break
                beam, token = divmod(index, v)
                row = i * k + beam
                if token == Vocabulary.end_id:
                    att = torch.stack(attentions[row]) if return_attention and attentions[row] else None
                    finished[i].append(Decoded(list(histories[row]), score, t < options.max_len, att))
                    finished[i] = sorted(finished[i], key=lambda d: -_normalized(d, options))[:k]  # best K
                    continue
                if live < k:
                    new_scores[i][live], new_rows[i][live], new_tokens[i][live] = score, row, token
                    live += 1
            for j in range(k):
                row = new_rows[i][j]
                keep = new_scores[i][j] > float("-inf")
                new_histories.append([*histories[row], new_tokens[i][j]] if keep else [])
                step_att = [step_attention[row]] if (keep and step_attention is not None) else []
                new_attentions.append([*attentions[row], *step_att] if keep else [])
        if all(_done(finished[i], new_scores[i], options) for i in range(b)):
            break
        scores, histories, attentions = torch.tensor(new_scores), new_histories, new_attentions
        state = _reorder(state, torch.tensor(new_rows).view(-1).to(device))
        tokens = torch.tensor(new_tokens).view(-1).to(device)
    return [max(f, key=lambda d: _normalized(d, options)) for f in finished]


def _normalized(d: Decoded, options: DecodeOptions) -> float:
    length = len(d.tokens) + 1  # + <end>
    return d.score / (length ** options.length_penalty)


def _done(finished: list[Decoded], live_scores: list[float], options: DecodeOptions) -> bool:
    """Stop a sentence's search when it has K finished beams that no live beam can still beat."""
    if len(finished) < options.beam_size:
        return False
    if options.length_penalty != 0:  # longer beams could still overtake: search to full length
        return all(s == float("-inf") for s in live_scores)
    return max(live_scores) <= min(d.score for d in finished)  # log-probs only fall as beams grow
