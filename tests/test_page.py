"""The status page: its files and the key without a browser; the page itself in
headless Chromium (Debian's ``chromium``), on a made-up status of a big device
(fast) and live against ``vllm-mux serve examples/rag.yaml`` (vllm).

Chromium is driven over the DevTools protocol on a pipe, so that a test waits
for what the page shows (a busy machine is slow, not wrong) and measures its
layout, rather than dumping the DOM after a guessed time.
"""

import base64
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from conftest import PATIENCE_S, assert_books_balance
from vllm_mux.daemon.client import Client
from vllm_mux.router import make_app
from vllm_mux.router.app import Upstream
from vllm_mux.router.page import view

KEY = "sk-page"
ASSETS = ("/", "/ui", "/ui/app.js", "/ui/style.css")
CHROMIUM = shutil.which("chromium")
ROOT = Path(__file__).parent.parent


# -- without a browser --


def local(app) -> TestClient:
    """A client on the router's own address (it refuses other names in Host)."""
    return TestClient(app, base_url="http://127.0.0.1:8000")


def test_page_files_are_served_without_a_key():
    client = local(make_app({"a": "http://127.0.0.1:9"}, daemon_socket=None, api_key=KEY))
    for path in ASSETS:
        r = client.get(path)
        assert r.status_code == 200, path
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
        head = client.head(path)  # a monitor's or a link checker's question
        assert (head.status_code, head.content) == (200, b""), path
    assert client.get("/").headers["content-type"].startswith("text/html")
    assert client.get("/").text == client.get("/ui").text
    assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/ui/page.py").status_code == 404


