"""The review console's acceptance test in a real browser (Debian's chromium through
chromedriver and selenium; nothing is downloaded), against a real gateway and a real Orthanc.

storescu sends a `sentinel attack` PGD copy of the NEMA CR RG1 to ``sentinel serve`` (the
shipped default bundle), which quarantines it; ``sentinel console`` runs as its own process on
loopback. In the browser: sign in, see the instance in the list, open it, see the image and the
heat map (the screenshot's pixels inside both elements are not blank), release it with a
reason, see it arrive in Orthanc (REST), see the release in the audit view, sign out.

Screenshots of the pages go to $SENTINEL_CONSOLE_SCREENSHOTS when set (the README's come from
there), else to the test's temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gateway.console.accounts import Accounts
from tests.console_site import console_process
from tests.dcmtk import free_port, require_dcmtk, storescu
from tests.dicom_factory import pixel_sha256, sentinel_attack, sop_uid_of
from tests.gateway_harness import GatewayProcess, write_config
from tests.orthanc import OrthancServer, require_orthanc

pytest.importorskip("starlette",
                    reason="the console extra is not installed: pip install .[console]")
webdriver = pytest.importorskip("selenium.webdriver",
                                reason="selenium is not installed (the test extra)")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.integration
PASSWORD = "reviewer password 1"


def require_chromium() -> None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} missing: apt-get install chromium chromium-driver (Debian's; "
                        "no browser is downloaded)")


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[object]:
    require_chromium()
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1600,1200", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def screenshots() -> Path | None:
    d = os.environ.get("SENTINEL_CONSOLE_SCREENSHOTS")
    return Path(d) if d else None


def shot(driver: object, name: str, tmp: Path) -> Image.Image:
    out = (screenshots() or tmp / "shots")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"console-{name}.png"
    driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    return Image.open(path).convert("RGB")


def not_blank(img: Image.Image, rect: dict[str, float], ratio: float) -> tuple[float, int]:
    """(standard deviation, distinct grey levels) of the screenshot inside an element."""
    box = tuple(round(v * ratio) for v in (rect["x"], rect["y"], rect["x"] + rect["width"],
                                           rect["y"] + rect["height"]))
    pixels = np.asarray(img.crop(box).convert("L"), dtype=np.float64)
    assert pixels.size > 10_000, (box, pixels.shape)
    return float(pixels.std()), len(np.unique(pixels))


def test_review_in_a_real_browser(tmp_path: Path, nema_dir: Path, browser: object) -> None:
    require_dcmtk()
    require_orthanc()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    bundle = REPO / "detector" / "models" / "default"
    attacked = sentinel_attack(nema_dir / "RG1_UNCR.dcm", tmp_path / "src" / "rg1-pgd.dcm",
                               bundle)
    sop = sop_uid_of(attacked)
    port, cport = free_port(), free_port()
    pacs = OrthancServer(tmp_path / "pacs", {"sentinel": ("SENTINEL", port)}, aet="PACS")
    state = tmp_path / "state"
    cfg = write_config(
        tmp_path / "c.toml", state=state, port=port, bundle=bundle, relay_unscreened=False,
        destinations=(f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
                      f'port = {pacs.dicom_port}\nae_title = "PACS"\n'),
        default='action = "screen"\ndestinations = ["pacs"]',
        extra=f'[console]\nhost = "127.0.0.1"\nport = {cport}\nsession_timeout_min = 10\n')
    Accounts(state / "console" / "users.json").add("rev", "reviewer", PASSWORD)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port)
    base = f"http://127.0.0.1:{cport}"
    with contextlib.ExitStack() as stack:
        pacs.start()
        stack.callback(pacs.stop)
        gw.start(timeout=120)
        stack.callback(gw.stop)
        stack.enter_context(console_process(cfg, base, tmp_path / "console.log"))
        wait = WebDriverWait(driver, 60)

        # sign in
        driver.get(f"{base}/login")  # type: ignore[attr-defined]
        shot(driver, "login", tmp_path)
        driver.find_element(By.ID, "username").send_keys("rev")  # type: ignore[attr-defined]
        driver.find_element(By.ID, "password").send_keys(PASSWORD)  # type: ignore[attr-defined]
        driver.find_element(By.ID, "signin").click()  # type: ignore[attr-defined]
        wait.until(ec.url_contains("/quarantine"))

        # storescu sends the attacked CR; it appears in the quarantine list
        r = storescu(port, [attacked])
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 180
        while True:
            driver.get(f"{base}/quarantine")  # type: ignore[attr-defined]
            if driver.find_elements(By.LINK_TEXT, sop):  # type: ignore[attr-defined]
                break
            assert time.monotonic() < deadline, gw.log()[-3000:]
            time.sleep(1)
        shot(driver, "quarantine-list", tmp_path)

        # open it: image and heat map drawn (non-blank pixels inside both elements)
        driver.find_element(By.LINK_TEXT, sop).click()  # type: ignore[attr-defined]
        wait.until(ec.presence_of_element_located((By.ID, "release-reason")))
        loaded = ("return arguments[0].complete && arguments[0].naturalWidth > 0 && "
                  "arguments[1].complete && arguments[1].naturalWidth > 0")
        image = driver.find_element(By.ID, "image")  # type: ignore[attr-defined]
        heat = driver.find_element(By.ID, "heatmap")  # type: ignore[attr-defined]
        WebDriverWait(driver, 120).until(lambda d: d.execute_script(loaded, image, heat))
        ratio = float(driver.execute_script("return window.devicePixelRatio"))  # type: ignore[attr-defined]
        page = shot(driver, "detail", tmp_path)
        for element in (image, heat):
            spread, levels = not_blank(page, element.rect, ratio)
            assert spread > 10 and levels > 32, (element.get_attribute("id"), spread, levels)
        assert "flagged" in driver.find_element(By.ID, "fields").text  # type: ignore[attr-defined]

        # release it with a reason
        driver.find_element(By.ID, "release-reason").send_keys(  # type: ignore[attr-defined]
            "browser acceptance: reviewed")
        driver.find_element(By.ID, "release").click()  # type: ignore[attr-defined]
        wait.until(ec.text_to_be_present_in_element((By.ID, "message"), "released 1"))
        assert not driver.find_elements(By.LINK_TEXT, sop)  # type: ignore[attr-defined]

        # it arrives in Orthanc
        deadline = time.monotonic() + 90
        while pacs.find_instance(sop) is None:
            assert time.monotonic() < deadline, gw.log()[-3000:]
            time.sleep(0.5)
        stored = pacs.instance_file(sop)
        assert stored is not None and pixel_sha256(stored) == pixel_sha256(attacked)  # unchanged

        # the release, and the image views, in the audit view
        driver.get(f"{base}/audit?event=released")  # type: ignore[attr-defined]
        table = driver.find_element(By.ID, "audit").text  # type: ignore[attr-defined]
        assert sop in table and "actor=console:rev" in table
        assert "browser acceptance: reviewed" in table
        assert "Chain intact" in driver.find_element(By.ID, "chain").text  # type: ignore[attr-defined]
        shot(driver, "audit", tmp_path)
        driver.get(f"{base}/audit?event=image-viewed")  # type: ignore[attr-defined]
        assert sop in driver.find_element(By.ID, "audit").text  # type: ignore[attr-defined]
        driver.get(f"{base}/health")  # type: ignore[attr-defined]
        assert driver.find_elements(By.CSS_SELECTOR, "#charts svg")  # type: ignore[attr-defined]
        shot(driver, "health", tmp_path)

        # sign out: the session is gone
        driver.find_element(By.ID, "logout").click()  # type: ignore[attr-defined]
        wait.until(ec.url_contains("/login"))
        driver.get(f"{base}/quarantine")  # type: ignore[attr-defined]
        assert "/login" in driver.current_url  # type: ignore[attr-defined]
