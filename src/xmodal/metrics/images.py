"""Image-set metrics: FID and KID through torchmetrics, with a pluggable feature extractor.

The default features are the embeddings of a trained dual encoder's image tower (ours, so
nothing downloads); `inception_weights` uses torchmetrics' InceptionV3 with the user's
weights file and adds the Inception Score.
"""

from __future__ import annotations

import numpy as np
import torch


class EmbeddingFeatures(torch.nn.Module):
    """A pluggable FID/KID feature extractor: a trained CLIP image tower (uint8 or [0, 1] images in)."""

    def __init__(self, clip_model):
        super().__init__()
        self.model = clip_model.eval()
        self.num_features = clip_model.config.embed_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        return self.model.encode_image(x * 2 - 1).double()


class EncoderFeatures(torch.nn.Module):
    """A pluggable FID/KID feature extractor: the pooled features of a trained image encoder (a
    captioner's), for uint8 images already preprocessed to the encoder's size (0..255 = -1..1)."""

    def __init__(self, image_encoder):
        super().__init__()
        self.encoder = image_encoder.eval()
        self.num_features = image_encoder.out_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_pooled(images.float() / 127.5 - 1).double()


def fid_kid(real: list[np.ndarray], fake: list[np.ndarray], extractor: torch.nn.Module | None = None,
            inception_weights: str | None = None, kid_subset: int = 100, input_size: int = 64) -> dict:
    """FID and KID between two image lists through torchmetrics, with our extractor or Inception
    (`inception_weights`: a torch-fidelity InceptionV3 state dict file; adds the Inception Score)."""
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    from torchmetrics.image.kid import KernelInceptionDistance

    if inception_weights:
        pool = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=inception_weights)
        kwargs = {"feature": pool}
    elif extractor is not None:
        kwargs = {"feature": extractor}
    else:
        raise ValueError("give a feature extractor or --inception-weights PATH (nothing here can download Inception)")
    subset = min(kid_subset, len(real), len(fake))
    fid = FrechetInceptionDistance(**kwargs, input_img_size=(3, input_size, input_size))
    kid = KernelInceptionDistance(**kwargs, subset_size=subset)
    for images, is_real in ((real, True), (fake, False)):
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8
        for metric in (fid, kid):
            metric.update(batch, real=is_real)
    with torch.random.fork_rng():  # KID averages over random subsets: the same sets give the same KID
        torch.manual_seed(0)
        kid_mean, kid_std = kid.compute()
    result = {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
    if inception_weights:  # Inception Score needs Inception's class logits: only with its weights
        from torchmetrics.image.inception import InceptionScore

        logits = NoTrainInceptionV3("inception-v3-compat", ["logits_unbiased"], feature_extractor_weights_path=inception_weights)
        score = InceptionScore(feature=logits, splits=min(10, len(fake)))
        score.update(torch.from_numpy(np.stack(fake)).permute(0, 3, 1, 2).contiguous())
        is_mean, is_std = score.compute()
        result.update({"inception_score": float(is_mean), "inception_score_std": float(is_std)})
    return result
