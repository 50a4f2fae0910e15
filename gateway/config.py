"""Settings: a TOML file and ``GATEWAY_*`` environment variables, the environment winning.

The file is named by ``--config FILE`` or ``GATEWAY_CONFIG``. Every setting has a default so that
the gateway runs with none (the embedded default: SQLite and a ``./data`` folder). The table of
environment variables below is the one place where names are mapped; README.md lists them.
"""

from __future__ import annotations

import base64
import binascii
import os
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import SettingsError
from gateway.forwarded import parse_networks


@dataclass(frozen=True)
class Peer:
    """A DIMSE peer's permissions, keyed by its AE title (like Orthanc's ``DicomModalities``).

    ``host`` (one address) and ``hosts`` (several) restrict the peer to those addresses: an AE
    title is only a name the caller chooses, so query/retrieve (``find``, ``move``, ``get``,
    off unless granted) is granted only to a peer whose addresses are named, or calling from
    loopback. Listing any peer with ``store = true`` turns storing into an allow-list of such
    peers.
    """

    host: str | None = None
    hosts: tuple[str, ...] = ()
    echo: bool = True
    store: bool = False
    find: bool = False
    move: bool = False
    get: bool = False

    @property
    def addresses(self) -> frozenset[str]:
        """The addresses this peer may call from; empty: any (then no query/retrieve)."""
        return frozenset(([self.host] if self.host else []) + list(self.hosts))


@dataclass(frozen=True)
class Destination:
    """A C-MOVE destination: where instances are sent for a given AE title."""

    host: str
    port: int
    tls: bool = False


@dataclass(frozen=True)
class DimseSettings:
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "DICOMGW"
    # Refuse associations whose Called AE Title is not ours (PS3.8 A-ASSOCIATE-RJ, reason 7).
    require_called_ae: bool = True
    max_associations: int = 32
    # DIMSE worker processes sharing the port (SO_REUSEPORT, Linux): one Python process is
    # bound by one core; several receive in parallel. 1 serves DIMSE in the main process only.
    workers: int = 1
    # Largest P-DATA PDU we accept; large PDUs cut the per-PDU overhead (BENCHMARKING.md).
    max_pdu_size: int = 262144
    # Seconds without a PDU before an association is aborted.
    network_timeout: float = 60.0
    # Seconds a new connection has to send its whole A-ASSOCIATE-RQ (PS3.8 ARTIM); closed after.
    association_request_timeout: float = 10.0
    # Connections still sending their A-ASSOCIATE-RQ: at most this many at once, and this many
    # from one address; one more is rejected (A-ASSOCIATE-RJ, local limit) and closed at once.
    max_pending_associations: int = 64
    max_pending_per_address: int = 8
    # Largest data set accepted in one C-STORE (held in memory while it arrives); a larger one
    # is read to its end, dropped, and refused 0xA700.
    max_data_set_bytes: int = 2 * 1024**3
    peers: Mapping[str, Peer] = field(default_factory=dict)
    destinations: Mapping[str, Destination] = field(default_factory=dict)
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_ca_certificates: Path | None = None


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    # Largest STOW-RS body accepted, in bytes.
    max_upload_bytes: int = 4 * 1024**3
    # Most parts in one STOW-RS body, and largest part (an instance, held in memory while it
    # is stored); 413 beyond, the parts before the limit stored.
    max_stow_parts: int = 10000
    max_part_bytes: int = 2 * 1024**3
    # Largest body of any other request (the portal API's JSON), in bytes; 413 beyond.
    max_json_bytes: int = 1024**2
    # Seconds a connection may go without a complete request head: before its first request,
    # between requests (keep-alive) and while a request line and headers trickle in (aiohttp
    # times all three with one timer). Longer than a fronting proxy's upstream keep-alive.
    idle_timeout: float = 75.0
    # Largest QIDO-RS page (PS3.18 §8.3.4.4); bigger `limit` values are cut with a Warning.
    max_results: int = 1000
    # Most candidate records whose stored attributes one QIDO-RS request parses to match
    # sequence keys (PS3.4 C.2.2.2.6); a query needing more is refused (400).
    max_sequence_scan: int = 20000
    cors_origins: tuple[str, ...] = ()
    # Public base URL used in RetrieveURL and link URLs when the gateway sits behind a proxy.
    base_url: str | None = None
    # Reverse proxies / load balancers (addresses or CIDR blocks) whose X-Forwarded-For names
    # the client (the trail's address, the refusal limits); from others the header is ignored.
    trusted_proxies: tuple[str, ...] = ()

    def public_root(self, scheme: str, host: str) -> str:
        """The server's absolute root for URLs in responses (RetrieveURL, BulkDataURI, link
        URLs): ``base_url`` when set (behind a proxy), else the request's scheme and host.

        >>> HttpSettings().public_root("http", "localhost:8080")
        'http://localhost:8080'
        >>> HttpSettings(base_url="https://pacs.example/").public_root("http", "10.0.0.5")
        'https://pacs.example'
        """
        return self.base_url.rstrip("/") if self.base_url else f"{scheme}://{host}"


