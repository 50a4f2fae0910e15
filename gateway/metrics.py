"""Process metrics in the Prometheus text exposition format (served at ``/metrics``)."""

from __future__ import annotations

import threading
from collections import defaultdict

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
}


class Metrics:
    """Thread-safe counters and gauges, labelled by a frozen set of label pairs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] += amount

    def set(self, name: str, value: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = value

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        """The Prometheus text format (version 0.0.4)."""
        with self._lock:
            items = sorted(self._values.items())
        lines: list[str] = []
        seen: set[str] = set()
        for (name, labels), value in items:
            if name not in seen:
                seen.add(name)
                if name in HELP:
                    lines.append(f"# HELP {name} {HELP[name]}")
                kind = "counter" if name.endswith("_total") else "gauge"
                lines.append(f"# TYPE {name} {kind}")
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {value:g}" if labels else f"{name} {value:g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


METRICS = Metrics()
