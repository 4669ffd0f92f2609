import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("XMODAL_CACHE_DIR", tempfile.mkdtemp(prefix="xmodal-test-cache-"))  # not the user's ~/.cache
sys.path.insert(0, str(Path(__file__).parent / "helpers"))