@dataclass(frozen=True)
class StorageSettings:
    # Replace an instance when a different one arrives under a stored SOP Instance UID (never a
    # lossless one by a lossy copy; the same content in another encoding is a duplicate either
    # way: docs/conformance-storage.md).
    overwrite: bool = False
    # Refuse new instances (0xA700) when less than this many bytes are free in the data folder.
    min_free_bytes: int = 512 * 1024**2
    # fsync each file and the index commit before acknowledging (never switch off in production).
    fsync: bool = True
    # Write received instances of 64 KiB or more with O_DIRECT (around the page cache) where the
    # file system allows it; off: every write goes through the page cache.
    direct_io: bool = True
    # A deflated data set (1.2.840.10008.1.2.1.99) inflating past this many bytes is refused
    # (0xA700) and nothing kept: it is inflated as a stream to learn its size, and held whole
    # only when under the bound.
    max_inflated_bytes: int = 64 * 1024**2
    # Crash recovery reads each spool file left behind in a worker process given this many
    # CPU seconds per file; a file it cannot read, or not within them, is moved to
    # <data>/quarantine (never deleted), so that the node always comes up.
    recovery_file_seconds: float = 30.0
    # Where instances are kept: unset or file: = files in <data>/files; s3://bucket/prefix =
    # objects in an S3-compatible store (credentials and region the AWS way: AWS_ACCESS_KEY_ID,
    # AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_PROFILE).
    url: str | None = None
    # The S3 API's address for stores other than AWS (SeaweedFS, MinIO, Ceph...).
    s3_endpoint_url: str | None = None
    # Seconds one request to the object store may take (connecting: a fifth of it) before the
    # instance is refused (0xA700) or the retrieval answered 503.
    s3_timeout_seconds: float = 10.0
    # The most bytes of objects kept in <data>/cache/objects for the readers that need a local
    # file (C-MOVE/C-GET, transcoding); least recently used ones go first.
    cache_bytes: int = 1024**3
    # An object without an index row (a crash between its PUT and the commit) older than this
    # is removed by the sweeper, which runs every quarter of it; 0: no sweeper on this node.
    orphan_grace_seconds: float = 3600.0


# Standard Webhooks: a signing secret is "whsec_" and the base64 of 24 to 64 random bytes.
WEBHOOK_SECRET_PREFIX = "whsec_"
WEBHOOK_SECRET_BYTES = (24, 64)


@dataclass(frozen=True)
class Webhook:
    """A receiver of events (``[[events.webhooks]]``): its URL and Standard Webhooks secret.

    ``secret`` is ``whsec_`` followed by base64; ``secret_file`` names a file holding it
    instead (read once, at start). The secret never appears in a ``repr``.
    """

    url: str
    secret: str | None = field(default=None, repr=False)
    secret_file: Path | None = None

    @property
    def key(self) -> bytes:
        """The HMAC key: the secret's base64 part, decoded (checked at start)."""
        assert self.secret is not None
        return base64.b64decode(self.secret.removeprefix(WEBHOOK_SECRET_PREFIX))


