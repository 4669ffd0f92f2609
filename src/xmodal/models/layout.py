"""Text -> layout: where the objects of a prompt go, as a stage before the image generator.

The two-stage design of Hong et al. 2018 ("Inferring Semantic Layout for Hierarchical
Text-to-Image Synthesis", https://arxiv.org/abs/1801.05091) and Obj-GAN (Li et al. 2019,
https://arxiv.org/abs/1902.10740): a layout generator reads the text and draws one box per
object, then the image generator paints inside those boxes. Boxes are supervised by the
object annotations of the training data (`xmodal.data.boxes`: centre and
half-extent); the image generator sees the layout as a feature map, as GLIGEN
(https://arxiv.org/abs/2301.07093) grounds a diffusion model on boxes.

- Slots: K learned queries read the text encoder's tokens through a small transformer
  decoder (cross-attention to the words, self-attention among slots), so slot k holds the
  words of the k-th object in reading order (left/upper object first) -- whatever order the
  prompt names them in.
- Boxes: autoregressive over slots, each a categorical distribution -- half-extent first
  (`radius_bins` bins), then the centre on a `grid` x `grid` lattice given that extent and
  the earlier slots' boxes; a position inside the chosen bin is uniform. Presence of each
  slot is a Bernoulli. Trained by maximum likelihood with the true boxes fed back.
- Labels (optional, `labels = {key = [values]}`): each slot also classifies its object's
  attributes (e.g. colour and shape, supervised by the same annotations), and the map paints
  them one-hot inside the box, as Layout2Im and LostGAN give every box its object's class
  (https://arxiv.org/abs/1811.11389, https://arxiv.org/abs/1902.10717): the image generator
  then reads *what* goes in a box from the box itself, so two objects' attributes cannot swap
  or leak into each other. Training paints the true labels; generation the predicted ones.
- Map: `paint()` rasterises the slots at any size: inside slot k's box, its projected
  features, its labels, the box-relative coordinates (u, v) and the box mask. Differences from
  the papers: boxes are squares (centre and half-extent), as the Shapes world's objects are.
- `min_gap` (optional): sampling never places a box closer to an earlier one than the sum of
  their half-extents plus the gap, as the Shapes world places its objects (touching objects of
  one colour would read as one).
- `word_labels` (optional): the labels are read by a second slot reader (`WordLabels`) over the
  prompt's word ids and positions only, trained by the same label likelihood. The text encoder's
  bi-LSTM states mix each word with its neighbours, and a slot reading them named the training
  colour of a shape in a held-out colour-shape pair (shapes-gan: colour right for 88.6% of
  paraphrased novel objects); word embeddings carry no such pairing (100%).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xmodal.models.layout_draws import CANVAS, LayoutConfig, check_length, sample_boxes

__all__ = ["CANVAS", "BoxPlanes", "LayoutConfig", "LayoutModel", "WordLabels", "box_planes", "conv_over_map", "dense_map",
           "layout_generators", "paint_boxes", "pick_per_row"]


def _read_slots(decoder: nn.Module, queries: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Slot queries (K, D) read `memory` (B, T, D) through `decoder`, masked words left out -> (B, K, D)."""
    padding = ~mask.bool()
    # no mask when nothing is padded (the same numbers): torch's mask check imports sympy, 0.4 s of start-up
    return decoder(queries.expand(memory.size(0), -1, -1), memory, memory_key_padding_mask=padding if padding.any() else None)


