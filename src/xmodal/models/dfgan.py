"""A conditional GAN in the DF-GAN style (Tao et al. 2022, "DF-GAN: A Simple and Effective
Baseline for Text-to-Image Synthesis", https://arxiv.org/abs/2008.05865).

As in the paper: a one-stage generator whose blocks fuse the text deeply through
text-conditioned affine transforms (scale and shift predicted from the condition), a
discriminator that judges image and sentence together, the hinge loss with the
mismatched-text term, and the matching-aware gradient penalty (MA-GP, k = 2, p = 6) on
real images with matching text. Differences: 32 or 64 px (grayscale with `image_channels = 1`,
returned in 3 equal channels) and narrow for a CPU; the condition
of each affine is the noise and sentence vector together (as in DF-GAN's later code);
and the generator and discriminator are updated together from one `loss()` — the
discriminator's parameters are detached inside the generator's term and the fake images
detached inside the discriminator's, so one backward gives each side its own gradient
(the learning rates differ through `param_groups`). With `layout` set, a layout stage
(`xmodal.models.layout`) draws the objects' boxes from the text; every generator block
reads the layout map (concatenated after upsampling) and the discriminator sees it beside
the image, so it judges whether each box holds what its words say (as layout2im and
LostGAN condition both sides on the layout: https://arxiv.org/abs/1811.11389).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from xmodal.models.base import CPU_CHUNK, DRAW, LAYOUT
from xmodal.models.generation import TextToImageModel, stage_sizes
from xmodal.models.hub import DTYPES
from xmodal.models.image_encoders import channels_last, upsample2x
from xmodal.models.layout import BoxPlanes, LayoutConfig, conv_over_map, dense_map
from xmodal.models.registry import register_model
from xmodal.models.text_encoders import TextEncoderConfig


@dataclass
class DFGANConfig:
    text_encoder: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig("learned", 128))
    image_size: int = 64  # 32 or 64
    image_preset: str = "shapes64"  # preprocessing of the training images (xmodal.data.images.make_transform)
    image_channels: int = 3  # 1: grayscale
    z_dim: int = 64
    # generator channels at 4, 8, ..., image_size px; the discriminator mirrors them (image_size -> 4 px).
    # Halving per stage keeps every stage equally cheap: fast on a CPU.
    channels: tuple[int, ...] = (128, 64, 32, 16, 8)
    gp_weight: float = 2.0  # MA-GP k
    gp_power: float = 6.0  # MA-GP p
    lr_scale_g: float = 0.25  # generator lr = train.lr * this (DF-GAN: 1e-4 vs 4e-4)
    gp_every: int = 4  # lazy regularization (Karras et al. 2020): MA-GP every N steps, weighted by N
    layout: LayoutConfig | None = None  # None: no layout stage
    # What made it train on a frozen pretrained text encoder (see the module docstring):
    sentence_dim: int = 0  # > 0: G and D each map the sentence vector to this size (Linear, LeakyReLU) first
    spectral_norm: bool = False  # spectral normalization of every discriminator weight (Miyato et al. 2018)
    projection: bool = False  # add the projection term <W s, sum-pooled features> to D's score (Miyato & Koyama 2018)
    temperature: float = 1.0  # generation: z drawn at this std (the truncation trick; < 1: typical over varied)
    mode_seeking: float = 0.0  # > 0: weight of the mode-seeking term (Mao et al. 2019) against one look per prompt
    d_channels: tuple[int, ...] = ()  # the discriminator's widths at 4, ..., image_size px; () mirrors `channels`
    d_residual_init: float = 0.0  # the start of each D block's learned residual weight (DF-GAN: 0, D linear at first)
    map_projection: bool = False  # D reads the layout map by projection only, not beside the image (see Discriminator)
    patch_grid: int = 0  # > 0: D also scores a grid x grid map of patches (PatchGAN, Isola et al. 2017), its own hinge term
    # with a layout stage: G and D read the text only through the layout map (boxes, one-hot labels,
    # slot features), never the sentence vector, which ties a colour to the shapes it came with
    layout_only: bool = False
    # the last stage draws each 2 x 2 pixels from one place at half the size: the blocks stop at
    # image_size / 2 (`channels` one width shorter) and `to_pixels` (two convolutions there) gives 4
    # pixels per place, put in place by a pixel shuffle (ESPCN, Shi et al. 2016,
    # https://arxiv.org/abs/1609.05158). The full-size stage's thin, memory-bound work goes: the
    # bundled shapes-gan (a student of the full-size GAN) drew 755-975 images/s at batch 256 against its teacher's 487-680
    # (both drawn with two threads per layer, before `xmodal.models.row_workers`)
    subpixel: bool = False
    pixel_width: int = 0  # with subpixel: the width of to_pixels' first convolution (0: twice the last stage's)
    # a student: the GAN (name or folder) whose pictures the generator learned to draw, for the
    # record (`DFGAN.learn_from`; training reads it as the [model] teacher)
    teacher: str = ""
    # "bfloat16": pipelines draw under bf16 autocast by default where the device computes bf16
    # natively (`xmodal.models.hub.autocast_for`; its card measures it both ways); "float32": never
    inference_dtype: str = "float32"


class Affine(nn.Module):
    """x * gamma(c) + beta(c), gamma initialised at 1 and beta at 0."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.gamma = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        self.beta = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        nn.init.zeros_(self.gamma[2].weight)
        nn.init.ones_(self.gamma[2].bias)
        nn.init.zeros_(self.beta[2].weight)
        nn.init.zeros_(self.beta[2].bias)

    def forward(self, x, cond):
        return torch.addcmul(self.beta(cond)[..., None, None], x, self.gamma(cond)[..., None, None])


