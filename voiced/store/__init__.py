"""Where prepared artefacts live: the ``ArtifactStore`` interface and its local implementation.

    base.py     the interface (what the library, the engines' callers and the tools use)
    local.py    the store in a folder: an sqlite index (index.py) and object files (objects.py)
"""

from voiced.store.base import ArtifactStore, StoreStats
from voiced.store.local import LocalStore

__all__ = ["ArtifactStore", "LocalStore", "StoreStats"]
