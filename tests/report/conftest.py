"""Fixtures of the report tests: a real headless Chromium driven over the DevTools protocol
(--remote-debugging-pipe), standard library only.

Chromium reads commands on fd 3 and writes replies and events on fd 4, each a JSON message ended by
a NUL byte. Enough of the protocol for a page check: open a page, collect console errors, uncaught
exceptions, log errors and failed requests, run JavaScript, take a screenshot.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


# Scrolls the page from top to bottom (lazy images near the viewport start loading), waits for every
# image that is rendered to finish, and returns [src, complete, naturalWidth] of each rendered image.
SHOWN_IMAGES = """
(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  for (let y = 0; y <= document.documentElement.scrollHeight; y += 500) { window.scrollTo(0, y); await sleep(20); }
  const shown = [...document.images].filter(i => i.checkVisibility());
  const start = Date.now();
  while (shown.some(i => !i.complete) && Date.now() - start < 20000) await sleep(50);
  window.scrollTo(0, 0);
  await sleep(50);
  return shown.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);
})()
"""


def find_chromium() -> str | None:
    """$ARTSCALE_CHROMIUM, else the first browser on PATH."""
    if os.environ.get("ARTSCALE_CHROMIUM"):
        return os.environ["ARTSCALE_CHROMIUM"]
    return next((path for name in NAMES if (path := shutil.which(name))), None)


def _high(fd: int) -> int:
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


class Browser:
    """One headless Chromium with one page (a flat session attached to a new target)."""

    def __init__(self, exe: str, profile: Path, width: int = 1280, height: int = 900) -> None:
        self.log = Path(profile).with_name(Path(profile).name + ".log")
        cmd_r, self._cmd_w = os.pipe()
        self._evt_r, evt_w = os.pipe()
        cmd_r, evt_w = _high(cmd_r), _high(evt_w)  # above 4, so that moving them to 3 and 4 clobbers neither
        args = [
            "--headless",
            "--remote-debugging-pipe",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            *(["--no-sandbox"] if os.geteuid() == 0 else []),  # Chromium refuses to run as root with its sandbox
            "about:blank",
        ]
        # bash (dash takes no fd above 9) puts the pipe ends where Chromium wants them: 3 commands, 4 replies
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                ["bash", "-c", f'exec "$0" "$@" 3<&{cmd_r} 4>&{evt_w}', exe, *args],
                pass_fds=(cmd_r, evt_w),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        os.close(cmd_r)
        os.close(evt_w)
        self._next, self._lock = 0, threading.Lock()
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        except (OSError, TimeoutError) as e:
            self.proc.kill()
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{exe} did not start ({e}); its stderr ends:\n{tail}") from None
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.send(f"{domain}.enable", session=True)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=True,
        )

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._evt_r, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                with self._cond:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                    self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 60) -> dict:
        with self._lock:
            self._next += 1
            ident = self._next
            msg: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = self.session
            os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: ident in self._replies, timeout):
                raise TimeoutError(f"{method}: no reply in {timeout} s")
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        with self._cond:
            if not self._cond.wait_for(lambda: any(e["method"] == method for e in self.events), timeout):
                raise TimeoutError(f"no {method} in {timeout} s")
            return next(e for e in self.events if e["method"] == method)

    def open(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, session=True)
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """The value of a JavaScript expression (a promise is awaited); a thrown error raises here."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session=True,
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, full_page: bool = False) -> bytes:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics", session=True)["cssContentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 16000), "scale": 1},
            )
        return base64.b64decode(self.send("Page.captureScreenshot", params, session=True)["data"])

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, error log entries and failed requests seen so far."""
        found = []
        with self._cond:
            events = list(self.events)
        for e in events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                found.append(
                    f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p.get('args', [])]}"
                )
            elif e["method"] == "Runtime.exceptionThrown":
                found.append(f"exception: {p['exceptionDetails'].get('text')}")
            elif e["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
                found.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif e["method"] == "Network.loadingFailed":
                found.append(f"failed request: {p.get('errorText')} ({p.get('type')})")
        return found

    def shown_images(self) -> list[list]:
        """[src, complete, naturalWidth] of each rendered image, once every one has finished loading."""
        return self.evaluate(SHOWN_IMAGES)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)


@pytest.fixture(scope="module")
def chromium() -> str:
    """The browser (before the runs are trained: a missing one fails or skips at once). Skipped only where
    none is installed, and never with CI=true: .ci/run installs Debian's chromium, so CI fails instead."""
    exe = find_chromium()
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but no chromium: .ci/run installs Debian's chromium; a green CI must have run this")
        pytest.skip("no chromium here (apt-get install chromium); CI installs it and fails without it")
    return exe


@pytest.fixture(scope="module")
def open_browser(chromium) -> Callable[[Path], Browser]:
    """A Browser on that chromium with its profile at the given path; the test closes it."""

    def start(profile: Path) -> Browser:
        return Browser(chromium, profile)

    return start
