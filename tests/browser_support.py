"""Open a page in headless Chromium and report what a person would notice: console errors
(including resources that failed to load), images that did not load, a blank screen.

Drives Chromium over the DevTools protocol on ``--remote-debugging-pipe`` (fd 3 in, fd 4
out, NUL-terminated JSON): standard library only, no driver package, no network port.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def find_chromium() -> str | None:
    """The Chromium executable (Debian's ``chromium``), or None when none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


@dataclass
class PageCheck:
    """What the browser saw on one page."""

    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    images: list[dict[str, Any]] = field(default_factory=list)  # src, complete, naturalWidth
    screenshot: bytes = b""  # PNG of the viewport


class _Pipe:
    """One DevTools session over the two pipes; events are kept until asked for."""

    def __init__(self, to_browser: int, from_browser: int, timeout: float) -> None:
        self.out, self.inp, self.deadline = to_browser, from_browser, time.monotonic() + timeout
        self.buffer, self.next_id, self.events = b"", 0, []

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.inp], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.inp, 1 << 20)
            if not chunk:
                raise ConnectionError("Chromium closed the DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.out, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict[str, Any]:
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            event = self._read()
            if event.get("method") == method:
                return event
            self.events.append(event)


def _errors(events: list[dict[str, Any]]) -> list[str]:
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            found.append("exception: " + str(params.get("exceptionDetails", {}).get("text")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            found.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
    return found


_IMAGES = ("JSON.stringify(Array.from(document.images, i => ({src: i.getAttribute('src'), "
           "complete: i.complete, naturalWidth: i.naturalWidth})))")


def check_page(url: str, chromium: str, width: int = 1280, height: int = 1600,
               timeout: float = 60.0) -> PageCheck:
    """Load ``url``, wait for its load event (every image settled), then collect the
    errors, every image's load state and a screenshot of the viewport."""
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()

    def wire() -> None:  # in the child: the pipes on the fds Chromium reads and writes
        # (copied above 4 first: a pipe may itself be fd 3 or 4, close-on-exec)
        reader, writer = os.dup(to_browser_r), os.dup(from_browser_w)
        os.dup2(reader, 3)
        os.dup2(writer, 4)

    with tempfile.TemporaryDirectory(prefix="nestad-chromium-") as profile:
        proc = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--remote-debugging-pipe", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire, close_fds=False)
        os.close(to_browser_r)
        os.close(from_browser_w)
        try:
            pipe = _Pipe(to_browser_w, from_browser_r, timeout)
            targets = pipe.call("Target.getTargets")["targetInfos"]
            page = next(t["targetId"] for t in targets if t["type"] == "page")
            session = pipe.call("Target.attachToTarget", targetId=page, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                pipe.call(f"{domain}.enable", session)
            pipe.events.clear()  # about:blank's own events
            pipe.call("Page.navigate", session, url=url)
            pipe.wait_for("Page.loadEventFired")
            images = pipe.call("Runtime.evaluate", session, expression=_IMAGES,
                               returnByValue=True)["result"]["value"]
            shot = pipe.call("Page.captureScreenshot", session, format="png")["data"]
            check = PageCheck(_errors(pipe.events), json.loads(images), base64.b64decode(shot))
            with contextlib.suppress(ConnectionError, TimeoutError):  # closing anyway
                pipe.call("Browser.close")
            return check
        finally:
            os.close(to_browser_w)
            os.close(from_browser_r)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
