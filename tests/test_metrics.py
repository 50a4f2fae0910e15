"""``/metrics`` as Prometheus reads it: parsed by ``prometheus_client``'s own parser, counts
exact, and added up over every process of ``serve`` (``[dimse] workers``)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics
from tests.support.common import ct_dataset
from tests.support.dimse_helpers import associate
from tests.support.gateway_process import GatewayProcess

MAX_ASSOCIATIONS = 64  # until both processes have taken one: 2**-63 to need more


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return samples


def test_large_counts_are_rendered_exactly() -> None:
    metrics = Metrics()
    metrics.inc("gateway_instances_stored_total", 1_234_567)
    metrics.inc("gateway_instances_stored_total")
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    (sample,) = families["gateway_instances_stored"].samples
    assert sample.name == "gateway_instances_stored_total"
    assert sample.value == 1_234_568


def test_counts_of_every_dimse_worker_process_reach_metrics(tmp_path: Path,
                                                            database_url: str) -> None:
    data = tmp_path / "data"
    env = {
        "GATEWAY_DATA_DIR": str(data),
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_DIMSE_PORT": "0",
        "GATEWAY_HTTP_PORT": "0",
        "GATEWAY_STORAGE_MIN_FREE_BYTES": "0",
        "GATEWAY_DIMSE_WORKERS": "2",
        "GATEWAY_DEMO": "1",
    }
    stale = data / "metrics"
    stale.mkdir(parents=True)
    (stale / "counter_1.db").write_bytes(b"left by an earlier run")  # cleared at start
    process = GatewayProcess(env, tmp_path / "gateway.log").start()
    try:
        assert process.proc is not None
        main_pid = process.proc.pid
        children = Path(f"/proc/{main_pid}/task/{main_pid}/children")
        (worker_pid,) = (int(pid) for pid in children.read_text().split())
        # The kernel spreads connections over the two listeners (SO_REUSEPORT): send one
        # instance per association until each process has counted one (its counter file).
        sent = 0
        while sent < MAX_ASSOCIATIONS and not all(
                (stale / f"counter_{pid}.db").exists() for pid in (main_pid, worker_pid)):
            assoc = associate(process.dimse_port)
            assert assoc.send_c_store(ct_dataset(sent)).Status == 0
            assoc.release()
            sent += 1
        assert (stale / f"counter_{worker_pid}.db").exists(), "the worker took no association"
        assert (stale / f"counter_{main_pid}.db").exists(), "the main process took none"
        assert not (stale / "counter_1.db").exists()
        http = f"http://127.0.0.1:{process.http_port}"
        with urllib.request.urlopen(f"{http}/dicomweb/studies", timeout=30) as response:
            assert response.status == 200
        samples = scrape(http)
    finally:
        process.stop()
    assert samples["gateway_instances_stored_total"] == {(): sent}
    assert samples["gateway_dimse_associations_total"] == {(): sent}
    assert samples["gateway_index_instances"] == {(): sent}
    store = samples["gateway_dimse_store_seconds_count"]
    assert store == {(("status", "success"),): sent}
    assert samples["gateway_dimse_store_seconds_bucket"][
        (("le", "+Inf"), ("status", "success"))] == sent
    assert samples["gateway_qido_seconds_count"] == {
        (("level", "STUDY"), ("service", "qido")): 1}
    http_count = samples["gateway_http_request_seconds_count"]
    assert http_count[(("method", "GET"), ("route", "/dicomweb/studies"),
                       ("status", "200"))] == 1
