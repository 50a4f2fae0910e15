"""A small, bounded on-disk cache of rendered images and thumbnails.

Entries live under ``<data>/cache/rendered`` as ``<sha256 of the key>.bin``. The key joins the
SOP Instance UID, the stored file's digest and the rendering parameters, so that a replaced
instance (another digest) can never be served from a stale entry; entries of the old content
simply age out. The total size is bounded: least recently used entries are removed first. Writes
go to a temporary file renamed into place, so a reader never sees a partial entry; nothing here
needs to be durable (an entry lost in a crash is rendered again).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

from gateway.storage import PRIVATE_FILE, make_private_folders

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024**2
SUFFIX = ".bin"


def cache_key(sop_instance_uid: str, digest: str, *parts: object) -> str:
    """The hex key of one rendered output.

    >>> len(cache_key("1.2.3", "ab" * 32, "image/jpeg", 1))
    64
    """
    text = "\x1f".join([sop_instance_uid, digest, *map(repr, parts)])
    return hashlib.sha256(text.encode()).hexdigest()


class RenderCache:
    """A size-bounded LRU of byte strings on disk, safe to share between threads.

    Parameters
    ----------
    root
        The folder (created if missing). Entries already there are adopted, oldest first.
    max_bytes
        The bound on the total size of the entries; 0 disables the cache.
    """

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.total = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        if max_bytes > 0:
            make_private_folders(root)
            self._adopt()

    def _adopt(self) -> None:
        found: list[tuple[float, str, int]] = []
        for entry in os.scandir(self.root):
            if entry.name.endswith(SUFFIX) and entry.is_file():
                stat = entry.stat()
                found.append((stat.st_mtime, entry.name[: -len(SUFFIX)], stat.st_size))
            elif not entry.name.endswith(SUFFIX):
                _unlink(Path(entry.path))  # a temporary file left by a crash
        for _, key, size in sorted(found):
            self._entries[key] = size
            self.total += size
        self._evict()

    def _path(self, key: str) -> Path:
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError("cache keys are sha256 hex digests (use cache_key)")
        return self.root / f"{key}{SUFFIX}"

    def get(self, key: str) -> bytes | None:
        """The cached bytes of ``key``, or ``None``."""
        if self.max_bytes <= 0:
            return None
        path = self._path(key)
        with self._lock:
            known = key in self._entries
            if known:
                self._entries.move_to_end(key)
        if not known:
            self.misses += 1
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            with self._lock:
                size = self._entries.pop(key, None)
                if size is not None:
                    self.total -= size
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, evicting the least recently used entries over the bound."""
        if self.max_bytes <= 0 or len(data) > self.max_bytes // 4:
            return
        path = self._path(key)
        temp = self.root / f".{key}.{secrets.token_hex(4)}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temp, path)
        except OSError as exc:
            _unlink(temp)
            logger.warning("render cache: cannot write an entry: %s", exc.strerror)
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self.total -= previous
            self._entries[key] = len(data)
            self.total += len(data)
            self._evict()

    def _evict(self) -> None:
        while self.total > self.max_bytes and self._entries:
            key, size = self._entries.popitem(last=False)
            self.total -= size
            _unlink(self.root / f"{key}{SUFFIX}")

    def __len__(self) -> int:
        return len(self._entries)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
