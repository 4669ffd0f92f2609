"""Image loading and the named preprocessing presets (resize, crop, normalize)."""

from __future__ import annotations

import itertools
import math
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported where it is used: the ONNX runtime's path runs without it
    import torch

MAX_PIXELS = 89_478_485  # Pillow's default bomb limit; larger images are refused


ORIENTATION = 0x0112  # the EXIF tag


class ImageLoadError(ValueError):
    """An image that cannot be used, with the file named in the message."""


def load_image(path: str | Path | BinaryIO, max_pixels: int | None = None, max_side: int | None = None,
               name: str | None = None) -> Image.Image:
    """Open an image file (or binary stream) as RGB (any mode, EXIF orientation applied).

    More than `max_pixels` (read from the header, before any pixel is decoded) is refused;
    with `max_side`, a larger image is reduced while it decodes (JPEG draft mode) and then
    shrunk, before the RGB copy, so memory stays near the kept size. `name` names a stream."""
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    path = Path(path) if isinstance(path, (str, Path)) else path
    label = name or str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > max_pixels:  # checked before any pixel is decoded
                    raise Image.DecompressionBombError(f"{img.width}x{img.height} is over {max_pixels} pixels")
                if max_side is not None and max(img.size) > max_side:
                    img.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale
                    img.thumbnail((max_side, max_side))
                if img.getexif().get(ORIENTATION, 1) != 1:  # turned as the camera held it (a copy; else none)
                    img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"{label}: refused, too many pixels (decompression bomb?): {e}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{label}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{label}: corrupt or truncated image: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        img.load()
        return img.copy()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def check_image(path: str | Path) -> str | None:
    """None when the file loads as an image, else the reason it does not."""
    try:
        load_image(path)
    except ImageLoadError as e:
        return str(e)
    return None


Preset = Literal["shapes64", "shapes64-train", "shapes64-warp", "small64", "gray32", "gray32-train", "imagenet224", "imagenet224-train"]
PRESETS: tuple[str, ...] = ("shapes64", "shapes64-train", "shapes64-warp", "small64", "small64-train", "gray32", "gray32-train",
                            "imagenet224", "imagenet224-train")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_transform(preset: Preset = "shapes64"):
    """PIL image -> normalized float tensor (3, H, W), by preset name.

    The evaluation presets are plain Pillow and numpy (`Preprocess`), giving the same tensors as
    the torchvision pipelines they replace, so that captioning an image never imports torchvision
    (whose import pulls in torch._dynamo: over a second of start-up); the training presets use
    torchvision's random transforms.

    - `shapes64`: 64x64 as is (resized if needed), scaled to [-1, 1].
    - `shapes64-train`: `shapes64`, and on half the pictures a Gaussian blur of radius 0.3-1.2
      pixels, for training a captioner that must read generated pictures, whose edges are softer
      than the renderer's (xmodal's transformer captioner read novel scenes blurred by 1.1 px at
      61%, sharp at 99.7%).
    - `shapes64-warp`: `shapes64-train`, and on half the pictures an elastic warp (torchvision's
      displacement field, alpha 20, sigma 3: about 0.5 px on average, up to 2): a captioner
      trained on it read `shapes-gan`'s lumpy novel shapes at 86.3% against 79.0%, but sharp
      renders at 99.5% / 97.9% against 100% / 99.7%, so the bundled one does not use it.
    - `small64`: shorter side to 64, centre crop 64, scaled to [-1, 1] (any photo for small models).
    - `small64-train`: a random crop of 50-100% of the picture (aspect 3:4 to 4:3) resized to 64x64
      and flipped left-right at random, scaled to [-1, 1], for training on small pictures (clipart).
    - `gray32`: grayscale (in 3 equal channels), a 28x28 picture padded with black to 32x32
      (Fashion-MNIST's garments are light on black), others resized to 32x32; scaled to [-1, 1].
    - `gray32-train`: `gray32` shifted by up to 2 pixels and flipped left-right at random, and on half
      the pictures a random rectangle (2-25% of the area) painted black (random erasing, Zhong et
      al. 2020), for training.
    - `imagenet224`: shorter side to 256, centre crop 224, ImageNet mean/std.
    - `imagenet224-train`: random resized crop 224 and horizontal flip, ImageNet mean/std.
    """
    if preset in Preprocess.PRESETS:
        return Preprocess(preset)
    if preset not in PRESETS:
        raise ValueError(f"unknown image preset {preset!r}; valid: {PRESETS}")
    import torch
    from torchvision.transforms import v2

    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if preset == "small64-train":
        return v2.Compose([v2.RandomResizedCrop(64, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                           *to_float, v2.Normalize([0.5] * 3, [0.5] * 3)])
    if preset == "gray32-train":
        return Gray32Train()
    if preset == "shapes64-train":
        return Shapes64Train()
    if preset == "shapes64-warp":
        return Shapes64Train(warp=20.0)
    return v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), *to_float,
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # imagenet224-train


