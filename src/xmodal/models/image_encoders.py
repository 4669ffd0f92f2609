"""Image encoders: grid features (B, N, D) and pooled features (B, D).

- `SmallCNN`: three conv stages for 64 px images -> an 8x8 grid (N = 64); `small-cnn-32` is the
  same with a first stage at full resolution, for 28-32 px pictures (Fashion-MNIST) -> 8x8.
- `FactorizedCNN`: a colour-blind form stream and a shape-blind colour stream, for
  flat-background pictures such as the Shapes world (compositional generalization).
- `ResNetEncoder`: torchvision ResNet-18/34/50 without its head; the last stage's
  grid (N = (H/32) * (W/32)). `weights=None` (random init, the default),
  `"imagenet"` (torchvision's own download, for online users only), or a path to
  a local state dict. `trainable=False` freezes it (feature extraction).

Every encoder has `forward_features(images) -> (B, N, D)` and
`forward_pooled(images) -> (B, D)`, and `out_dim`. The convolutions run on channels-last
input (NHWC), which oneDNN's CPU kernels are built for: 1.3x faster in fp32 and 2-3x with bf16
autocast here; the weights keep their layout, so saved files do not change.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

RESNETS = ("resnet18", "resnet34", "resnet50")
IMAGE_ENCODERS = ("small-cnn", "small-cnn-32", "factorized-cnn", *RESNETS)


def channels_last(images: torch.Tensor) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling (`nn.Upsample(scale_factor=2)`) in
    channels-last memory: this torch's kernel for NCHW tensors ran 30-50x slower on a CPU (5.5 ms
    against 0.18 for 8 x 64 x 32 x 32), and was a third of the diffusion decoder's time. The convolutions
    after it then run channels-last too: pictures differ by at most 1 level of 255 (rounding)."""
    return nn.functional.interpolate(channels_last(x), scale_factor=2, mode="nearest")


class Upsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample2x(x)


class SmallCNN(nn.Module):
    """3x64x64 -> (B, 64, D): conv-BN-ReLU stages, each halving the side after the first."""

    def __init__(self, width: int = 32, out_dim: int = 128, first_stride: int = 2):
        super().__init__()

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            stage(3, width, first_stride),  # 32x32 (64 px in, first_stride 2)
            stage(width, 2 * width, 2),  # 16x16
            stage(2 * width, out_dim, 2),  # 8x8
        )
        self.out_dim = out_dim

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.body(channels_last(images))  # (B, D, H', W')
        return grid.flatten(2).transpose(1, 2)  # (B, N, D)

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images).mean(dim=1)

    forward = forward_features


class FactorizedCNN(nn.Module):
    """Two streams for flat-background pictures (64 px -> (B, 64, D)): *form* and *colour*.

    The form stream sees only a soft foreground mask (each pixel's distance from the border
    colour, squashed), so it cannot tell colours apart; the colour stream sees each pixel
    alone (1x1 convolutions) and is averaged over the foreground of each grid cell, so it
    cannot tell shapes apart. Their grids are concatenated. Built for compositional
    generalization: a colour-shape pair never seen in training still gets the colour
    features of its colour and the form features of its shape. For photographs use a ResNet.
    """

    def __init__(self, width: int = 32, out_dim: int = 128, color_dim: int = 32, threshold: float = 0.2):
        super().__init__()
        if not 0 < color_dim < out_dim:
            raise ValueError(f"color_dim must be in 1..out_dim-1, got {color_dim} (out_dim {out_dim})")
        self.form = SmallCNN(width, out_dim - color_dim)
        self.form.body[0][0] = nn.Conv2d(1, width, 3, 2, 1, bias=False)  # one input channel: the mask
        self.color = nn.Sequential(nn.Conv2d(3, color_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(color_dim, color_dim, 1))
        self.threshold = threshold
        self.out_dim = out_dim

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=2)
        # the lower median (torch.median's), as a sort: ONNX has no median operator
        background = border.sort(dim=2).values[..., (border.size(2) - 1) // 2, None, None]  # (B, 3, 1, 1)
        distance = (images - background).abs().amax(dim=1, keepdim=True)  # (B, 1, H, W)
        mask = torch.sigmoid((distance - self.threshold) / 0.05)
        form = self.form.body(channels_last(mask))  # (B, Df, H/8, W/8)
        cell = h // form.size(2)
        return torch.cat([form, self._color(images, mask, cell)], dim=1).flatten(2).transpose(1, 2)  # (B, N, D)

    def _color(self, images: torch.Tensor, mask: torch.Tensor, cell: int) -> torch.Tensor:
        """The colour stream's per-pixel features averaged over each cell's foreground, (B, Dc, H/cell,
        W/cell). Its last layer is linear, so it is applied to the cells' means, not to every pixel:
        the same numbers (to rounding), and the stream took 2.3 times as long the other way round; a
        non-negative mask also passes through the ReLU, so it multiplies the first layer's output in
        place."""
        first, _, last = self.color
        share = nn.functional.avg_pool2d(mask, cell)  # foreground share per cell
        hidden = nn.functional.avg_pool2d(torch.relu_(first(channels_last(images)).mul_(channels_last(mask))), cell)
        return (nn.functional.conv2d(hidden, last.weight) + last.bias[:, None, None] * share) / (share + 1e-4)

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images).mean(dim=1)

    forward = forward_features


class ResNetEncoder(nn.Module):
    def __init__(self, arch: str = "resnet18", weights: str | None = None, trainable: bool = True):
        super().__init__()
        import torchvision

        if arch not in RESNETS:
            raise ValueError(f"unknown ResNet {arch!r}; valid: {RESNETS}")
        tv_weights = None
        if weights == "imagenet":  # torchvision downloads these; only for users who are online
            tv_weights = torchvision.models.get_model_weights(arch).DEFAULT
        net = torchvision.models.get_model(arch, weights=tv_weights)
        if weights not in (None, "imagenet"):
            path = Path(weights)
            if not path.is_file():
                raise ValueError(f"ResNet weights {weights!r}: no such file (use None, 'imagenet' or a state-dict path)")
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if not k.startswith("fc.")]:
                raise ValueError(f"{path}: not a {arch} state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.body = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc
        self.out_dim = net.fc.in_features
        self.trainable = trainable
        self.requires_grad_(trainable)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.body.eval()  # frozen: batch-norm statistics stay as loaded
        return self

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.body(channels_last(images))  # (B, D, H/32, W/32)
        return grid.flatten(2).transpose(1, 2)  # (B, N, D)

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images).mean(dim=1)

    forward = forward_features


def create_image_encoder(name: str, width: int = 32, out_dim: int = 128, weights: str | None = None,
                         trainable: bool = True) -> nn.Module:
    if name == "small-cnn":
        return SmallCNN(width=width, out_dim=out_dim)
    if name == "small-cnn-32":
        return SmallCNN(width=width, out_dim=out_dim, first_stride=1)
    if name == "factorized-cnn":
        return FactorizedCNN(width=width, out_dim=out_dim, color_dim=max(1, out_dim // 4))
    if name in RESNETS:
        return ResNetEncoder(name, weights=weights, trainable=trainable)
    raise ValueError(f"unknown image encoder {name!r}; valid: {IMAGE_ENCODERS}")
