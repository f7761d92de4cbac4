"""The FAISS candidate index the service attaches to the editor's router (``horen_core.routing``):
``KeyIndex`` (key_index), the space it searches in (projection) and its sharded quantised scan
(sharded)."""

from service.index.key_index import KeyIndex
from service.index.sharded import default_scan_threads

__all__ = ["KeyIndex", "default_scan_threads"]