@dataclass(frozen=True)
class EventsSettings:
    # Seconds without a new instance after which a study is announced (study.stable, or
    # study.updated for a study announced before).
    stable_seconds: float = 60.0
    # Seconds a webhook receiver has to answer one delivery; a later answer counts as a failure.
    delivery_timeout: float = 10.0
    # Longest wait between two attempts of a delivery (the backoff doubles up to it).
    retry_max_seconds: float = 300.0
    # From TOML only: [[events.webhooks]] url = ..., secret = ... (or secret_file = ...).
    webhooks: tuple[Webhook, ...] = ()


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("./data")
    database_url: str | None = None
    demo: bool = False
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one JSON object per line (log collectors)
    dimse: DimseSettings = field(default_factory=DimseSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    events: EventsSettings = field(default_factory=EventsSettings)
    # Free-form tables of the other front ends ([links], [auth], ...), read by them.
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def index_url(self) -> str:
        """The SQLAlchemy URL of the index: the setting, or SQLite inside the data folder."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.sqlite').resolve()}"


LOG_FORMATS = ("text", "json")

# Environment variable -> (section, key). Section "" is the top level.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "GATEWAY_DATA_DIR": ("", "data_dir"),
    "GATEWAY_DATABASE_URL": ("", "database_url"),
    "GATEWAY_DEMO": ("", "demo"),
    "GATEWAY_LOG_LEVEL": ("", "log_level"),
    "GATEWAY_LOG_FORMAT": ("", "log_format"),
    "GATEWAY_HTTP_HOST": ("http", "host"),
    "GATEWAY_HTTP_PORT": ("http", "port"),
    "GATEWAY_HTTP_MAX_UPLOAD_BYTES": ("http", "max_upload_bytes"),
    "GATEWAY_HTTP_MAX_RESULTS": ("http", "max_results"),
    "GATEWAY_HTTP_MAX_JSON_BYTES": ("http", "max_json_bytes"),
    "GATEWAY_HTTP_MAX_STOW_PARTS": ("http", "max_stow_parts"),
    "GATEWAY_HTTP_MAX_PART_BYTES": ("http", "max_part_bytes"),
    "GATEWAY_HTTP_MAX_SEQUENCE_SCAN": ("http", "max_sequence_scan"),
    "GATEWAY_HTTP_IDLE_TIMEOUT": ("http", "idle_timeout"),
    "GATEWAY_HTTP_CORS_ORIGINS": ("http", "cors_origins"),
    "GATEWAY_HTTP_BASE_URL": ("http", "base_url"),
    "GATEWAY_HTTP_TRUSTED_PROXIES": ("http", "trusted_proxies"),
    "GATEWAY_DIMSE_HOST": ("dimse", "host"),
    "GATEWAY_DIMSE_PORT": ("dimse", "port"),
    "GATEWAY_AE_TITLE": ("dimse", "ae_title"),
    "GATEWAY_DIMSE_MAX_ASSOCIATIONS": ("dimse", "max_associations"),
    "GATEWAY_DIMSE_MAX_PDU_SIZE": ("dimse", "max_pdu_size"),
    "GATEWAY_DIMSE_WORKERS": ("dimse", "workers"),
    "GATEWAY_DIMSE_MAX_DATA_SET_BYTES": ("dimse", "max_data_set_bytes"),
    "GATEWAY_DIMSE_ASSOCIATION_REQUEST_TIMEOUT": ("dimse", "association_request_timeout"),
    "GATEWAY_DIMSE_MAX_PENDING_ASSOCIATIONS": ("dimse", "max_pending_associations"),
    "GATEWAY_DIMSE_MAX_PENDING_PER_ADDRESS": ("dimse", "max_pending_per_address"),
    "GATEWAY_STORAGE_OVERWRITE": ("storage", "overwrite"),
    "GATEWAY_STORAGE_MIN_FREE_BYTES": ("storage", "min_free_bytes"),
    "GATEWAY_STORAGE_DIRECT_IO": ("storage", "direct_io"),
    "GATEWAY_STORAGE_MAX_INFLATED_BYTES": ("storage", "max_inflated_bytes"),
    "GATEWAY_STORAGE_RECOVERY_FILE_SECONDS": ("storage", "recovery_file_seconds"),
    "GATEWAY_STORAGE_URL": ("storage", "url"),
    "GATEWAY_S3_ENDPOINT_URL": ("storage", "s3_endpoint_url"),
    "GATEWAY_S3_TIMEOUT_SECONDS": ("storage", "s3_timeout_seconds"),
    "GATEWAY_STORAGE_CACHE_BYTES": ("storage", "cache_bytes"),
    "GATEWAY_STORAGE_ORPHAN_GRACE_SECONDS": ("storage", "orphan_grace_seconds"),
    "GATEWAY_EVENTS_STABLE_SECONDS": ("events", "stable_seconds"),
    "GATEWAY_EVENTS_DELIVERY_TIMEOUT": ("events", "delivery_timeout"),
    "GATEWAY_EVENTS_RETRY_MAX_SECONDS": ("events", "retry_max_seconds"),
}

_SECTIONS: dict[str, type] = {
    "dimse": DimseSettings,
    "http": HttpSettings,
    "storage": StorageSettings,
    "events": EventsSettings,
}


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Convert a TOML or environment value to the setting's declared type."""
    try:
        if "bool" in annotation:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(value)
        if "int" in annotation and "Mapping" not in annotation:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if "float" in annotation:
            return float(value)
        if "tuple" in annotation:
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        if "Path" in annotation:
            return None if value in (None, "") else Path(str(value))
        if value is None:
            return None
        return str(value)
    except (TypeError, ValueError):
        raise SettingsError(f"setting {name}: {value!r} is not a valid value") from None


def _build(cls: type, table: Mapping[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise SettingsError(f"unknown setting {where}{key}; see README.md for the list")
        annotation = str(known[key].type)
        if key == "peers":
            values[key] = {
                str(ae): _build(Peer, v, f"{where}peers.{ae}.") for ae, v in value.items()
            }
        elif key == "destinations":
            values[key] = {
                str(ae): _build(Destination, v, f"{where}destinations.{ae}.")
                for ae, v in value.items()
            }
        elif key == "webhooks":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise SettingsError(f"{where}webhooks: give each receiver as a [[events.webhooks]]"
                                    " table with url and secret (or secret_file)")
            values[key] = tuple(_webhook(v, f"{where}webhooks[{i}].")
                                for i, v in enumerate(value))
        else:
            values[key] = _coerce(where + key, value, annotation)
    missing = [f.name for f in known.values()
               if f.name not in values and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise SettingsError(f"settings {where.rstrip('.') or 'top level'}: missing {missing}")
    return cls(**values)


def _webhook(table: Mapping[str, Any], where: str) -> Webhook:
    """Build and check one webhook: an http(s) URL, and exactly one of ``secret`` and
    ``secret_file`` holding a Standard Webhooks secret (``whsec_`` + base64 of 24-64 bytes)."""
    hook: Webhook = _build(Webhook, table, where)
    parts = urlsplit(hook.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{where}url {hook.url!r} is not an http:// or https:// URL")
    if (hook.secret is None) == (hook.secret_file is None):
        raise SettingsError(f"{where}: give the receiver's signing secret as secret or as "
                            "secret_file, not both nor neither")
    secret = hook.secret
    if hook.secret_file is not None:
        try:
            secret = hook.secret_file.read_text().strip()
        except OSError as exc:
            raise SettingsError(f"{where}secret_file {hook.secret_file}: cannot read it "
                                f"({exc.strerror})") from None
    assert secret is not None
    low, high = WEBHOOK_SECRET_BYTES
    try:
        if not secret.startswith(WEBHOOK_SECRET_PREFIX):
            raise ValueError(secret)
        key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX), validate=True)
        if not low <= len(key) <= high:
            raise ValueError(secret)
    except (ValueError, binascii.Error):
        # The message never repeats the secret.
        raise SettingsError(
            f"{where}: the signing secret is not in Standard Webhooks' format: "
            f"'{WEBHOOK_SECRET_PREFIX}' followed by the base64 of {low} to {high} random bytes "
            "(e.g. from `python -c \"import base64, secrets; "
            "print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\"`)"
        ) from None
    return replace(hook, secret=secret)


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Read the settings: defaults, then the TOML file, then the environment, then overrides.

    Parameters
    ----------
    config_file
        A TOML file; when ``None``, ``GATEWAY_CONFIG`` names it if set.
    environ
        The environment to read (``os.environ`` by default).
    overrides
        Top-level settings given on the command line (e.g. ``demo=True``).

    Raises
    ------
    SettingsError
        On an unreadable file, an unknown key or a malformed value.
    """
    env = os.environ if environ is None else environ
    path = config_file or env.get("GATEWAY_CONFIG")
    table: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except OSError as exc:
            raise SettingsError(f"cannot read settings file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"settings file {path} is not valid TOML: {exc}") from None

    sections: dict[str, dict[str, Any]] = {name: dict(table.pop(name, {})) for name in _SECTIONS}
    top = {k: v for k, v in table.items() if not isinstance(v, dict)}
    extra = {k: v for k, v in table.items() if isinstance(v, dict)}
    for var, (section, key) in ENVIRONMENT.items():
        if var in env:
            (sections[section] if section else top)[key] = env[var]

    built = {name: _build(cls, sections[name], f"[{name}] ") for name, cls in _SECTIONS.items()}
    settings = _build(Settings, top, "")
    settings = replace(settings, extra=extra, **built)
    if overrides:
        settings = replace(settings, **overrides)
    _check(settings)
    return settings


def _check(settings: Settings) -> None:
    ae = settings.dimse.ae_title
    if not (0 < len(ae) <= 16) or not ae.isascii() or "\\" in ae or not ae.strip():
        raise SettingsError(f"AE title {ae!r} must be 1 to 16 ASCII characters without backslash")
    for name, port in (("http.port", settings.http.port), ("dimse.port", settings.dimse.port)):
        if not 0 <= port <= 65535:
            raise SettingsError(f"{name} {port} is not a TCP port")
    if not settings.http.idle_timeout > 0:
        raise SettingsError(f"http.idle_timeout {settings.http.idle_timeout} must be a positive "
                            "number of seconds")
    if not 1 <= settings.dimse.workers <= 64:
        raise SettingsError(f"dimse.workers {settings.dimse.workers} must be between 1 and 64")
    dimse = settings.dimse
    if not dimse.association_request_timeout > 0 or dimse.max_pending_associations < 1 \
            or dimse.max_pending_per_address < 1:
        raise SettingsError("dimse.association_request_timeout, max_pending_associations and "
                            "max_pending_per_address must be positive")
    seconds = settings.storage.recovery_file_seconds
    if not seconds >= 1:
        raise SettingsError(f"storage.recovery_file_seconds {seconds} must be at least 1 "
                            "(CPU seconds, counted in whole seconds)")
    _check_storage(settings.storage)
    parse_networks(settings.http.trusted_proxies)
    events = settings.events
    if not (events.stable_seconds > 0 and events.delivery_timeout > 0
            and events.retry_max_seconds >= 1):
        raise SettingsError("events.stable_seconds and events.delivery_timeout must be positive "
                            "numbers of seconds, events.retry_max_seconds at least 1")
    if len({hook.url for hook in events.webhooks}) != len(events.webhooks):
        raise SettingsError("events.webhooks: a URL is listed twice")
    if settings.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise SettingsError(f"log_level {settings.log_level!r}: use DEBUG, INFO, WARNING or ERROR")
    if settings.log_format not in LOG_FORMATS:
        raise SettingsError(f"log_format {settings.log_format!r}: use text or json")


def _check_storage(storage: StorageSettings) -> None:
    """The storage URL names a file: folder or an S3 bucket; the S3 endpoint is http(s)."""
    url = storage.url or ""
    parts = urlsplit(url)
    if url and parts.scheme not in ("file", "s3"):
        raise SettingsError(f"storage.url {url!r}: use s3://bucket/prefix for an object store, "
                            "or leave it unset (or file:) for files in the data folder")
    if parts.scheme == "file" and parts.path not in ("", "/"):
        raise SettingsError(f"storage.url {url!r}: files are always kept in the data folder; "
                            "set GATEWAY_DATA_DIR (data_dir) to move them, and use file: alone")
    if parts.scheme == "s3" and (not parts.netloc or parts.query or parts.fragment):
        raise SettingsError(f"storage.url {url!r}: give the bucket, as s3://bucket or "
                            "s3://bucket/prefix")
    endpoint = storage.s3_endpoint_url
    if endpoint:
        ends = urlsplit(endpoint)
        if ends.scheme not in ("http", "https") or not ends.hostname:
            raise SettingsError(f"storage.s3_endpoint_url {endpoint!r} is not an http:// or "
                                "https:// URL")
    if not storage.s3_timeout_seconds > 0 or storage.cache_bytes < 0 \
            or storage.orphan_grace_seconds < 0:
        raise SettingsError("storage.s3_timeout_seconds must be positive, storage.cache_bytes "
                            "and storage.orphan_grace_seconds zero or more")