def test_status_needs_the_key():
    client = local(make_app({"a": "http://127.0.0.1:9"}, daemon_socket=None, api_key=KEY))
    assert client.get("/mux/status").status_code == 401
    wrong = client.get("/mux/status", headers={"Authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    r = client.get("/mux/status", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    # No daemon: the models are listed, their state unknown, no pool to draw.
    assert r.json()["daemon"] is False
    assert [(m["name"], m["state"]) for m in r.json()["models"]] == [("a", "unknown")]
    assert "pool" not in r.json()


def test_page_fetches_nothing_from_outside():
    client = local(make_app({"a": "http://127.0.0.1:9"}, daemon_socket=None))
    html = client.get("/").text
    for path in ASSETS:
        text = client.get(path).text
        assert not re.search(r"https?:|//[\w.-]+\.\w|@import|url\(", text), path
    # The page's own files and a data: icon, nothing else; relative, so that
    # the page also works behind a proxy that serves the router under a path.
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sorted(links) == ["data:,", "ui/app.js", "ui/style.css"]
    assert re.findall(r'fetch\("([^"]*)"', client.get("/ui/app.js").text) == ["mux/status"]


def test_wheel_ships_the_page(tmp_path):
    """A wheel built from these sources holds the page, and an install of it
    finds the files through importlib.resources (package data, pyproject)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    shutil.copytree(
        ROOT / "vllm_mux", src / "vllm_mux", ignore=shutil.ignore_patterns("__pycache__")
    )
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    offline = ["--no-index", "--no-deps"]  # nothing but these files
    build = [*pip, "wheel", *offline, "--no-build-isolation", "-w", str(tmp_path), str(src)]
    subprocess.run(build, check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("vllm_mux-*.whl")
    assert {"app.js", "index.html", "style.css"} <= {
        Path(n).name for n in zipfile.ZipFile(wheel).namelist() if "/router/ui/" in n
    }
    target = tmp_path / "installed"
    subprocess.run([*pip, "install", *offline, "--target", str(target), str(wheel)], check=True)
    read = (
        "import vllm_mux; from importlib.resources import files; "
        "print(vllm_mux.__file__); print((files('vllm_mux.router') / 'ui' / 'app.js').read_text())"
    )
    out = subprocess.run(
        [sys.executable, "-c", read],
        env={**os.environ, "PYTHONPATH": str(target)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    where, text = out.split("\n", 1)
    assert where.startswith(str(target))
    assert text.rstrip("\n") == (ROOT / "vllm_mux/router/ui/app.js").read_text().rstrip("\n")


def test_view_speaks_for_each_model_by_its_live_instance():
    """A restarted model's dead predecessor still holds chunks: they count as
    the model's, but its state and last wake are the live instance's."""
    router = make_app(
        {"chat": Upstream("http://127.0.0.1:9", restarts=1), "embed": "http://127.0.0.1:9"},
        daemon_socket=None,
    ).state.router
    router.queued["chat"] = 3
    status = fake_status(["chat", "embed"], chunks=8)
    dead = dict(status["instances"][0], id=9, state="disconnected", chunks=2, last_wake={})
    status["instances"].insert(0, dead)
    status["chunk_map"][6:8] = [9, 9]
    models = {m["name"]: m for m in view(router, status)["models"]}
    assert models["chat"]["state"] == "awake"
    assert models["chat"]["chunks"] == 2 + 2
    assert models["chat"]["last_wake"]["tier"] == "host"
    assert (models["chat"]["queued"], models["chat"]["restarts"]) == (3, 1)
    # Asleep with its bytes in no host copy: a wake reloads them (cold).
    assert models["embed"]["state"] == "asleep" and models["embed"]["cold"]


# -- in a browser --


class Chromium:
    """Headless Chromium, driven over the DevTools protocol on a pipe
    (``--remote-debugging-pipe``: JSON messages ending in NUL, to it on fd 3,
    from it on fd 4): no port, and nothing to install beyond the browser."""

    def __init__(self, profile: Path, width: int, height: int):
        to_r, self.to_w = os.pipe()
        self.from_r, from_w = os.pipe()

        def on_fds_3_and_4():  # in the child, before exec
            # Out of the way first: either pipe end may itself be fd 3 or 4.
            a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD, 5) for fd in (to_r, from_w))
            os.dup2(a, 3)
            os.dup2(b, 4)

        argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
        argv += ["--remote-debugging-pipe", f"--user-data-dir={profile}"]
        argv += [f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(
            argv,
            pass_fds=(3, 4),
            preexec_fn=on_fds_3_and_4,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_r)
        os.close(from_w)
        self.calls, self.pending, self.session = 0, b"", None

    def send(self, method: str, **params):
        self.calls += 1
        message = {"id": self.calls, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.to_w, json.dumps(message).encode() + b"\0")
        while True:  # events come too: read up to our answer
            while b"\0" not in self.pending:
                data = os.read(self.from_r, 1 << 20)
                assert data, "chromium exited"
                self.pending += data
            line, self.pending = self.pending.split(b"\0", 1)
            answer = json.loads(line)
            if answer.get("id") == self.calls:
                assert "error" not in answer, answer["error"]
                return answer["result"]

    def open(self, url: str) -> None:
        """A new tab on ``url``, once its document has loaded."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        attached = self.send("Target.attachToTarget", targetId=target, flatten=True)
        self.session = attached["sessionId"]
        self.send("Page.navigate", url=url)  # returns once the new document is in
        assert self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        """The expression's first truthy value; the last one after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return value

    def screenshot(self, path: Path) -> None:
        """The page down to the end of its content."""
        height = self.evaluate("Math.ceil(document.body.getBoundingClientRect().bottom)")
        clip = {"x": 0, "y": 0, "width": self.evaluate("innerWidth"), "height": height, "scale": 1}
        shot = self.send(
            "Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True
        )
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.to_w)
        os.close(self.from_r)


@pytest.fixture
def browser(tmp_path):
    """Chromium in a window of a laptop's screen, 1280 by 1000. Its tests fail
    without it rather than skip: a skip would pass CI with the page unseen."""
    assert CHROMIUM, "no chromium on PATH: install Debian's chromium (.ci/run does)"
    chromium = Chromium(tmp_path / "profile", 1280, 1000)
    yield chromium
    chromium.close()


# What the page shows, as the tests read it back from the DOM.
CELLS = "document.querySelectorAll('[data-chunk]').length"
ROWS = (
    "Object.fromEntries([...document.querySelectorAll('tr[data-model]')]"
    ".map(r => [r.dataset.model, r.dataset.state]))"
)
# Chunk cells by standing and model: {"leased chat": 25, "kept embed": 7}.
CHUNKS = (
    "[...document.querySelectorAll('[data-chunk]:not([data-kind=free])')]"
    ".reduce((n, c) => { const k = `${c.dataset.kind} ${c.dataset.model}`;"
    " n[k] = (n[k] || 0) + 1; return n; }, {})"
)


LAYOUT = """(() => {
  const box = (e) => e.getBoundingClientRect();
  const map = box(document.getElementById('map'));
  const cell = box(document.querySelector('[data-chunk]'));
  return {
    cell: cell.width, rows: Math.round(map.height / (cell.height + 2)),
    wide: document.documentElement.scrollWidth, tall: document.documentElement.scrollHeight,
    width: innerWidth, height: innerHeight,
    clipped: [...document.querySelectorAll('td, .legend li')]
      .filter((e) => e.scrollWidth > e.clientWidth).length,
  };
})()"""


def fake_status(models: list[str], chunks: int, chunk_size: int = 128 << 20) -> dict:
    """A daemon's status: every other model awake and holding chunks; of the
    asleep ones, half keep some of their chunks' bytes (warm) and half have no
    host copy (cold); one host copy for each awake model."""
    instances, chunk_map = [], [0] * chunks
    per = chunks // (len(models) + 2)
    at = 0
    for i, model in enumerate(models, 1):
        awake = i % 2 == 1
        held = per if awake else 0
        kept = per // 2 if not awake and i % 4 == 0 else 0
        chunk_map[at : at + held + kept] = [i] * held + [-i] * kept
        at += held + kept
        instances.append(
            {
                "id": i,
                "model": model,
                "state": "awake" if awake else "asleep",
                "chunks": held,
                "bytes": held * chunk_size,
                "resident_chunks": kept,
                "host_copy": [f"{i:064x}"] if awake else [],
                "in_flight": i % 3,
                "waiting": i % 2,
                "pinned": i == 1,
                "wakes": i,
                "last_wake": {"seconds": 0.25, "tier": "host"},
            }
        )
    copies = [
        {"digest": d, "size": 16 << 30, "users": [i["id"]], "sealed": True, "coldable": False}
        for i in instances
        for d in i["host_copy"]
    ]
    return {
        "device": "cuda",
        "chunk_size": chunk_size,
        "total_chunks": chunks,
        "free_chunks": sum(1 for c in chunk_map if c <= 0),
        "chunk_map": chunk_map,
        "host_budget": max(1, len(copies)) * (20 << 30),
        "host_used": len(copies) * (16 << 30),
        "host_copies": copies,
        "instances": instances,
    }


class Served:
    """An ASGI app served by uvicorn from a thread, on a port of its own."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def big_device():
    """A router for a dozen models whose daemon says: a 140 GiB GPU in 128 MiB
    chunks (1120), as ``fake_status`` lays it out."""
    names = [f"model-{i:02d}-Qwen3-8B-Instruct" for i in range(12)]
    app = make_app({n: "http://127.0.0.1:9" for n in names}, daemon_socket=None, api_key=KEY)
    status = fake_status(names, chunks=1120)
    app.state.router.read_status = lambda: status
    served = Served(app)
    yield served.url, status
    served.stop()


def test_page_stays_readable_with_a_dozen_models_and_1120_chunks(browser, big_device, tmp_path):
    url, status = big_device
    browser.open(f"{url}/#key={KEY}")
    assert browser.wait_for(
        f"{CELLS} === 1120 && document.querySelectorAll('tr[data-model]').length === 12"
    )
    assert browser.evaluate(ROWS) == {i["model"]: i["state"] for i in status["instances"]}
    assert browser.evaluate(CHUNKS) == _chunks(status)
    assert browser.evaluate("document.querySelectorAll('#host [data-digest]').length") == 6
    # The key left the address bar for the tab's storage.
    assert browser.evaluate("location.hash") == ""
    assert browser.evaluate("sessionStorage.getItem('vllm-mux-key')") == KEY
    browser.screenshot(tmp_path / "big-device.png")
    # A laptop's screen: cells one can point at, in a block of a dozen rows
    # or so; nothing to scroll sideways, no clipped name; the map, the host
    # bar and every model on one screen.
    layout = browser.evaluate(LAYOUT)
    assert layout["cell"] >= 8 and layout["rows"] <= 16, layout
    assert layout["wide"] <= layout["width"] and layout["clipped"] == 0, layout
    assert layout["tall"] <= layout["height"], layout
    # Half of it: the map wraps to more rows, the table scrolls on its own.
    browser.send(
        "Emulation.setDeviceMetricsOverride",
        width=640,
        height=1000,
        deviceScaleFactor=1,
        mobile=False,
    )
    assert browser.wait_for("innerWidth === 640")
    layout = browser.evaluate(LAYOUT)
    assert layout["cell"] >= 8 and layout["wide"] <= layout["width"], layout


def test_page_asks_for_the_key(browser, big_device):
    url, _ = big_device
    browser.open(f"{url}/ui#key=sk-wrong")  # the other address, the same page
    form_shown = "!document.getElementById('login').hidden"
    assert browser.wait_for(f"{form_shown} && document.getElementById('login-error').textContent")
    assert browser.evaluate("document.getElementById('status').hidden")
    assert browser.evaluate(CELLS) == 0
    assert browser.evaluate("sessionStorage.getItem('vllm-mux-key')") is None
    browser.evaluate(
        f"document.getElementById('key').value = '{KEY}';"
        "document.getElementById('login').requestSubmit()"
    )
    assert browser.wait_for(f"{CELLS} === 1120")
    assert browser.evaluate(f"!({form_shown})")
    # Forgotten, the key is gone and so is the data.
    browser.evaluate("document.getElementById('forget').click()")
    assert browser.evaluate(f"{form_shown} && document.getElementById('status').hidden")
    assert browser.evaluate("sessionStorage.getItem('vllm-mux-key')") is None


# -- live --


def _daemon(sock: str) -> dict:
    client = Client(sock)
    try:
        return client.status()
    finally:
        client.close()


def _chunks(status: dict) -> dict:
    """Chunks by standing and model, from the daemon's books of each instance
    (not its chunk map, which the page draws): what the page should count."""
    count = {}
    for i in status["instances"]:
        for kind, n in (("leased", i["chunks"]), ("kept", i["resident_chunks"])):
            if n:
                count[f"{kind} {i['model']}"] = count.get(f"{kind} {i['model']}", 0) + n
    return count


def _books(status: dict) -> tuple[dict, dict]:
    """Each model's state (its live instance's) and its chunks, by the daemon."""
    live = [i for i in status["instances"] if i["state"] != "disconnected"]
    return {i["model"]: i["state"] for i in live}, _chunks(status)


@pytest.mark.vllm
def test_page_live(rag_serve, browser, tmp_path):
    """Every model listed, a cell per chunk, and after a switch the page says
    what the daemon says: states and chunks per model."""
    sock, url, key = rag_serve["socket"], rag_serve["url"], rag_serve["key"]
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        states, _ = _books(_daemon(sock))
        if set(states) == {"chat", "embed"} and set(states.values()) <= {"awake", "asleep"}:
            break
        time.sleep(1)
    assert set(states.values()) <= {"awake", "asleep"}, states

    def page_agrees(timeout=PATIENCE_S):
        """The page's states and chunks once they are the daemon's."""
        deadline = time.monotonic() + timeout
        while True:
            books = _books(_daemon(sock))
            seen = browser.evaluate(ROWS), browser.evaluate(CHUNKS)
            if seen == books or time.monotonic() > deadline:
                return seen, books
            time.sleep(0.5)

    browser.open(f"{url}/#key={key}")
    seen, books = page_agrees()
    assert seen == books
    assert set(seen[0]) == {"chat", "embed"}
    assert browser.evaluate(CELLS) == _daemon(sock)["total_chunks"]
    browser.screenshot(tmp_path / "before.png")

    # A request to the sleeper: it wakes, the other sleeps (the pool holds one).
    sleeper = "chat" if seen[0]["chat"] == "asleep" else "embed"
    headers = {"Authorization": f"Bearer {key}"}
    if sleeper == "chat":
        body = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=PATIENCE_S)
    else:
        body = {"model": "embed", "input": "Hi"}
        r = httpx.post(f"{url}/v1/embeddings", json=body, headers=headers, timeout=PATIENCE_S)
    assert r.status_code == 200, r.text
    other = {"chat": "embed", "embed": "chat"}[sleeper]
    switched = {sleeper: "awake", other: "asleep"}
    deadline = time.monotonic() + PATIENCE_S
    while _books(_daemon(sock))[0] != switched and time.monotonic() < deadline:
        time.sleep(0.5)
    after, books = page_agrees()
    assert after == books
    assert after[0] == switched and seen[0][sleeper] == "asleep"
    browser.screenshot(tmp_path / "status-page.png")
    assert_books_balance(_daemon(sock))
