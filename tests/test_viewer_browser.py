"""The real thing: headless Chromium (Debian's, driven by Playwright) opens a minted link, the
gateway hands it OHIF, OHIF loads the sample study over DICOMweb with the session cookie, and an
image is drawn. A tampered link shows the refusal page.

Needs the OHIF bundle (``make test`` fetches it once into ``.viewer-cache/``; or set
``GATEWAY_TEST_VIEWER_DIR``) and ``/usr/bin/chromium`` (``make test`` installs it when missing).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from sample_dicom.generator import demo_study
from tests.support.links_helpers import links_env
from viewer_links.settings import OHIF_VERSION
from viewer_links.viewer import installed_version

REPO = Path(__file__).resolve().parent.parent
VIEWER_DIR = Path(os.environ.get("GATEWAY_TEST_VIEWER_DIR",
                                 REPO / ".viewer-cache" / f"ohif-{OHIF_VERSION}"))
CHROMIUM = os.environ.get("GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]

# Reads every canvas of the page; answers how many pixels are neither black nor transparent and
# how many distinct grey levels there are (an image, not a flat fill).
CANVAS_STATS = """() => {
  const out = [];
  for (const canvas of document.querySelectorAll('canvas')) {
    if (!canvas.width || !canvas.height) continue;
    let ctx = null;
    try { ctx = canvas.getContext('2d', { willReadFrequently: true }); } catch (e) {}
    if (!ctx) continue;
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let lit = 0; const levels = new Set();
    for (let i = 0; i < data.length; i += 4) {
      if (data[i + 3] > 0 && (data[i] > 8 || data[i + 1] > 8 || data[i + 2] > 8)) lit++;
      if (i % 64 === 0) levels.add(data[i]);
    }
    out.push({ cls: canvas.className, width: canvas.width, height: canvas.height, lit,
               levels: levels.size });
  }
  return out;
}"""


@pytest.fixture
def viewer_env(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    assert installed_version(VIEWER_DIR), (
        f"no OHIF bundle in {VIEWER_DIR}: run `make viewer-cache` (make test does it)")
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium"
    datasets = demo_study()
    with links_env(tmp_path, database_url, studies={"study": datasets}, viewer_dir=VIEWER_DIR,
                   dsp_patients=(str(datasets[0].PatientID),)) as env:
        from gateway.keyimages import key_images

        with env["gateway"].index.Session() as session:
            env["key_images"] = [k.sop_instance_uid for k in key_images(session, env["study"])]
        yield env


def wait_for_image(page: Any, dicomweb: list[str]) -> list[dict[str, Any]]:
    """Poll the page's canvases until one shows an image (lit pixels, many grey levels)."""
    deadline = time.monotonic() + 120
    stats: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        stats = page.evaluate(CANVAS_STATS)
        drawn = [s for s in stats if s["lit"] > 1000 and s["levels"] > 8]
        if drawn:
            page.wait_for_timeout(1500)  # let thumbnails and the first frames settle
            return drawn
        page.wait_for_timeout(500)
    raise AssertionError(f"no image drawn; canvases: {stats}; DICOMweb: {dicomweb[-10:]}")


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@pytest.mark.slow  # a browser
def test_minted_link_opens_ohif_and_draws_the_study(viewer_env: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    minted = viewer_env["portal"].request("POST", "/api/links", {
        "study": viewer_env["study"], "viewer": {"id": "LU0000001", "name": "Zoé Müller"},
        "relationship": "patient"})
    assert minted.status == 201, minted.text
    url = minted.json()["url"]
    token = urlsplit(url).path.removeprefix("/view/")
    ARTIFACTS.mkdir(exist_ok=True)

    failed: list[str] = []
    errors: list[str] = []
    dicomweb: list[str] = []
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("requestfailed", lambda r: failed.append(f"{r.url} {r.failure}"))

            def on_response(response: Any) -> None:
                if "/dicomweb/" in response.url:
                    dicomweb.append(f"{response.status} {response.url}")
                if response.status >= 400:
                    errors.append(f"{response.status} {response.url}")

            page.on("response", on_response)
            first = page.goto(url, wait_until="domcontentloaded")
            assert first is not None and first.ok
            assert urlsplit(page.url).path == "/viewer" and token not in page.url
            assert "gw_session" not in page.evaluate("document.cookie")  # HttpOnly
            assert page.evaluate("window.crossOriginIsolated") is True

            try:
                wait_for_image(page, dicomweb)
            finally:
                page.screenshot(path=str(ARTIFACTS / "viewer-sample-study.png"))
            assert any("/frames/" in d or "/bulk/" in d for d in dicomweb), dicomweb
            assert not failed, failed
            assert not errors, errors

            tampered = url[:-6] + ("AAAAAA" if not url.endswith("AAAAAA") else "BBBBBB")
            refused = page.goto(tampered)
            assert refused is not None and refused.status == 403
            assert page.locator("#reason").inner_text() == "bad_signature"
            page.screenshot(path=str(ARTIFACTS / "viewer-tampered-link.png"))
        finally:
            browser.close()


@pytest.mark.slow  # a browser
def test_key_images_link_opens_ohif_on_key_images_only(viewer_env: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    minted = viewer_env["portal"].request("POST", "/api/links", {
        "study": viewer_env["study"], "viewer": {"id": "dr-weber", "name": "Dr Weber"},
        "relationship": "referring_physician", "key_images_only": True})
    assert minted.status == 201, minted.text
    keys = {str(ds.SOPInstanceUID) for ds in demo_study()
            if ds.Modality != "KO"} & set(viewer_env["key_images"])
    assert len(keys) == 2
    fetched: list[str] = []
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})

            def on_response(response: Any) -> None:
                if "/dicomweb/" in response.url:
                    fetched.append(response.url)
                if response.status >= 400:
                    errors.append(f"{response.status} {response.url}")

            page.on("response", on_response)
            page.goto(minted.json()["url"])
            assert "SeriesInstanceUIDs=" in page.url and "initialSOPInstanceUID=" in page.url
            try:
                wait_for_image(page, fetched)
            finally:
                page.screenshot(path=str(ARTIFACTS / "viewer-key-images.png"))
        finally:
            browser.close()
    frames = [u for u in fetched if "/frames/" in u]
    assert frames, fetched
    for url in frames:  # every pixel fetched belongs to a key image
        assert url.split("/instances/")[1].split("/")[0] in keys, url
    assert not errors, errors
