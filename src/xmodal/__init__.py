"""xmodal: cross-modal generation, text -> image and image -> text.

    import xmodal
    captioner = xmodal.load("shapes-captioner-transformer")
    captions = captioner(images)

Importing xmodal touches no network and no GPU; heavy modules load on first use.
"""

from __future__ import annotations

from xmodal._version import __version__

__all__ = ["load", "list_models", "__version__"]


def load(name_or_dir, device="cpu"):
    """A pipeline for a bundled model name or a saved model folder (see `xmodal.api.load`)."""
    from xmodal.api import load as _load

    return _load(name_or_dir, device)


def list_models() -> list[dict]:
    """The bundled models with their task and measured quality (see `xmodal.api.list_models`)."""
    from xmodal.api import list_models as _list

    return _list()
