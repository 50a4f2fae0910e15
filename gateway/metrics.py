"""Process metrics through ``prometheus_client``, served at ``/metrics``.

Counters (``inc``), gauges (``set``) and latency histograms (``observe``) are created on first
use, by name, in a registry of their own. ``dicom-gateway serve`` with ``[dimse] workers`` above
1 runs several processes; :meth:`Metrics.use_directory` puts every process's values in files of
one folder (``prometheus_client``'s multiprocess mode, ``<data_dir>/metrics``, emptied when
``serve`` starts) and ``/metrics`` then adds them up, so a count includes every worker's.
Values are rendered by ``prometheus_client``: integers as integers (``1234567.0``), never
rounded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

# Counters' ``_created`` samples double the output for nothing a rate() needs.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable

HELP = {
    "gateway_instances_stored_total": "Instances stored.",
    "gateway_instances_duplicate_total": "Re-sends acknowledged without change.",
    "gateway_instances_equivalent_total":
        "Re-sends in another encoding (or a lossy copy of a lossless instance) acknowledged "
        "as duplicates, the stored copy kept.",
    "gateway_instances_replaced_total": "Instances replaced (storage.overwrite).",
    "gateway_instances_conflict_total":
        "Different instances refused under a stored SOP Instance UID.",
    "gateway_instances_rejected_total": "Instances refused as invalid or for lack of space.",
    "gateway_dimse_associations_total": "DIMSE associations accepted.",
    "gateway_dimse_associations_rejected_total": "DIMSE associations rejected.",
    "gateway_dimse_store_seconds":
        "C-STORE requests: from the request's last fragment to the response's status sent "
        "(PS3.7 9.1.1), by status class.",
    "gateway_http_request_seconds": "HTTP requests, by route pattern, method and status code.",
    "gateway_qido_seconds": "QIDO-RS and C-FIND searches in the index, by query level.",
    "gateway_storage_free_bytes": "Free bytes in the data folder's file system.",
    "gateway_object_store_put_seconds": "PUTs of instances to the object store.",
    "gateway_object_store_errors_total": "Requests the object store did not answer or refused.",
    "gateway_object_store_read_bytes_total":
        "Bytes read from the object store (whole objects, streams and byte ranges).",
    "gateway_orphan_objects_removed_total":
        "Objects without an index row removed by the sweeper (writes cut before their commit).",
}

# Seconds: a C-STORE acknowledgement takes ~3 ms here, a QIDO page ~10 ms, a frame retrieval
# up to seconds; the buckets span all of them.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)


class Metrics:
    """Counters, gauges and histograms by name, each with the label names of its first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._registry = CollectorRegistry()
        self._metrics: dict[str, MetricWrapperBase] = {}
        self._directory: Path | None = None

    def use_directory(self, directory: Path, *, clear: bool) -> None:
        """Keep this process's values in ``directory``, where every process of the gateway
        keeps its own, and render the sum of all of them.

        Call before any value is recorded. ``clear`` (the first process, at start) removes the
        files of processes that ran before.
        """
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if clear:
            for stale in directory.glob("*.db"):
                stale.unlink()
        os.environ[MULTIPROCESS_ENV] = str(directory)  # inherited by the worker processes
        with self._lock:
            # prometheus_client picks its value class when imported: switch it to the
            # file-backed one for the metrics made from now on (its module keeps this hook).
            values.ValueClass = values.MultiProcessValue()
            self._directory = directory
            self._registry = CollectorRegistry()
            self._metrics = {}

    def _metric(self, name: str, kind: type[MetricWrapperBase],
                labelnames: Sequence[str]) -> MetricWrapperBase:
        metric = self._metrics.get(name)
        if metric is not None:
            return metric
        with self._lock:
            metric = self._metrics.get(name)
            if metric is None:
                documentation = HELP.get(name, name.replace("_", " "))
                options: dict[str, Any] = {}
                if kind is Gauge:
                    options["multiprocess_mode"] = "mostrecent"
                elif kind is Histogram:
                    options["buckets"] = LATENCY_BUCKETS
                metric = kind(name, documentation, labelnames=tuple(labelnames),
                              registry=self._registry, **options)
                self._metrics[name] = metric
            return metric

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` to the counter ``name`` (whose name ends in ``_total``)."""
        metric = self._metric(name, Counter, sorted(labels))
        (metric.labels(**labels) if labels else metric).inc(amount)  # type: ignore[attr-defined]

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set the gauge ``name`` (the most recent value set by any process is served)."""
        metric = self._metric(name, Gauge, sorted(labels))
        (metric.labels(**labels) if labels else metric).set(value)  # type: ignore[attr-defined]

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        """Count a duration in the histogram ``name``."""
        metric = self._metric(name, Histogram, sorted(labels))
        (metric.labels(**labels) if labels else metric).observe(seconds)  # type: ignore[attr-defined]

    def get(self, name: str, **labels: str) -> float:
        """This process's value of a counter or gauge (0 before its first use)."""
        metric = self._metrics.get(name)
        if metric is None:
            return 0.0
        for family in metric.collect():
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    def render(self) -> bytes:
        """The Prometheus text format (version 0.0.4), of every process when they share a
        directory (:meth:`use_directory`)."""
        if self._directory is None:
            return generate_latest(self._registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self._directory))
        return generate_latest(registry)


METRICS = Metrics()
