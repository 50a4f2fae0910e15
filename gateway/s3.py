"""Instances as objects in an S3-compatible store: ``[storage] url = s3://bucket/prefix``.

Keys are ``<prefix>/<study>/<series>/<sop>.<digest12>.dcm``: the same relative path as the
file store's (:func:`gateway.storage.relative_path`), from validated UIDs and the content's
digest, so a PUT made again of the same instance writes the same bytes under the same key.

A write (PS3.4 B.2.3: success only once the instance is kept): the PUT returns (the store has
it), the index row is committed and put on stable storage (:meth:`S3Storage.finish`), then the
sender is answered. A crash between the PUT and the commit leaves an object without a row; the
sweeper (:meth:`S3Storage.sweep`) removes such objects once older than ``[storage]
orphan_grace_seconds``, long after any commit could still name them. A delete removes the row
first and the object after (:meth:`S3Storage.delete_unindexed`), so no row names a missing
object.

Reads: :meth:`S3Storage.blob` reads byte ranges (a frame is one ranged GET, never the whole
object); :meth:`S3Storage.fetch_async` / :meth:`S3Storage.stream_async` serve WADO-RS with
bounded memory; :meth:`S3Storage.path` gives the readers that need a whole local file (C-MOVE,
C-GET, transcoding) a copy in ``<data>/cache/objects``, at most ``[storage] cache_bytes`` of
them, least recently used ones removed first.

The client is obstore (Rust's ``object_store``), chosen by measurement against boto3 and minio
on the same store (``bench/s3_clients.py``, docs/benchmarks.md): about a tenth of boto3's CPU
per request for small objects and ranged reads, and two to six times its requests per second.
"""

from __future__ import annotations

import configparser
import io
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import obstore
from obstore.store import S3Store

from gateway.config import SettingsError
from gateway.errors import StorageFull, Unavailable
from gateway.metrics import METRICS
from gateway.storage import PRIVATE_FILE, PendingWrite, delete_unnamed, make_private_folders

logger = logging.getLogger(__name__)

CHUNK = 1024 * 1024
# Header reads of a ranged blob (pydicom's parse, encapsulated items) fetch this much at a time.
RANGE_BUFFER = 64 * 1024
# /readyz asks the store at most this often (a probe per request would be a load of its own).
READY_PROBE_SECONDS = 1.0
# A PUT slower than this is logged (a sender's DIMSE timeout is often 30 s in all).
SLOW_PUT_SECONDS = 2.0
# Keys the sweeper looks at per round (a round every quarter of the grace).
SWEEP_KEYS_PER_ROUND = 20000
_CODE = re.compile(r"<Code>([^<]{1,64})</Code>")


class StoreUnusable(SettingsError):
    """The bucket cannot be used at start: missing, credentials refused, store unreachable.
    The message is one line naming what to change."""


def _reason(exc: BaseException) -> str:
    """One line from an obstore error: the S3 error code when the store sent one."""
    text = str(exc)
    found = _CODE.search(text)
    if found:
        return found.group(1)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    # obstore: "Generic S3 error: Error performing PUT <url> in 3ms, after 2 retries ... -
    # HTTP error: error sending request": the cause is after the last " - ".
    return first.rsplit(" - ", 1)[-1].strip()[:200]


def _profile(environ: os._Environ[str] | dict[str, str]) -> dict[str, str]:
    """Static keys and region of ``AWS_PROFILE`` (or ``default``) from the AWS shared files
    (``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_CONFIG_FILE``), for when the environment itself
    names no keys; the store's own chain (environment, web identity, container and instance
    roles) applies otherwise."""
    if environ.get("AWS_ACCESS_KEY_ID"):
        return {}
    name = environ.get("AWS_PROFILE") or environ.get("AWS_DEFAULT_PROFILE") or "default"
    home = Path.home() / ".aws"
    found: dict[str, str] = {}
    credentials = configparser.ConfigParser()
    credentials.read(environ.get("AWS_SHARED_CREDENTIALS_FILE") or home / "credentials")
    if credentials.has_section(name):
        section = credentials[name]
        for option, key in (("aws_access_key_id", "access_key_id"),
                            ("aws_secret_access_key", "secret_access_key"),
                            ("aws_session_token", "token")):
            if section.get(option):
                found[key] = section[option]
    config = configparser.ConfigParser()
    config.read(environ.get("AWS_CONFIG_FILE") or home / "config")
    section_name = name if name == "default" else f"profile {name}"
    if config.has_section(section_name) and config[section_name].get("region") \
            and not (environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")):
        found["region"] = config[section_name]["region"]
    return found


class _RangeReader(io.RawIOBase):
    """A seekable read-only file over an object, each read one ranged GET."""

    def __init__(self, blob: S3Blob) -> None:
        self.blob = blob
        self.name = blob.name  # pydicom names the data set after its file
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.blob.size()}
        self.position = max(base[whence] + offset, 0)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        length = min(len(view), self.blob.size() - self.position)
        if length <= 0:
            return 0
        data = self.blob.read_at(self.position, length)
        view[:len(data)] = data
        self.position += len(data)
        return len(data)


