"""Where the shared test photographs are: ``../shared/testdata`` beside the repository.

CI runs a clean clone with ``../shared`` next to it, wherever that clone lives, so nothing may
name an absolute path. ``CLIPCURATE_SHARED`` overrides the folder (e.g. for an installed copy
whose source tree is not beside ``shared``).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The shared folder: ``$CLIPCURATE_SHARED`` when set, else ``<repo>/../shared``."""
    env = os.environ.get("CLIPCURATE_SHARED")
    return Path(env) if env else REPO_ROOT.parent / "shared"


# The seven real camera JPEGs of img2dataset's own test suite (file names give width_height).
PHOTOS_DIR = shared_dir() / "testdata" / "img2dataset-resize"


def photos() -> list[Path]:
    """The test photographs, sorted by name (empty when the shared folder is missing)."""
    return sorted(PHOTOS_DIR.glob("*.jpg"))
