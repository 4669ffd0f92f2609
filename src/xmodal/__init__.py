"""xmodal: cross-modal generation, text -> image and image -> text.

Importing xmodal touches no network and no GPU; heavy modules load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"