class Preprocess:
    """An evaluation preset: resize / crop / pad with Pillow, then scale and normalize in numpy."""

    PRESETS = ("shapes64", "small64", "gray32", "imagenet224")

    def __init__(self, preset: str):
        if preset not in self.PRESETS:
            raise ValueError(f"{preset!r} is not an evaluation preset; valid: {self.PRESETS}")
        self.preset = preset
        self.geometry = _GEOMETRY[preset]
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if preset == "imagenet224" else ((0.5,) * 3, (0.5,) * 3)
        # each channel's 256 values, scaled then normalized as torchvision does it (the same float32
        # operations, so the same numbers): a lookup per pixel, a third of the time of the arithmetic
        levels = np.arange(256, dtype=np.float32)[None] * np.float32(1 / 255)
        self._levels = (levels - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]  # (3, 256)

    def __call__(self, img: Image.Image):
        """The (3, H, W) float tensor."""
        import torch

        return torch.from_numpy(self.array(img))

    def array(self, img: Image.Image) -> np.ndarray:
        """The same as a numpy array (3, H, W) float32: no torch needed (the ONNX runtime's path)."""
        return self.batch([img])[0]

    def batch(self, images: Iterable[Image.Image]) -> np.ndarray:
        """PIL images -> (B, 3, H, W) float32, normalized together (`pixels`, then `stack`)."""
        return self.stack([self.pixels(img) for img in images])

    def load(self, path: str | Path) -> np.ndarray:
        """`pixels` of an image file: a plain PNG already at the preset's size straight from its
        bytes (`plain_png`), anything else through `load_image` (an unreadable file raises
        ImageLoadError)."""
        native = _NATIVE.get(self.preset)
        pixels = plain_png(path, *native) if native else None
        return self.pixels(load_image(path)) if pixels is None else pixels

    def pixels(self, img: Image.Image) -> np.ndarray:
        """The picture resized / cropped / padded as the preset does, as uint8 (H, W) or (H, W, 3):
        the per-picture half of `array`, which `stack` finishes for a whole batch at once."""
        return np.asarray(self.geometry(img))

    def stack(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """`pixels` of a batch -> (B, 3, H, W) float32, scaled and normalized together."""
        if len({p.shape for p in pixels}) > 1:  # gray planes beside colour pictures: gray to all three
            pixels = [p[..., None].repeat(3, -1) if p.ndim == 2 else p for p in pixels]
        batch = np.stack(pixels)
        batch = batch[..., None] if batch.ndim == 3 else batch  # (B, H, W, 1 or 3) uint8
        array = np.empty((len(batch), 3, *batch.shape[1:3]), np.float32)
        for c in range(3):  # a gray plane to all three channels
            array[:, c] = self._levels[c][batch[..., c % batch.shape[-1]]]
        return array

    def __repr__(self) -> str:
        return f"Preprocess({self.preset!r})"


def _resize_shorter(img: Image.Image, side: int) -> Image.Image:
    """The shorter side to `side`, the longer in proportion (rounded down, as torchvision does)."""
    w, h = img.size
    size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    return img if size == img.size else img.resize(size, Image.BILINEAR)


def _center_crop(img: Image.Image, side: int) -> Image.Image:
    if img.width < side or img.height < side:  # torchvision pads with black
        canvas = Image.new(img.mode, (max(side, img.width), max(side, img.height)))
        canvas.paste(img, ((canvas.width - img.width) // 2, (canvas.height - img.height) // 2))
        img = canvas
    left, top = int(round((img.width - side) / 2.0)), int(round((img.height - side) / 2.0))
    return img.crop((left, top, left + side, top + side))


class _PadOrResize:
    """A picture up to `side` on both sides is centred on black (no resampling); a larger one is resized."""

    def __init__(self, side: int):
        self.side = side

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.width <= self.side and img.height <= self.side:
            canvas = Image.new(img.mode, (self.side, self.side))
            canvas.paste(img, ((self.side - img.width) // 2, (self.side - img.height) // 2))
            return canvas
        return img.resize((self.side, self.side), Image.BILINEAR)



class Gray32Train:
    """The `gray32-train` preset: `gray32` shifted by up to 2 pixels (black comes in), flipped
    left-right on half the pictures, and on half a random rectangle of 2-25% of the area (aspect
    0.3 to 3.3) painted black: torchvision's RandomCrop(32, padding=2), RandomHorizontalFlip and
    RandomErasing(0.5, (0.02, 0.25)), done on one 32x32 numpy array (50 us a picture here
    against their 300, which starved the training step). Draws from torch's global RNG, as they
    do, so the trainer's per-step seeding decides every augmentation."""

    def __call__(self, img: Image.Image):
        import torch

        padded = np.zeros((36, 36), np.float32)  # np.pad took as long as everything else here
        padded[2:34, 2:34] = np.asarray(_gray32(img), dtype=np.float32) * np.float32(1 / 255)
        dy, dx = torch.randint(0, 5, (2,)).tolist()
        flip, erase = (torch.rand(2) < 0.5).tolist()
        shifted = padded[dy:dy + 32, dx:dx + 32]
        out = np.array(shifted[:, ::-1] if flip else shifted)
        if erase:
            self._erase(out)
        out -= np.float32(0.5)
        out /= np.float32(0.5)
        return torch.from_numpy(out).expand(3, 32, 32)  # one gray plane read as 3 channels; the batch stacks it

    @staticmethod
    def _erase(array: np.ndarray) -> None:
        import torch

        side = array.shape[0]
        for _ in range(10):  # as RandomErasing: a box that fits, or none after 10 tries
            area, log_ratio = torch.rand(2).tolist()
            area = side * side * (0.02 + 0.23 * area)
            ratio = math.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * log_ratio)
            h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if h < side and w < side:
                top, left = torch.randint(0, side - h + 1, (1,)).item(), torch.randint(0, side - w + 1, (1,)).item()
                array[top:top + h, left:left + w] = 0.0
                return


class Shapes64Train:
    """The `shapes64-train` preset: `shapes64`, blurred on half the pictures by a Gaussian of
    radius (sigma) drawn from 0.3-1.2 pixels (Pillow's). Takes a PIL image or (H, W, 3) uint8
    pixels; draws from torch's global RNG, so the trainer's per-step seeding decides it."""

    def __init__(self, warp: float = 0.0):
        self.plain = Preprocess("shapes64")
        self.warp = warp

    def __call__(self, img):
        import torch
        from PIL import ImageFilter

        img = _shapes64(Image.fromarray(np.asarray(img)) if isinstance(img, np.ndarray) else img.convert("RGB"))
        blur, radius = torch.rand(2).tolist()
        if blur < 0.5:  # stronger (three pictures in four, up to 1.6 px) read generated scenes no better
            img = img.filter(ImageFilter.GaussianBlur(0.3 + 0.9 * radius))
        if self.warp and torch.rand(()).item() < 0.5:
            return _elastic(self.plain(img), self.warp)
        return self.plain(img)


def _elastic(image, alpha: float, sigma: float = 3.0):
    """A (3, H, W) picture bent by a smooth random displacement field (torchvision's elastic
    transform, `alpha` its strength), the border filled with the picture's corner colour."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    side = image.shape[-1]
    noise = torch.rand(2, 1, side, side) * 2 - 1
    field = TF.gaussian_blur(noise, [int(8 * sigma) | 1] * 2, [sigma, sigma]) * alpha / side  # (2, 1, H, W)
    corner = image[:, 0, 0]
    bent = TF.elastic(image - corner[:, None, None], field.permute(1, 2, 3, 0), fill=0.0)
    return bent + corner[:, None, None]


# The resize / crop / pad step of each evaluation preset, as the torchvision pipelines did it
# (module functions, so that a Preprocess pickles into DataLoader workers).
def _shapes64(img: Image.Image) -> Image.Image:
    return img.resize((64, 64), Image.BILINEAR)


def _small64(img: Image.Image) -> Image.Image:
    return _center_crop(_resize_shorter(img, 64), 64)


def _gray32(img: Image.Image) -> Image.Image:
    return _PadOrResize(32)(img.convert("L"))


def _imagenet224(img: Image.Image) -> Image.Image:
    return _center_crop(_resize_shorter(img, 256), 224)


_GEOMETRY = {"shapes64": _shapes64, "small64": _small64, "gray32": _gray32, "imagenet224": _imagenet224}
# (side, PNG colour types) whose geometry leaves a side x side picture as it is: 0 gray, 2 RGB
# (gray32 turns colour into gray with Pillow's weights, so it takes gray files only)
_NATIVE = {"shapes64": (64, (0, 2)), "small64": (64, (0, 2)), "gray32": (32, (0,))}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# chunks that change nothing Pillow's RGB picture holds; any other (palette, transparency, colour
# profile, gamma, EXIF orientation, ...) sends the file to Pillow
_PLAIN_CHUNKS = frozenset({b"IHDR", b"IDAT", b"IEND", b"pHYs", b"tEXt", b"zTXt", b"iTXt", b"tIME"})
_PLAIN_MAX_BYTES = 1 << 20  # a side x side PNG of a preset is a few KB; a larger file goes to Pillow


def plain_png(path: str | Path, side: int, colours: tuple[int, ...]) -> np.ndarray | None:
    """The uint8 pixels, (side, side) gray or (side, side, 3), of an 8-bit, non-interlaced PNG of one
    of `colours` with only `_PLAIN_CHUNKS`, decoded by libspng (pyspng: 50 us a 64 px picture
    against Pillow's 170 with `load_image`, the same pixels); None for any other file, or without
    pyspng, so that Pillow reads it (and names what is wrong with a corrupt one)."""
    try:
        import pyspng
    except ImportError:
        return None
    try:
        if not os.path.isfile(path):  # a device, a FIFO or a folder under a picture's name: Pillow's concern
            return None
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(size + 1) if size <= _PLAIN_MAX_BYTES else b""  # bounded even if the file grows
    except OSError:
        return None
    if not 33 <= len(data) <= _PLAIN_MAX_BYTES or not data.startswith(_PNG_SIGNATURE):
        return None
    width, height, depth, colour, _, _, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if (width, height, depth, interlace) != (side, side, 8, 0) or colour not in colours:  # Adam7 files: Pillow
        return None
    position, kind = 8, b""
    while position + 12 <= len(data):  # every chunk plain, and whole: its CRC checked (libspng let a bad one pass)
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + 8 + length
        if kind not in _PLAIN_CHUNKS or end + 4 > len(data):
            return None
        if zlib.crc32(data[position + 4:end]) != struct.unpack_from(">I", data, end)[0]:
            return None
        position = end + 4
    if kind != b"IEND":
        return None
    try:
        pixels = pyspng.load(data)
    except Exception:  # libspng's own errors for a corrupt file: Pillow reads it again and names the fault
        return None
    return pixels if pixels.shape[:2] == (side, side) and pixels.dtype == np.uint8 else None

def to_pil(tensor: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [-1, 1] -> PIL RGB image."""
    return to_pils(tensor[None])[0]


def to_pils(batch: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B PIL RGB images, the levels computed for the batch at once."""
    levels = ((batch.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return [Image.fromarray(array) for array in levels.permute(0, 2, 3, 1).contiguous().cpu().numpy()]


@dataclass
class GeneratedImage:
    """One picture a generator made, with the prompt and seed it was made from."""

    prompt: str
    seed: int
    image: Image.Image


def stream_images(render, jobs: Iterable[tuple[str, int]], batch_size: int,
                  progress: Callable[[int], None] | None = None, map_chunks=map) -> Iterator[GeneratedImage]:
    """GeneratedImages for (prompt, seed) jobs as they are made, in order: `render(prompts, seeds)`
    on `batch_size` jobs at a time, read lazily (a million jobs cost no memory up front). The
    chunks are rendered by `map_chunks(fn, chunks)` (one after another by default; in order on
    several threads with `Parts.map_ordered`)."""
    jobs = iter(jobs)

    def draw(chunk: list[tuple[str, int]]) -> tuple[list, list]:
        return chunk, render([p for p, _ in chunk], [s for _, s in chunk])

    for chunk, images in map_chunks(draw, iter(lambda: list(itertools.islice(jobs, batch_size)), [])):
        yield from (GeneratedImage(p, s, img) for (p, s), img in zip(chunk, images))
        if progress is not None:
            progress(len(chunk))