class WordLabels(nn.Module):
    """Each slot's labels from the prompt's words alone: K slot queries read word embeddings of
    their own plus positions through a small transformer decoder (no word sees another before the
    slots do), then one linear head per label key."""

    def __init__(self, vocab_size: int, config: LayoutConfig):
        super().__init__()
        c = config
        self.embedding = nn.Embedding(vocab_size, c.dim, padding_idx=0)
        self.position = nn.Embedding(c.max_len, c.dim)
        self.queries = nn.Parameter(torch.randn(c.slots, c.dim) * 0.02)
        layer = nn.TransformerDecoderLayer(c.dim, c.heads, 2 * c.dim, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, c.layers)
        self.heads = nn.ModuleList(nn.Linear(c.dim, len(values)) for values in c.labels.values())

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Word ids (B, T) and their mask -> logits (B, K, V) per label key."""
        memory = self.embedding(ids) + self.position.weight[:ids.size(1)]
        slots = _read_slots(self.decoder, self.queries, memory, mask)
        return [head(slots) for head in self.heads]


class LayoutModel(nn.Module):
    def __init__(self, text_dim: int, config: LayoutConfig, vocab_size: int = 0):
        super().__init__()
        if config.temperature <= 0:
            raise ValueError(f"layout temperature must be > 0, got {config.temperature}")
        if config.word_labels and not (config.labels and vocab_size):
            raise ValueError("layout word_labels reads labels from the prompt's words: it needs labels and a word-level "
                             "text encoder (learned or word2vec)")
        c = self.config = config
        self.memory = nn.Linear(text_dim, c.dim)
        self.position = nn.Embedding(c.max_len, c.dim)  # word order, for encoders without it (word2vec)
        self.queries = nn.Parameter(torch.randn(c.slots, c.dim) * 0.02)
        layer = nn.TransformerDecoderLayer(c.dim, c.heads, 2 * c.dim, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, c.layers)
        self.presence = nn.Linear(c.dim, 1)
        self.box_embedding = nn.Sequential(nn.Linear(3, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.radius_head = nn.Sequential(nn.Linear(c.dim, 256), nn.SiLU(), nn.Linear(256, c.radius_bins))
        self.radius_embedding = nn.Embedding(c.radius_bins, c.dim)
        self.centre_head = nn.Sequential(nn.Linear(c.dim, 256), nn.SiLU(), nn.Linear(256, c.grid * c.grid))
        self.to_features = nn.Linear(c.dim, c.feature_dim)
        self.label_heads = nn.ModuleList(nn.Linear(c.dim, len(values)) for values in c.labels.values())
        self.word_labels = WordLabels(vocab_size, c) if c.word_labels else None

    # ------------------------------------------------------------------ reading the text
    def read(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, E), mask (B, T) -> slot features (B, K, D)."""
        t = tokens.size(1)
        check_length(self.config, t)
        memory = self.memory(tokens) + self.position.weight[:t]  # (B, T, D)
        return _read_slots(self.decoder, self.queries, memory, mask)

    def _bins(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """boxes (..., 3) -> radius bin (...), centre bin (...) = row * grid + column."""
        c = self.config
        lo, hi = c.radius_range
        r_bin = ((boxes[..., 2] - lo) / (hi - lo) * c.radius_bins).long().clamp(0, c.radius_bins - 1)
        xy = (boxes[..., :2] / CANVAS * c.grid).long().clamp(0, c.grid - 1)
        return r_bin, xy[..., 1] * c.grid + xy[..., 0]

    def _context(self, slots: torch.Tensor, boxes: torch.Tensor, present: torch.Tensor, k: int) -> torch.Tensor:
        """Slot k's feature plus the boxes already placed (slots < k) -> (B, D)."""
        return self.placed_context(slots[:, k], boxes[:, :k], present[:, :k]) if k else slots[:, k]

    def placed_context(self, slot: torch.Tensor, placed: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """A slot's feature (B, D) plus the embeddings of the placed boxes (B, k, 3) that are present (B, k)."""
        return slot + (self.box_embedding(placed / CANVAS) * present[..., None]).sum(1)

    def radius_probs(self, context: torch.Tensor) -> torch.Tensor:
        """A slot's context (B, D) -> probabilities of its half-extent bins (B, R), at the sampling temperature."""
        return F.softmax(self.radius_head(context).float() / self.config.temperature, -1)

    def centre_probs(self, context: torch.Tensor, r_bin: torch.Tensor) -> torch.Tensor:
        """A slot's context (B, D) and drawn half-extent bins (B,) -> probabilities of its centre bins (B, G*G)."""
        return F.softmax(self.centre_head(context + self.radius_embedding(r_bin)).float() / self.config.temperature, -1)

    def loss(self, slots: torch.Tensor, boxes: torch.Tensor, present: torch.Tensor,
             labels: torch.Tensor | None = None, words: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Negative log-likelihood of the true layout, per object (presence, extent, centre, labels;
        with `word_labels`, the labels also as read from `words`, the prompts' (ids, mask))."""
        present_f = present.float()
        nll = F.binary_cross_entropy_with_logits(self.presence(slots).squeeze(-1), present_f, reduction="sum")
        if self.label_heads and labels is None:
            raise ValueError("this layout stage has labels; pass the objects' label indices")
        logits = [head(slots) for head in self.label_heads]
        if self.word_labels is not None:
            logits += self._word_logits(words)
        for j, key_logits in enumerate(logits):
            target = labels[..., j % len(self.label_heads)].flatten()
            nll = nll + (F.cross_entropy(key_logits.flatten(0, 1), target, reduction="none") * present_f.flatten()).sum()
        r_bin, xy_bin = self._bins(boxes)
        for k in range(self.config.slots):
            h = self._context(slots, boxes, present, k)
            nll_r = F.cross_entropy(self.radius_head(h), r_bin[:, k], reduction="none")
            nll_xy = F.cross_entropy(self.centre_head(h + self.radius_embedding(r_bin[:, k])), xy_bin[:, k],
                                     reduction="none")
            nll = nll + ((nll_r + nll_xy) * present_f[:, k]).sum()
        return nll / present_f.sum().clamp(min=1)

    @torch.no_grad()
    def sample(self, slots: torch.Tensor, generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one layout per row, row i from generators[i] only -> boxes (B, K, 3), present (B, K);
        the loop is `xmodal.models.layout_draws.sample_boxes`, which the ONNX runtime runs too."""
        device = slots.device

        def radius(k, boxes, present):
            context = self._context(slots, torch.from_numpy(boxes).to(device), torch.from_numpy(present).to(device), k)
            return context, self.radius_probs(context).cpu().numpy()

        def centre(context, r_bin):
            return self.centre_probs(context, torch.from_numpy(r_bin).to(device)).cpu().numpy()

        def uniform():
            return np.stack([torch.rand(4, generator=g).numpy() for g in generators])

        p_present = torch.sigmoid(self.presence(slots).squeeze(-1)).float().cpu().numpy()  # (B, K)
        boxes, present = sample_boxes(self.config, p_present, radius, centre,
                                     lambda probs: pick_per_row(probs, generators), uniform)
        return torch.from_numpy(boxes).to(device=device, dtype=slots.dtype), torch.from_numpy(present).to(device)

    def predict_labels(self, slots: torch.Tensor, words: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> torch.Tensor | None:
        """The most likely label of each slot's object, per key -> (B, K, len(labels)), or None; with
        `word_labels`, as read from `words` (the prompts' word ids and mask)."""
        if not self.label_heads:
            return None
        logits = self._word_logits(words) if self.word_labels is not None else [head(slots) for head in self.label_heads]
        return torch.stack([x.argmax(-1) for x in logits], -1)

    def _word_logits(self, words: tuple[torch.Tensor, torch.Tensor] | None) -> list[torch.Tensor]:
        if words is None:
            raise ValueError("this layout stage reads its labels from the words: pass the prompts' (ids, mask)")
        check_length(self.config, words[0].size(1))
        return self.word_labels(*words)

    # ------------------------------------------------------------------ painting the map
    def paint(self, slots: torch.Tensor, boxes: torch.Tensor, present: torch.Tensor, size: int,
              labels: torch.Tensor | None = None) -> torch.Tensor:
        """The layout as a (B, channels, size, size) map: in each box its slot's features, its
        labels one-hot (given, else predicted), the box-relative coordinates u, v in [-1, 1] and
        the box mask; zero elsewhere."""
        return self.planes(slots, boxes, present, size, labels).dense()

    def planes(self, slots: torch.Tensor, boxes: torch.Tensor, present: torch.Tensor, size: int,
               labels: torch.Tensor | None = None) -> BoxPlanes:
        """The map of `paint` before it is spread over its channels (`BoxPlanes`)."""
        features = self.to_features(slots)  # (B, K, F)
        if self.label_heads:
            labels = self.predict_labels(slots) if labels is None else labels
            one_hot = [F.one_hot(labels[..., j], len(values)).to(features.dtype)
                       for j, values in enumerate(self.config.labels.values())]
            features = torch.cat([features, *one_hot], -1)
        return box_planes(features, boxes, present, size)


@dataclass
class BoxPlanes:
    """A layout map in factored form: the map at a pixel is sum_k features[k] * inside_k plus the
    channels (sum_k inside_k u_k, sum_k inside_k v_k, sum_k inside_k), so the whole map has rank
    K + 2 however many channels it spreads over. `planes` (B, K + 2, H, W) holds inside_1..K and
    the two coordinate channels; `features` (B, K, F). A convolution over the map reads these
    K + 2 planes with per-picture kernels (`conv_over_map`): a seventh of the work of the
    F + 3 channels for the bundled GANs' maps (F = 27)."""

    features: torch.Tensor
    planes: torch.Tensor

    def dense(self) -> torch.Tensor:
        """The (B, F + 3, H, W) map: features, u, v, mask."""
        inside = self.planes[:, :-2]
        b, k, h, w = inside.shape
        # (B, F, K) @ (B, K, HW): a matrix product, which an ONNX export runs 10x faster than the same einsum
        painted = (self.features.to(inside.dtype).transpose(1, 2) @ inside.flatten(2)).view(b, -1, h, w)
        return torch.cat([painted, self.planes[:, -2:], inside.sum(1, keepdim=True)], 1)

    def detach(self) -> BoxPlanes:
        return BoxPlanes(self.features.detach(), self.planes.detach())

    def __getitem__(self, index) -> BoxPlanes:
        """The map of the rows `index` picks (a slice or index tensor), as a tensor's rows."""
        return BoxPlanes(self.features[index], self.planes[index])

    def pooled(self, size: tuple[int, int]) -> BoxPlanes:
        """The map average-pooled to `size`: its planes pooled, as the dense map is linear in them
        (`dense()` of this is the dense map pooled, the same sums in another order, on K + 2
        channels instead of F + 3)."""
        return BoxPlanes(self.features, F.adaptive_avg_pool2d(self.planes, size))


def box_planes(features: torch.Tensor, boxes: torch.Tensor, present: torch.Tensor, size: int) -> BoxPlanes:
    """features (B, K, F), boxes (B, K, 3), present (B, K) -> the map's `BoxPlanes` at `size` px."""
    pixel = CANVAS / size
    coords = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) * pixel  # pixel centres
    cx, cy, r = (boxes[..., i, None, None] for i in range(3))  # (B, K, 1, 1)
    r = r.clamp(min=1.0)  # absent slots have r = 0
    dx = coords.view(1, 1, 1, size) - cx  # (B, K, 1, W)
    dy = coords.view(1, 1, size, 1) - cy  # (B, K, H, 1)
    # coverage of each pixel by the box grown by one pixel (anti-aliased edges stay inside)
    inside = ((r + pixel - torch.maximum(dx.abs(), dy.abs())) / pixel + 0.5).clamp(0, 1)  # (B, K, H, W)
    inside = inside * present[..., None, None].to(inside.dtype)
    u, v = (dx / r).clamp(-2, 2), (dy / r).clamp(-2, 2)
    uv = torch.stack([(inside * u).sum(1), (inside * v).sum(1)], 1)  # (B, 2, H, W)
    return BoxPlanes(features, torch.cat([inside, uv], 1))


def paint_boxes(features: torch.Tensor, boxes: torch.Tensor, present: torch.Tensor, size: int) -> torch.Tensor:
    """features (B, K, F), boxes (B, K, 3), present (B, K) -> (B, F + 3, size, size)."""
    return box_planes(features, boxes, present, size).dense()


def dense_map(layout_map: torch.Tensor | BoxPlanes) -> torch.Tensor:
    """A layout map as its (B, F + 3, H, W) tensor, whichever form it comes in."""
    return layout_map.dense() if isinstance(layout_map, BoxPlanes) else layout_map


def conv_over_map(conv: nn.Conv2d, h: torch.Tensor, layout_map: torch.Tensor | BoxPlanes) -> torch.Tensor:
    """conv(cat([h, map])) for a 3x3, padding-1 `conv` whose last input channels read a layout map,
    dense or `BoxPlanes`. From planes: conv over h alone, plus the map's part as a grouped
    convolution of the K + 2 planes with each picture's kernels (the map weights times its slots'
    features), the same sums in another order (the bundled GAN drew 2.2x faster). An ONNX export
    takes the dense map (a grouped convolution fixes the batch size in the graph)."""
    if not isinstance(layout_map, BoxPlanes) or torch.onnx.is_in_onnx_export():
        return conv(torch.cat([h, dense_map(layout_map)], 1))
    features, planes = layout_map.features.to(h.dtype), layout_map.planes.to(h.dtype)
    (b, k, n), (cout, cin) = features.shape, (conv.out_channels, h.size(1))
    weight = conv.weight.to(h.dtype)
    out = F.conv2d(h, weight[:, :cin], conv.bias, padding=1)
    w_features, w_uv, w_mask = (weight[:, cin:cin + n], weight[:, cin + n:cin + n + 2], weight[:, cin + n + 2])
    kernels = features @ w_features.flatten(2).permute(1, 2, 0).reshape(n, 9 * cout)  # (B, K, 9 * Cout)
    kernels = kernels.view(b, k, 9, cout) + w_mask.flatten(1).t()  # the mask channel is 1 in every slot's box
    kernels = torch.cat([kernels, w_uv.flatten(2).permute(1, 2, 0).expand(b, 2, 9, cout)], 1)  # (B, K + 2, 9, Cout)
    kernels = kernels.permute(0, 3, 1, 2).reshape(b * cout, k + 2, 3, 3)
    height, width = planes.shape[-2:]
    from_map = F.conv2d(planes.reshape(1, b * (k + 2), height, width), kernels, padding=1, groups=b)
    return out + from_map.view(b, cout, height, width)


def pick_per_row(probs: np.ndarray, generators: Sequence[torch.Generator]) -> np.ndarray:
    """One bin per row of probs (B, N), row i drawn from generators[i]: what
    `torch.multinomial(row, 1, generator=g)` draws, row by row (it takes argmax(row / q) with
    q ~ Exp(1) from g), with only the draws made per row and the division and argmax batched."""
    q = torch.empty(probs.shape, dtype=torch.float32)
    for row, g in zip(q, generators):
        row.exponential_(generator=g)
    return (probs.astype(np.float32) / q.numpy()).argmax(1).astype(np.int64)


def layout_generators(seeds: Sequence[int], offset: int = 7_919) -> list[torch.Generator]:
    """One generator per image for its layout draws (apart from the image noise of the same seed)."""
    return [torch.Generator().manual_seed(int(s) * 2 + offset) for s in seeds]
