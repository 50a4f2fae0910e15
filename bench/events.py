"""Webhook delivery latency after the quiet time (docs/events.md, docs/benchmarks.md).

Starts ``dicom-gateway serve`` with ``[events] stable_seconds`` and one webhook on a local
aiohttp receiver, sends ``--studies`` small studies over C-STORE (``--instances`` tiny CT
instances each, one study every ``--gap`` seconds), and measures for each study the time from
the end of its quiet time (the acknowledgement of its last instance plus ``stable_seconds``)
to the arrival of its ``study.stable`` at the receiver.

    .venv/bin/python bench/events.py --studies 60 --stable 2

The acknowledgement comes a little after the instance's ``created_at`` (from which the quiet
time really runs), so the figure slightly understates the latency, by the C-STORE's own
round trip (about a millisecond).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from aiohttp import web
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from common import GatewayServer  # noqa: E402

from tests.support.common import ct_dataset  # noqa: E402

SECRET = "whsec_" + base64.b64encode(b"bench-secret-bench-secret-bench!").decode()


def start_receiver(arrivals: dict[str, float]) -> tuple[int, asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def handle(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        if body["type"] == "study.stable":
            arrivals.setdefault(body["data"]["study"], time.monotonic())
        return web.Response(status=204)

    async def start() -> int:
        app = web.Application()
        app.router.add_post("/hook", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    return asyncio.run_coroutine_threadsafe(start(), loop).result(10), loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--stable", type=float, default=2.0)
    parser.add_argument("--gap", type=float, default=0.25)
    args = parser.parse_args()
    arrivals: dict[str, float] = {}
    port, _loop = start_receiver(arrivals)
    quiet_ends: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        config = Path(tmp) / "gateway.toml"
        config.write_text(f"[events]\nstable_seconds = {args.stable}\n\n[[events.webhooks]]\n"
                          f'url = "http://127.0.0.1:{port}/hook"\nsecret = "{SECRET}"\n')
        with GatewayServer(Path(tmp) / "gw", env={"GATEWAY_CONFIG": str(config)}) as gateway:
            ae = AE(ae_title="BENCH")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title=gateway.ae_title)
            assert assoc.is_established
            try:
                for s in range(args.studies):
                    uid = f"1.2.826.0.1.3680043.8.498.7{s:04d}"
                    for k in range(args.instances):
                        status = assoc.send_c_store(ct_dataset(k, study=uid, rows=8))
                        assert status.Status == 0
                    quiet_ends[uid] = time.monotonic() + args.stable
                    time.sleep(args.gap)
            finally:
                assoc.release()
            deadline = time.monotonic() + args.stable + 60
            while len(arrivals) < args.studies and time.monotonic() < deadline:
                time.sleep(0.05)
    latencies = sorted(arrivals[uid] - end for uid, end in quiet_ends.items() if uid in arrivals)
    if len(latencies) < args.studies:
        print(f"only {len(latencies)} of {args.studies} studies announced")
    p95 = latencies[max(0, round(0.95 * len(latencies)) - 1)]
    print(f"{len(latencies)} studies, stable_seconds {args.stable:g}: delivery after the quiet "
          f"time p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms, min {latencies[0] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