class S3Blob:
    """One stored object, read by byte ranges (:class:`gateway.storage.Blob`)."""

    def __init__(self, storage: S3Storage, relpath: str, size: int | None = None) -> None:
        self.storage = storage
        self.relpath = relpath
        self.key: Hashable = ("s3", storage.key(relpath))
        self.name = relpath.rsplit("/", 1)[-1]
        self._size = size  # the index's file_size when known: no HEAD request

    def size(self) -> int:
        if self._size is None:
            try:
                meta = obstore.head(self.storage.store, self.storage.key(self.relpath))
            except FileNotFoundError:
                raise
            except Exception as exc:
                raise self.storage.unavailable("read", exc) from None
            self._size = int(meta["size"])
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            data = obstore.get_range(self.storage.store, self.storage.key(self.relpath),
                                     start=offset, length=length)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise self.storage.unavailable("read", exc) from None
        METRICS.inc("gateway_object_store_read_bytes_total", len(data))
        return bytes(data)

    def open(self) -> io.BufferedReader:
        return io.BufferedReader(_RangeReader(self), buffer_size=RANGE_BUFFER)


class S3Spooled:
    """An instance received and checked, not yet PUT: its bytes (:meth:`S3Storage.spool`)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data


class S3Storage:
    """Instances as objects under ``s3://bucket/prefix``.

    Parameters
    ----------
    url
        ``s3://bucket`` or ``s3://bucket/prefix``.
    endpoint_url
        The S3 API's address for stores other than AWS; else ``AWS_ENDPOINT_URL_S3`` or
        ``AWS_ENDPOINT_URL`` if set, else AWS's own.
    data_dir
        The node's data folder: the object cache goes in its ``cache/objects``.
    timeout
        Seconds one request may take (connecting: a fifth of it).
    cache_bytes
        The most bytes of whole objects kept in the local cache.
    orphan_grace
        Seconds after which an object without an index row is swept (0: no sweeper here).
    flush_index
        Put the index's commits on stable storage before a write is reported done (no spool
        file holds the instance, unlike the file store).
    """

    local = False

    def __init__(self, url: str, *, endpoint_url: str | None, data_dir: Path,
                 timeout: float = 10.0, cache_bytes: int = 1024**3,
                 orphan_grace: float = 3600.0, min_free_bytes: int = 0,
                 flush_index: Callable[[], None] | None = None,
                 environ: dict[str, str] | None = None) -> None:
        parts = urlsplit(url)
        self.url = url
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        env = dict(os.environ if environ is None else environ)
        endpoint = endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        self.endpoint = endpoint
        options: Any = {  # obstore's ClientConfig
            "timeout": f"{max(int(timeout * 1000), 1)}ms",
            "connect_timeout": f"{max(int(timeout * 200), 1)}ms",
        }
        config: dict[str, Any] = {}
        if endpoint:
            config["endpoint"] = endpoint
            options["allow_http"] = endpoint.startswith("http://")
        # The AWS variables, passed as they are (obstore would read the process's own).
        for variable, key in (("AWS_ACCESS_KEY_ID", "access_key_id"),
                              ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
                              ("AWS_SESSION_TOKEN", "token"),
                              ("AWS_REGION", "region"), ("AWS_DEFAULT_REGION", "region")):
            if env.get(variable) and key not in config:
                config[key] = env[variable]
        config.update(_profile(env))
        if "region" not in config and not (env.get("AWS_REGION")
                                           or env.get("AWS_DEFAULT_REGION")):
            config["region"] = "us-east-1"  # what AWS assumes; other stores ignore it
        retry: Any = {"max_retries": 2, "retry_timeout": timedelta(seconds=timeout),
                 "backoff": {"init_backoff": timedelta(milliseconds=100),
                             "max_backoff": timedelta(seconds=1), "base": 2}}
        self.store = S3Store(self.bucket, client_options=options, retry_config=retry,
                             **config)
        self.data_dir = data_dir
        self.min_free_bytes = min_free_bytes
        self.cache = data_dir / "cache" / "objects"
        self.cache_bytes = cache_bytes
        self.orphan_grace = orphan_grace
        self.flush_index = flush_index
        self._cached: OrderedDict[str, int] = OrderedDict()
        self._cached_bytes = 0
        self._cache_lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}
        self._ready_at = 0.0
        self._ready_error: Unavailable | None = None
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._is_referenced: Callable[[list[str]], set[str]] | None = None
        self._exclusive: Callable[[], AbstractContextManager[bool]] | None = None
        self._sweep_offset: str | None = None

    # -- naming ------------------------------------------------------------------------------
    def key(self, relpath: str) -> str:
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def relpath_of(self, key: str) -> str | None:
        if not self.prefix:
            return key
        return key[len(self.prefix) + 1:] if key.startswith(self.prefix + "/") else None

    def unavailable(self, what: str, exc: BaseException) -> Unavailable:
        METRICS.inc("gateway_object_store_errors_total")
        return Unavailable(f"the object store ({self.url}) did not answer a {what}: "
                           f"{_reason(exc)}; nothing was kept, send it again later"
                           if what == "write" else
                           f"the object store ({self.url}) did not answer a {what}: "
                           f"{_reason(exc)}; try again later")

    # -- the processes sharing the store -----------------------------------------------------
    def attach(self, is_referenced: Callable[[list[str]], set[str]] | None = None,
               exclusive: Callable[[], AbstractContextManager[bool]] | None = None) -> None:
        """Check the bucket answers (else :class:`StoreUnusable`, one line), empty the local
        cache, and start the sweeper when ``is_referenced`` is given and a grace is set."""
        try:
            next(iter(obstore.list(self.store, prefix=self.prefix or None, chunk_size=1)),
                 None)
        except Exception as exc:
            reason = _reason(exc)
            hint = {
                "NoSuchBucket": "create the bucket, or fix the bucket in GATEWAY_STORAGE_URL",
                "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID (or the profile)",
                "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY (or the profile)",
                "AccessDenied": "give these credentials s3:ListBucket, GetObject, PutObject "
                                "and DeleteObject on the bucket",
            }.get(reason, "check GATEWAY_S3_ENDPOINT_URL and that the store is up")
            raise StoreUnusable(f"object store {self.url}"
                                f"{' at ' + self.endpoint if self.endpoint else ''}: "
                                f"{reason}; {hint}") from None
        if is_referenced is not None:  # the node's first process: no reader uses the cache yet
            shutil.rmtree(self.cache, ignore_errors=True)
        make_private_folders(self.cache)
        if is_referenced is not None and self.orphan_grace > 0:
            self._is_referenced = is_referenced
            self._exclusive = exclusive or (lambda: nullcontext(True))
            self._sweeper = threading.Thread(target=self._sweep_loop, name="object-sweeper",
                                             daemon=True)
            self._sweeper.start()

    def detach(self) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=10)
            self._sweeper = None

    # -- writing -----------------------------------------------------------------------------
    def free_bytes(self) -> int:
        return shutil.disk_usage(self.data_dir).free

    def check_space(self, needed: int) -> None:
        """Raise :class:`StorageFull` when the data folder (the index on SQLite, the cache)
        is below its free-space reserve; the store's own room is its own (a full store
        refuses the PUT: :class:`Unavailable`)."""
        if self.min_free_bytes and self.free_bytes() < self.min_free_bytes:
            raise StorageFull(
                f"the data folder has less than {self.min_free_bytes // 1024**2} MiB free "
                "(storage.min_free_bytes); free space or add storage")

    def check_ready(self) -> None:
        """Raise :class:`Unavailable` unless the store answered a listing within the last
        :data:`READY_PROBE_SECONDS`."""
        now = time.monotonic()
        if now - self._ready_at >= READY_PROBE_SECONDS:
            try:
                next(iter(obstore.list(self.store, prefix=self.prefix or None, chunk_size=1)),
                     None)
                self._ready_error = None
            except Exception as exc:
                self._ready_error = self.unavailable("listing", exc)
            self._ready_at = time.monotonic()
        if self._ready_error is not None:
            raise self._ready_error

    def spool(self, data: bytes | memoryview) -> S3Spooled:
        self.check_space(0)
        return S3Spooled(data)

    def discard(self, spooled: S3Spooled) -> None:
        spooled.data = b""

    def place(self, spooled: S3Spooled, relpath: str) -> PendingWrite:
        """PUT the instance under its key; returns once the store has it.

        Raises
        ------
        Unavailable
            The store did not take it (down, full, refused): nothing was kept.
        """
        started = time.perf_counter()
        size = len(spooled.data)
        try:
            obstore.put(self.store, self.key(relpath), bytes(spooled.data),
                        use_multipart=size > 64 * CHUNK)
        except Exception as exc:
            logger.error("object store PUT of %s failed: %s", relpath, _reason(exc))
            raise self.unavailable("write", exc) from None
        finally:
            spooled.data = b""
        took = time.perf_counter() - started
        METRICS.observe("gateway_object_store_put_seconds", took)
        if took > SLOW_PUT_SECONDS:
            logger.warning("object store PUT of %s (%d bytes) took %.1f s", relpath, size, took)
        return PendingWrite(relpath, "")

    def write(self, relpath: str, data: bytes) -> PendingWrite:
        return self.place(self.spool(data), relpath)

    def finish(self, pending: PendingWrite) -> None:
        """The row is committed: put it on stable storage before the caller answers (no spool
        file keeps the instance for recovery, as the file store's does)."""
        if self.flush_index is not None:
            self.flush_index()

    def abandon(self, pending: PendingWrite, *, keep_final: bool = False,
                flush: bool = True) -> None:
        """Undo a PUT whose row was not written (unless the object is someone's: same key,
        ``keep_final``). A failed delete is left to the sweeper."""
        if not keep_final:
            self._delete_key(pending.relpath)

    def settle(self) -> None:
        """Nothing in flight: every write is done when :meth:`place` returns."""

    def sync(self, timeout: float = 60.0) -> None:
        """Nothing in flight (see :meth:`settle`)."""

    def delete(self, relpath: str) -> None:
        self._delete_key(relpath)

    def delete_unindexed(self, relpaths: list[str], is_indexed: Callable[[str], bool]) -> int:
        """Delete the objects of rows already deleted (committed): those no row names now."""
        return delete_unnamed(relpaths, is_indexed, self._delete_key)

    def _delete_key(self, relpath: str) -> None:
        self._uncache(relpath)
        try:
            obstore.delete(self.store, self.key(relpath))
        except FileNotFoundError:
            pass
        except Exception as exc:
            logger.warning("object store DELETE of %s failed (%s); the sweeper removes it "
                           "later", relpath, _reason(exc))

    # -- reading -----------------------------------------------------------------------------
    def exists(self, relpath: str) -> bool:
        try:
            obstore.head(self.store, self.key(relpath))
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise self.unavailable("read", exc) from None
        return True

    def blob(self, relpath: str, size: int | None = None) -> S3Blob:
        """The object read by byte ranges; ``size`` (the index's ``file_size``) saves a HEAD."""
        return S3Blob(self, relpath, size)

    async def fetch_async(self, relpath: str) -> bytes:
        """The whole object (for small ones: WADO-RS fetches several at once)."""
        try:
            result = await obstore.get_async(self.store, self.key(relpath))
            data = bytes(await result.bytes_async())
            METRICS.inc("gateway_object_store_read_bytes_total", len(data))
            return data
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise self.unavailable("read", exc) from None

    async def stream_async(self, relpath: str) -> AsyncIterator[bytes]:
        """The object in chunks of about :data:`CHUNK` bytes (memory stays flat)."""
        try:
            result = await obstore.get_async(self.store, self.key(relpath))
            async for chunk in result.stream(min_chunk_size=CHUNK):
                METRICS.inc("gateway_object_store_read_bytes_total", len(chunk))
                yield bytes(chunk)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise self.unavailable("read", exc) from None

    def path(self, relpath: str) -> Path:
        """A local file holding the object: a copy in the cache, fetched if missing.

        Raises
        ------
        FileNotFoundError
            No such object (deleted meanwhile), as for a missing file.
        Unavailable
            The store did not answer.
        """
        local = self.cache / relpath
        with self._cache_lock:
            # A copy another process of the node ([dimse] workers) removed is fetched again.
            if relpath in self._cached and local.exists():
                self._cached.move_to_end(relpath)
                return local
            lock = self._fetching.setdefault(relpath, threading.Lock())
        with lock:
            try:
                with self._cache_lock:
                    if relpath in self._cached and local.exists():
                        return local
                size = self._fetch(relpath, local)
                with self._cache_lock:
                    self._cached_bytes += size - self._cached.pop(relpath, 0)
                    self._cached[relpath] = size
                    self._evict(keep=relpath)
            finally:
                with self._cache_lock:
                    self._fetching.pop(relpath, None)
        return local

    def _fetch(self, relpath: str, local: Path) -> int:
        make_private_folders(local.parent)
        temp = local.with_name(f".{secrets.token_hex(8)}.part")
        try:
            result = obstore.get(self.store, self.key(relpath))
            descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
            size = 0
            with os.fdopen(descriptor, "wb") as f:
                for chunk in result.stream(min_chunk_size=CHUNK):
                    f.write(chunk)
                    size += len(chunk)
            METRICS.inc("gateway_object_store_read_bytes_total", size)
            os.replace(temp, local)
        except FileNotFoundError:
            temp.unlink(missing_ok=True)
            raise
        except OSError:
            temp.unlink(missing_ok=True)
            raise
        except Exception as exc:
            temp.unlink(missing_ok=True)
            raise self.unavailable("read", exc) from None
        return size

    def _evict(self, keep: str) -> None:
        while self._cached_bytes > self.cache_bytes and len(self._cached) > 1:
            relpath, size = next(iter(self._cached.items()))
            if relpath == keep:
                break
            del self._cached[relpath]
            self._cached_bytes -= size
            (self.cache / relpath).unlink(missing_ok=True)

    def _uncache(self, relpath: str) -> None:
        with self._cache_lock:
            size = self._cached.pop(relpath, None)
            if size is not None:
                self._cached_bytes -= size
                (self.cache / relpath).unlink(missing_ok=True)

    # -- the sweeper -------------------------------------------------------------------------
    def _sweep_loop(self) -> None:
        interval = max(self.orphan_grace / 4, 0.5)
        while not self._stop.wait(interval):
            try:
                assert self._exclusive is not None
                with self._exclusive() as mine:  # one node at a time sweeps the bucket
                    if mine:
                        self.sweep()
            except Exception as exc:  # the store or the index down: the next round
                logger.warning("object sweep stopped: %s", _reason(exc))

    def sweep(self, now: datetime | None = None, budget: int = SWEEP_KEYS_PER_ROUND) -> int:
        """Look at up to ``budget`` keys, from where the last round stopped (a bucket of
        millions is swept a slice at a time), and delete those older than the grace that no
        index row names (an instance's or a rejected instance's); return how many."""
        assert self._is_referenced is not None
        limit = (now or datetime.now(UTC)) - timedelta(seconds=self.orphan_grace)
        removed = seen = 0
        last: str | None = None
        for batch in obstore.list(self.store, prefix=self.prefix or None,
                                  offset=self._sweep_offset, chunk_size=min(500, budget)):
            old: list[str] = []
            for meta in batch:
                last = meta["path"]
                relpath = self.relpath_of(meta["path"])
                if relpath is not None and relpath.endswith(".dcm") \
                        and meta["last_modified"] < limit:
                    old.append(relpath)
            seen += len(batch)
            named = self._is_referenced(old) if old else set()
            for relpath in old:
                if relpath not in named and not self._stop.is_set():
                    logger.warning("removing object %s: no index row names it (a write "
                                   "interrupted before its commit)", relpath)
                    self._delete_key(relpath)
                    removed += 1
            if seen >= budget:
                break
        else:
            last = None  # the listing ended: the next round starts again from the first key
        self._sweep_offset = last
        if removed:
            METRICS.inc("gateway_orphan_objects_removed_total", removed)
        return removed
