"""The web page at / in a real headless Chromium (the distribution's package), driven over the DevTools protocol:
it loads without console errors, generates from the form on a tiny model with progress and a live preview, shows
the result with its parameters, reads PNG info from a dropped file, and runs img2img from an upload.
A screenshot is kept in test-artifacts/ (or $SD_ONNX_TEST_ARTIFACTS)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
websocket = pytest.importorskip("websocket")

from sd_onnx.server.app import create_app  # noqa: E402
from sd_onnx.server.catalog import Catalog  # noqa: E402
from tests.serving import Server  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: the browser test needs the distribution's "
                                                          "package (apt-get install chromium)")
ARTIFACTS = Path(os.environ.get("SD_ONNX_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


class Browser:
    """Headless Chromium with a fresh profile and no network services of its own; one page, driven over CDP."""

    def __init__(self, profile: Path):
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "--remote-allow-origins=*",
             "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            assert time.time() < deadline and self.proc.poll() is None, "chromium did not start"
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Runtime", "Log", "Page", "DOM"):
            self.send(f"{domain}.enable")

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, (method, message["error"])
                return message.get("result", {})
            self.events.append(message)

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        status = self.js("$('status').textContent")
        raise AssertionError(f"timed out waiting for {expression}; page status: {status}")

    def console_errors(self) -> list[str]:
        errors = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(json.dumps(params.get("args", []))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append(params["entry"].get("text", "")[:500])
        return errors

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def page_server(tiny_model):
    running = Server(create_app(Catalog(tiny_model("sd1"))))
    yield running
    running.stop()


@pytest.fixture
def browser(tmp_path):
    opened = Browser(tmp_path / "profile")
    yield opened
    opened.close()


def test_page_generates_with_progress_and_shows_the_result(page_server, browser, tmp_path):
    browser.send("Page.navigate", url=page_server.url("/"))
    browser.wait("document.readyState === 'complete' && $('status').textContent === 'ready'")
    assert browser.js("$('model').options.length") == 1
    assert browser.js("[...$('sampler_name').options].map(o => o.value).includes('DPM++ 2M Karras')")

    # txt2img from the form; 256 px and 30 steps take a couple of seconds, long enough to watch
    browser.js("""$('prompt').value = 'a lighthouse at dusk'; $('negative_prompt').value = 'fog';
                  $('steps').value = 30; $('width').value = 256; $('height').value = 256; $('seed').value = 77;
                  $('sampler_name').value = 'Euler a'; $('generate').click(); true""")
    browser.wait("window.sdOnnx.results >= 1")
    assert browser.js("window.sdOnnx.progressSeen") >= 1  # the bar moved while the job ran
    assert browser.js("window.sdOnnx.previewSeen") >= 1  # and showed the live preview
    assert browser.js("$('progress').value") == 1 and browser.js("$('progress-text').textContent") == "done"
    assert browser.js("document.querySelector('#gallery img').naturalWidth") == 256
    caption = browser.js("document.querySelector('#gallery figcaption').textContent")
    assert caption.startswith("a lighthouse at dusk\nNegative prompt: fog\nSteps: 30, Sampler: Euler a")
    assert "Seed: 77" in caption
    browser.screenshot(ARTIFACTS / "webpage.png")

    # PNG info: the result dropped on the drop zone
    browser.js("selectTab('pnginfo'); true")
    browser.js("""(async () => {
        const blob = await (await fetch(document.querySelector('#gallery img').src)).blob();
        const data = new DataTransfer();
        data.items.add(new File([blob], 'result.png', {type: 'image/png'}));
        $('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
        return true; })()""")
    browser.wait("$('png_text').textContent.includes('Seed: 77')")
    assert browser.js("$('png_text').textContent") == caption
    browser.js("$('send_to_txt2img').click(); true")
    assert browser.js("$('prompt').value") == "a lighthouse at dusk" and browser.js("$('seed').value") == "77"

    # img2img from an uploaded picture
    picture = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (30, 90, 160)).save(picture)
    browser.js("selectTab('img2img'); $('steps').value = 2; $('width').value = 64; $('height').value = 64; true")
    node = browser.send("DOM.querySelector", nodeId=browser.send("DOM.getDocument")["root"]["nodeId"],
                        selector="#init_image")["nodeId"]
    browser.send("DOM.setFileInputFiles", files=[str(picture)], nodeId=node)
    browser.js("$('init_image').dispatchEvent(new Event('change')); $('generate').click(); true")
    browser.wait("window.sdOnnx.results >= 2")
    assert "Denoising strength: 0.75" in browser.js("document.querySelector('#gallery figcaption').textContent")
    browser.screenshot(ARTIFACTS / "webpage-img2img.png")

    assert browser.console_errors() == []
