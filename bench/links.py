"""Viewer-link costs: opening a link, resolving a session on every request, and the overhead of
a viewer session (rules re-checked + access trail) on DICOMweb requests versus an API key.

Prints p50/p95 for each; runs the gateway in-process on a temporary SQLite index.

    .venv/bin/python bench/links.py --requests 300
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

from common import library_versions  # noqa: E402

from tests.support.links_helpers import (  # noqa: E402
    Client,
    cookie_of,
    fake_viewer,
    links_settings,
    live_links,
    load,
    small_study,
)
from viewer_links import build_service  # noqa: E402


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"p50 {statistics.median(ordered) * 1000:7.2f} ms   p95 {p95 * 1000:7.2f} ms"


def timed(n: int, call: Callable[[int], object]) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    print(library_versions(), flush=True)
    n = args.requests
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = links_settings(root, f"sqlite:///{root / 'index.sqlite'}",
                                  fake_viewer(root / "viewer"))
        with live_links(settings) as (server, gateway, tokens):
            study = load(gateway, small_study("LU0000001", "ACC1"))
            portal = Client(server.http_url, bearer=tokens["portal"])
            portal.request("PUT", "/api/patients/LU0000001/dsp", {"created": "2020-01-01"})
            urls: list[str] = []

            def mint(_: int) -> None:
                reply = portal.request("POST", "/api/links", {
                    "study": study, "viewer": {"id": "dr"}, "relationship": "trust_circle"})
                urls.append(reply.json()["url"])

            print(f"POST /api/links (mint)               {percentiles(timed(n, mint))}")
            cookies: list[str] = []

            def open_link(i: int) -> None:
                reply = Client(server.http_url).request("GET", urlsplit(urls[i]).path)
                assert reply.status == 303
                cookies.append(cookie_of(reply)[0])

            print(f"GET /view/<token> (open, 303)        {percentiles(timed(n, open_link))}")
            service = build_service(gateway)
            print("principal_for_session (in process)   "
                  + percentiles(timed(n, lambda i: service.principal_for_session(
                      cookies[i], "127.0.0.1"))))
            viewer = Client(server.http_url, cookies={"gw_session": cookies[0]})
            api = Client(server.http_url, bearer=tokens["reader"])
            path = f"/dicomweb/studies/{study}/series"
            headers = {"Accept": "application/dicom+json"}
            for label, client in (("API key", api), ("viewer session", viewer)):
                samples = timed(n, lambda _, c=client: c.request("GET", path, headers=headers))
                print(f"QIDO series, {label:15}         {percentiles(samples)}")
    print("(2 cores shared with other engineers' test runs: figures taken under contention)")


if __name__ == "__main__":
    main()
