"""CPU time of one pass of the event scan (gateway/events.py), on SQLite.

Indexes 2,000 tiny instances of one study, then for N new instances since the last pass (the
scan's cursor put back by N) times ``discover``, ``announce`` and ``next_quiet`` with
``time.process_time``, 20 times, and prints the median and the largest.

    .venv/bin/python bench/events_scan.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).parent.parent))
from gateway import events  # noqa: E402
from gateway.core import Gateway  # noqa: E402
from tests.support.common import ct_dataset, make_settings, part10  # noqa: E402

STUDY = "1.2.826.0.1.3680043.8.498.9"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-scan-") as folder:
        tmp = Path(folder)
        settings = make_settings(tmp, f"sqlite:///{tmp / 'index.sqlite'}")
        with Gateway(settings) as gateway:
            for i in range(2000):
                gateway.ingestor.ingest(part10(ct_dataset(i, study=STUDY, rows=8)),
                                        source="bench")
            for new in (0, 250, 2000):
                spent = []
                for _ in range(20):
                    with gateway.index.write_engine.begin() as connection:
                        connection.execute(text(
                            "UPDATE event_cursor SET value = (SELECT MAX(pk) FROM instance) - :n "
                            "WHERE name = 'instances'"), {"n": new})
                    start = time.process_time()
                    events.discover(gateway.index)
                    events.announce(gateway.index, 60)
                    events.next_quiet(gateway.index, 60)
                    spent.append(time.process_time() - start)
                spent.sort()
                print(f"{new:5} new instances: one scan {spent[len(spent) // 2] * 1000:.2f} ms "
                      f"CPU (median of 20), largest {spent[-1] * 1000:.2f} ms")


if __name__ == "__main__":
    main()
