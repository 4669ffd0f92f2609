"""`xmodal search`: rank a folder's images by a text, or a data set's captions by an image,
with a dual encoder (`AlignmentPipeline`)."""

from __future__ import annotations

from pathlib import Path

from xmodal.data.files import expand_images
from xmodal.data.images import load_image
from xmodal.data.prepared import read_records


def search(model: str, folder: str | Path, text: str | None = None, image: str | Path | None = None,
           top: int = 5) -> list[dict]:
    """The `top` best matches: `{"image", "score"}` for a text query, `{"caption", "score"}` for an image."""
    from xmodal.pipelines import load_pipeline

    if (text is None) == (image is None):
        raise ValueError("give exactly one of --text or --image")
    if top < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    pipe = load_pipeline(model, "image-text-alignment")
    folder = Path(folder)
    if text is not None:
        paths = expand_images([folder])
        if not paths:
            raise ValueError(f"{folder}: no images to search")
        scores = (pipe.embed_images(paths) @ pipe.embed_texts([text])[0]).tolist()
        ranked = sorted(zip(scores, paths), key=lambda t: -t[0])[:top]
        return [{"image": str(p), "score": round(s, 4)} for s, p in ranked]
    texts = sorted({c for r in read_records(folder) for c in r["captions"]})
    scores = (pipe.embed_texts(texts) @ pipe.embed_images([load_image(image)])[0]).tolist()
    ranked = sorted(zip(scores, texts), key=lambda t: -t[0])[:top]
    return [{"caption": t, "score": round(s, 4)} for s, t in ranked]
