"""Where prepared artefacts live: the ``ArtifactStore`` interface and its local implementation.

    base.py     the interface (what the library, the engines' callers and the tools use)
    local.py    the store in a folder: an sqlite index (index.py) and object files (objects.py)
    shared.py   the store in a folder several machines mount: no index, one file per artefact
    tiered.py   a local store as the read-through cache of a shared one
"""

from voiced.store.base import ArtifactStore, StoreStats
from voiced.store.local import LocalStore
from voiced.store.shared import FolderStore
from voiced.store.tiered import TieredStore, open_store

__all__ = ["ArtifactStore", "FolderStore", "LocalStore", "StoreStats", "TieredStore", "open_store"]