class GBlock(nn.Module):
    """Upsample x2, then two (affine, LeakyReLU, conv) fusions, with a residual shortcut (upsampled)."""

    def __init__(self, cin: int, cout: int, cond_dim: int, map_channels: int = 0):
        super().__init__()
        self.fuse1, self.fuse2 = Affine(cond_dim, cin), Affine(cond_dim, cout)
        self.conv1, self.conv2 = nn.Conv2d(cin + map_channels, cout, 3, 1, 1), nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, cond, layout_map=None):  # layout_map (B, M, 2H, 2W), its BoxPlanes, or None
        # the affine, the LeakyReLU and the 1x1 shortcut act on each pixel alone, so they run before
        # the nearest-neighbour upsampling: the same numbers on a quarter of the pixels
        h = upsample2x(F.leaky_relu(self.fuse1(x, cond), 0.2))
        h = self.conv1(h) if layout_map is None else conv_over_map(self.conv1, h, layout_map)
        h = self.conv2(F.leaky_relu(self.fuse2(h, cond), 0.2))
        return upsample2x(self.shortcut(x)) + h


def sentence_map(dim: int, out: int) -> nn.Module:
    """The sentence vector as each network reads it: mapped to `out` dims when out > 0, else as it is."""
    return nn.Sequential(nn.Linear(dim, out), nn.LeakyReLU(0.2)) if out > 0 else nn.Identity()


class Generator(nn.Module):
    def __init__(self, z_dim: int, cond_dim: int, chans: list[int], map_channels: int = 0, out_channels: int = 3,
                 sentence_dim: int = 0, subpixel: bool = False, pixel_width: int = 0):
        super().__init__()
        self.sentence = sentence_map(cond_dim, sentence_dim)
        cond_dim = sentence_dim or cond_dim
        self.fc = nn.Linear(z_dim, chans[0] * 16)
        self.blocks = nn.ModuleList(GBlock(a, b, z_dim + cond_dim, map_channels) for a, b in zip(chans[:-1], chans[1:]))
        if subpixel:  # 4 pixels per place from two convolutions at half the size (a new name: a to_rgb's weights do not fit)
            c, hidden = chans[-1], pixel_width or 2 * chans[-1]
            conv = nn.Conv2d(hidden, 4 * out_channels, 3, 1, 1)
            with torch.no_grad():  # ICNR (Aitken et al. 2017): the 4 pixels of a place start equal, no checkerboard
                conv.weight.copy_(conv.weight[::4].repeat_interleave(4, 0))
                conv.bias.copy_(conv.bias[::4].repeat_interleave(4, 0))
            self.to_pixels = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(c, hidden, 3, 1, 1), nn.LeakyReLU(0.2), conv,
                                           nn.PixelShuffle(2), nn.Tanh())
        else:
            self.to_pixels = None
            self.to_rgb = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(chans[-1], out_channels, 3, 1, 1), nn.Tanh())

    def forward(self, z, sentence, maps=None):  # z (B, Z), sentence (B, E), maps: layout maps at 8..64 px
        cond = torch.cat([z, self.sentence(sentence)], dim=-1)
        x = channels_last(self.fc(z).view(z.size(0), -1, 4, 4))  # (B, C0, 4, 4)
        for i, block in enumerate(self.blocks):
            x = block(x, cond, maps[i] if maps is not None else None)
        pixels = self.to_rgb(x) if self.to_pixels is None else self.to_pixels(x)
        return pixels.expand(-1, 3, -1, -1)  # (B, 3, S, S); grayscale in 3 equal channels


class DBlock(nn.Module):
    def __init__(self, cin: int, cout: int, residual_init: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(cout, cout, 3, 1, 1),
                                  nn.LeakyReLU(0.2))
        self.shortcut = nn.Conv2d(cin, cout, 1)
        self.gamma = nn.Parameter(torch.full((1,), residual_init))  # learned residual weight, as in DF-GAN

    def forward(self, x):  # the 1x1 shortcut after the pooling: the same numbers (both are linear) on a quarter of the pixels
        return self.shortcut(F.avg_pool2d(x, 2)) + self.gamma * self.body(x)


class Discriminator(nn.Module):
    """Judges (image, sentence[, layout map]) -> scores (B, 1 + P): the whole picture's, then one
    per patch with a patch head. The layout map is read either beside the image from the first
    layer (concatenated) or, with `config.map_projection`, only by projection: the image features
    alone say how real a picture looks, and their inner product with the map's embedding at each
    place says whether it fits the layout there (the projection discriminator, Miyato & Koyama
    2018, made spatial as OASIS / layout GANs judge each region)."""

    def __init__(self, cond_dim: int, map_channels: int, config: DFGANConfig, patch_stage: int = 0):
        super().__init__()
        chans = list(config.d_channels or config.channels)[::-1]  # 64, 32, 16, 8, 4 px
        self.sentence = sentence_map(cond_dim, config.sentence_dim)
        cond_dim = config.sentence_dim or cond_dim
        self.map_projection = bool(map_channels and config.map_projection)
        self.stem = nn.Conv2d(3 + (0 if self.map_projection else map_channels), chans[0], 3, 1, 1)
        self.blocks = nn.Sequential(*(DBlock(a, b, config.d_residual_init) for a, b in zip(chans[:-1], chans[1:])))
        # patch_stage > 0: after that many blocks, a 1x1 conv scores each location (its receptive field a patch)
        self.patch_stage = patch_stage
        self.patch = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(chans[patch_stage], 1, 1)) if patch_stage else None
        self.joint = nn.Sequential(nn.Conv2d(chans[-1] + cond_dim, chans[-1], 3, 1, 1), nn.LeakyReLU(0.2),
                                   nn.Conv2d(chans[-1], 1, 4, 1, 0))
        self.embed = nn.Linear(cond_dim, chans[-1], bias=False) if config.projection else None
        if self.map_projection:  # the map's embedding where the patch head and the whole-picture head read
            self.map_patch = nn.Conv2d(map_channels, chans[patch_stage], 1, bias=False) if patch_stage else None
            self.map_whole = nn.Conv2d(map_channels, chans[-1], 1, bias=False)
        if config.spectral_norm:
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    nn.utils.parametrizations.spectral_norm(module)

    def project(self, embed: nn.Module, layout_map, h) -> torch.Tensor:
        """<embed(map at h's size), h> at each place -> (B, 1, H, W); the map dense or `BoxPlanes`
        (pooled on its few planes: training's full-size gradients stay that thin)."""
        if isinstance(layout_map, BoxPlanes):
            small = layout_map.pooled(h.shape[-2:]).dense()
        else:
            small = F.adaptive_avg_pool2d(layout_map, h.shape[-2:])
        return (embed(small) * F.leaky_relu(h, 0.2)).sum(1, keepdim=True)

    def forward(self, images, sentence, layout_map=None):  # images (B, 3, 64, 64), sentence (B, E)
        return self.judge(self.trunk(images, layout_map), sentence, layout_map)

    def shares_trunk(self, layout_map) -> bool:
        """Whether `trunk` reads the image alone (the map, if any, only by projection), so that one
        trunk serves the same pictures judged with other texts and maps."""
        return layout_map is None or self.map_projection

    def trunk(self, images, layout_map=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The picture's features: at 4 px, and where the patch head reads (None without one)."""
        if layout_map is not None and not self.map_projection:  # (B, M, 64, 64)
            images = torch.cat([images, dense_map(layout_map)], 1)
        h, at_patch = self.stem(channels_last(images)), None
        for i, block in enumerate(self.blocks):
            if i == self.patch_stage and self.patch is not None:
                at_patch = h
            h = block(h)  # ends (B, C0, 4, 4)
        return h, at_patch

    def judge(self, features, sentence, layout_map=None) -> torch.Tensor:
        """Scores (B, 1 + P) of the trunk's features with a sentence (and map)."""
        (h, at_patch), projected = features, self.map_projection and layout_map is not None
        patches = []
        if at_patch is not None:
            patch = self.patch(at_patch) + (self.project(self.map_patch, layout_map, at_patch) if projected else 0)
            patches = [patch.flatten(1)]  # (B, P)
        sentence = self.sentence(sentence)
        s = sentence[..., None, None].expand(-1, -1, h.size(2), h.size(3))
        score = self.joint(torch.cat([h, s], dim=1)).view(-1)  # (B,)
        if self.embed is not None:  # does the picture's feature vector point where the sentence does?
            score = score + (self.embed(sentence) * F.leaky_relu(h, 0.2).sum((2, 3))).sum(-1)
        if projected:  # does each place hold what the layout puts there?
            score = score + self.project(self.map_whole, layout_map, h).sum((1, 2, 3))
        return torch.cat([score[:, None], *patches], 1)


def per_head_mean(scores: torch.Tensor) -> torch.Tensor:
    """scores (B, 1 + P) -> the whole-picture term's mean plus the patch terms' mean (each its own weight 1)."""
    whole = scores[:, 0].mean()
    return whole + scores[:, 1:].mean() if scores.size(1) > 1 else whole


@register_model("dfgan")
class DFGAN(TextToImageModel):
    config_class = DFGANConfig
    capabilities = frozenset({LAYOUT, DRAW})
    draw_rows = CPU_CHUNK  # the ONNX runtime's draw graph ran fastest in calls of 4-16 rows here (1,140-1,250
    # images/s for shapes-gan, 1,030 in calls of 64): a few pictures' activations stay in the cache
    # PyTorch, one core per part of the batch (`TextToImagePipeline.render`): shapes-gan drew 930-1,310 images/s
    # at batch 256 in calls of 32 rows, 780-1,225 in calls of 16 (the calls in turn, alternated)
    draw_chunk = 32

    def __init__(self, config: DFGANConfig, text_encoder: nn.Module | None = None):
        super().__init__(config, text_encoder)
        sizes = stage_sizes("dfgan", config.image_size, config.image_channels, config.channels, config.subpixel)
        if config.subpixel and not config.d_channels:
            raise ValueError("with subpixel the generator's channels stop at half the image size: give the "
                             f"discriminator's {len(sizes)} widths as d_channels")
        if config.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (the std of z when generating), got {config.temperature}")
        if config.mode_seeking < 0 or config.sentence_dim < 0 or config.pixel_width < 0:
            raise ValueError(f"mode_seeking, sentence_dim and pixel_width must be >= 0, got {config.mode_seeking}, "
                             f"{config.sentence_dim} and {config.pixel_width}")
        if config.layout_only and config.layout is None:
            raise ValueError("layout_only reads the text through the layout map: it needs a layout stage")
        if config.inference_dtype not in DTYPES:
            raise ValueError(f"inference_dtype must be 'float32' or 'bfloat16', got {config.inference_dtype!r}")
        self.map_sizes = tuple(sizes[1:len(config.channels)])  # where the generator blocks read the layout map
        e = self.text_encoder.out_dim
        m = self.layout.config.channels if self.layout is not None else 0
        self.generator = Generator(config.z_dim, e, list(config.channels), m, config.image_channels, config.sentence_dim,
                                   config.subpixel, config.pixel_width)
        if config.d_channels and len(config.d_channels) != len(sizes):
            raise ValueError(f"d_channels must give {len(sizes)} widths ({', '.join(map(str, sizes))} px), "
                             f"got {config.d_channels}")
        grids = {size: len(sizes) - 1 - i for i, size in enumerate(sizes)}  # D's map side -> blocks before it
        if config.patch_grid and not 0 < grids.get(config.patch_grid, 0) < len(sizes) - 1:
            raise ValueError(f"patch_grid must be 0 or one of {sizes[1:-1]} (D's feature map sides), got {config.patch_grid}")
        self.discriminator = Discriminator(e, m, config, grids.get(config.patch_grid, 0))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # optimizer steps done, for the lazy penalty
        self.teacher: tuple[DFGAN, ...] = ()  # while a student trains: its teacher (a tuple: not a submodule, not saved)

    def learn_from(self, teacher: DFGAN) -> None:
        """Train as `teacher`'s student: the loss becomes the distance of this generator's picture
        to the teacher's for the same text, true layout and z (`distillation_loss`). The student
        reads the text and layout as the teacher does (`gan_student` gives it the teacher's, frozen)."""
        if self.config.image_size != teacher.config.image_size or self.map_sizes != teacher.map_sizes[:len(self.map_sizes)]:
            raise ValueError(f"a student draws at its teacher's size ({teacher.config.image_size} px) from its layout "
                             f"maps {teacher.map_sizes}, or the first of them")
        self.teacher = (teacher.eval().requires_grad_(False),)

    def inference_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.config.inference_dtype == "bfloat16" else torch.float32

    def param_groups(self) -> list[dict]:
        g = list(self.generator.parameters())
        d = [p for p in self.discriminator.parameters()] + [p for p in self.text_encoder.parameters() if p.requires_grad]
        if self.layout is not None:  # read with the text, trained by its own likelihood and the discriminator
            d += list(self.layout.parameters())
        return [{"params": g, "lr_scale": self.config.lr_scale_g}, {"params": d, "lr_scale": 1.0}]

    def loss(self, batch):
        if self.teacher:
            return self.distillation_loss(batch)
        images, texts = batch["images"], batch["texts"]
        b = images.size(0)
        tokens, mask, sentence = self.encode_text(texts)  # (B, T, E), (B, T), (B, E)
        sentence = self._sentence(sentence)
        maps, layout_nll, full = None, None, None
        if self.layout is not None:  # the true boxes, painted at 8..S px; the discriminator reads the S px map
            full_size = (self.config.image_size,) if self.config.subpixel else ()
            # as BoxPlanes: the generator convolves their few planes, the discriminator pools them
            maps, layout_nll = self.layout_maps(tokens, mask, self.map_sizes + full_size, batch=batch, planes=True)
            maps, full = maps[:len(self.map_sizes)], maps[-1]
            if not any(p.requires_grad for p in itertools.chain(self.generator.parameters(), self.discriminator.parameters())):
                # a later stage that trains only (part of) the layout stage ([train] trainable): no adversarial terms
                return self.layout.config.weight * layout_nll, {"layout_nll": layout_nll.detach()}
        z = torch.randn(b, self.config.z_dim, device=images.device)
        fake = self.generator(z, sentence.detach(), [m.detach() for m in maps] if maps else None)
        d_loss, logs = self.discriminator_loss(images, fake, sentence, full)
        g_loss = self.generator_loss(fake, sentence, full)
        logs["g_loss"] = g_loss.detach()
        loss = d_loss + g_loss
        if self.config.mode_seeking > 0:
            mode_seeking = self.mode_seeking_loss(z, fake, sentence, maps)
            loss = loss + mode_seeking
            logs["mode_seeking"] = mode_seeking.detach()
        if layout_nll is not None:
            loss = loss + self.layout.config.weight * layout_nll
            logs["layout_nll"] = layout_nll.detach()
        return loss, logs

    def distillation_loss(self, batch) -> tuple[torch.Tensor, dict]:
        """A student's loss: L1 from its picture to the teacher's, both drawn from the batch's
        texts, its true boxes and the same z (half the rows at std 1, as a GAN trains, half at the
        drawing temperature). The target is a function of those inputs, so a regression to it
        does not blur (the teacher is the GAN its discriminator trained); only the generator learns."""
        texts = batch["texts"]
        teacher = self.teacher[0].to(self.step.device)
        with torch.no_grad():  # the text and the true layout read once, by the teacher (the student's are the same)
            tokens, mask, sentence = teacher.encode_text(texts)
            maps, _ = teacher.layout_maps(tokens, mask, teacher.map_sizes, batch=batch, planes=True)
            sentence = teacher._sentence(sentence)
            std = torch.tensor([1.0, self.config.temperature], device=sentence.device).repeat(len(texts))[:len(texts)]
            z = torch.randn(len(texts), self.config.z_dim, device=sentence.device) * std[:, None]
            target = teacher.generator(z, sentence, maps)
        picture = self.generator(z, sentence, maps[:len(self.map_sizes)] if maps else None)
        l1 = (picture.float() - target.float()).abs().mean()
        return l1, {"distill_l1": l1.detach()}

    def discriminator_loss(self, images, fake, sentence, full=None) -> tuple[torch.Tensor, dict]:
        """Hinge loss: real images with their own text high; fakes (detached: this term never
        reaches the generator) and real images with another row's text low. Plus the
        matching-aware gradient penalty on real images with their own text, every gp_every steps."""
        b = images.size(0)
        d = self.discriminator
        real = d.trunk(images, full)
        d_real = d.judge(real, sentence, full)
        d_fake = d(fake.detach(), sentence, full)
        d_mismatch = d_fake
        if b > 1:  # the real pictures with the next row's text: their trunk is the same where it reads the image alone
            shifted = full[1:] if full is not None else None
            if d.shares_trunk(full):
                h, at_patch = real
                d_mismatch = d.judge((h[:-1], None if at_patch is None else at_patch[:-1]), sentence[1:], shifted)
            else:
                d_mismatch = d(images[:-1], sentence[1:], shifted)
        d_loss = per_head_mean(F.relu(1 - d_real)) + 0.5 * (per_head_mean(F.relu(1 + d_fake))
                                                            + per_head_mean(F.relu(1 + d_mismatch)))
        gp = images.new_zeros(())
        every = max(self.config.gp_every, 1)
        if self.config.gp_weight > 0 and (not self.training or int(self.step) % every == 0):
            x = images.detach().requires_grad_(True)
            s = sentence.detach().requires_grad_(True)
            scores = self.discriminator(x, s, full)  # each row's own gradient, the patch head at its loss weight
            grad_x, grad_s = torch.autograd.grad(per_head_mean(scores) * len(scores), (x, s), create_graph=True)
            norm = torch.sqrt(grad_x.flatten(1).pow(2).sum(1) + grad_s.pow(2).sum(1) + 1e-12)
            gp = every * self.config.gp_weight * norm.pow(self.config.gp_power).mean()
        logs = {"d_loss": d_loss.detach(), "gp": gp.detach(),
                # the share D judges right: real with its own text above 0, fakes and mismatched text below
                "d_acc_real": (d_real[:, 0] > 0).float().mean(), "d_acc_fake": (d_fake[:, 0] < 0).float().mean(),
                "d_acc_mismatch": (d_mismatch[:, 0] < 0).float().mean()}
        if d_real.size(1) > 1:  # the patch head's share right
            logs["d_acc_patch_real"] = (d_real[:, 1:] > 0).float().mean()
            logs["d_acc_patch_fake"] = (d_fake[:, 1:] < 0).float().mean()
        return d_loss + gp, logs

    def generator_loss(self, fake, sentence, full=None) -> torch.Tensor:
        """The generator's hinge term against the discriminator's current parameters, detached:
        this term trains only the generator (and never the text encoder or the layout stage)."""
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        return -per_head_mean(functional_call(self.discriminator, frozen, (fake, sentence.detach(),
                                                                          full.detach() if full is not None else None)))

    def mode_seeking_loss(self, z, fake, sentence, maps=None) -> torch.Tensor:
        """MSGAN (Mao et al. 2019): a second draw for the same texts; the generator is penalised
        when two noise vectors give nearly the same picture (image distance over noise distance
        small): one look per prompt is what a conditional GAN drifts to. Trains the generator only."""
        z2 = torch.randn_like(z)
        fake2 = self.generator(z2, sentence.detach(), [m.detach() for m in maps] if maps else None)
        ratio = (fake - fake2).abs().mean((1, 2, 3)) / (z - z2).abs().mean(1)
        return self.config.mode_seeking / (ratio.mean() + 1e-5)

    def _sentence(self, pooled: torch.Tensor) -> torch.Tensor:
        """The sentence vector G and D read: zeros with `layout_only` (the layout map says it all)."""
        return torch.zeros_like(pooled) if self.config.layout_only else pooled

    def on_train_step(self, step: int) -> None:
        self.step.fill_(step)

    @property
    def noise_shape(self) -> tuple[int]:
        return (self.config.z_dim,)

    @torch.no_grad()
    def generate(self, texts, seeds, strict: bool = False):
        return self.generate_by_draw(texts, seeds, strict=strict)

    def draw(self, noise, tokens, mask, pooled, layout=None) -> torch.Tensor:
        """Standard-normal z (B, z_dim), the sentence vector and a sampled layout (or None) -> pictures."""
        z, sentence = noise * self.config.temperature, self._sentence(pooled)
        return self.in_drawing_chunks(lambda rows, maps: self.generator(z[rows], sentence[rows], maps),
                                      len(z), z.device, layout)
