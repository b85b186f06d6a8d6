"""The customer pages in a real headless browser (Debian's chromium), driven over the DevTools
protocol: what a visitor sees, and that only pressing the button changes anything."""
from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from harness import Kafka

from workers import envelope
from workers.broker import stop_process
from workers.consent.tokens import UnsubscribeClaims, make_unsubscribe_token

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def devtools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A headless chromium; yields the HTTP address of its DevTools endpoint."""
    binary = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    profile = tmp_path_factory.mktemp("chromium")
    process = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Chromium writes the port it picked to the profile once DevTools listens.
        active_port = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active_port.exists() and active_port.read_text().strip()):
            assert process.poll() is None, f"chromium exited with {process.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{active_port.read_text().split()[0]}"
    finally:
        stop_process(process, timeout_s=10)


class Tab:
    """One browser tab over the DevTools protocol: navigate, read, click."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket = socket
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        id_ = next(self.ids)
        await self.socket.send_json({"id": id_, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self.socket.receive_json(), timeout=30)
            if message.get("id") == id_:
                assert "error" not in message, message["error"]
                return message["result"]
            self.events.append(message)

    async def loaded(self) -> None:
        """Wait for the next page load."""
        while True:
            if any(e.get("method") == "Page.loadEventFired" for e in self.events):
                self.events.clear()
                return
            self.events.append(await asyncio.wait_for(self.socket.receive_json(), timeout=30))

    async def open(self, url: str) -> None:
        self.events.clear()
        await self.call("Page.navigate", url=url)
        await self.loaded()

    async def evaluate(self, expression: str) -> Any:
        return (await self.call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

    async def press(self, button: str) -> None:
        """Click the button with this text, as a visitor would, and wait for the page it leads to."""
        self.events.clear()
        center = await self.evaluate(
            f"(() => {{ const b = [...document.querySelectorAll('button')].find(b => b.innerText === {button!r});"
            " const r = b.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=center[0], y=center[1], button="left", clickCount=1)
        await self.loaded()

    async def seen(self) -> dict[str, Any]:
        """What assistive technology gets: the language, the heading and the buttons by name."""
        nodes = (await self.call("Accessibility.getFullAXTree"))["nodes"]

        def named(role: str) -> list[str]:
            return [n["name"]["value"] for n in nodes if not n.get("ignored") and n.get("role", {}).get("value") == role]

        return {"lang": await self.evaluate("document.documentElement.lang"), "headings": named("heading"), "buttons": named("button")}


async def open_tab(session: aiohttp.ClientSession, devtools: str) -> Tab:
    async with session.get(f"{devtools}/json/list") as response:
        targets = await response.json()
    page = next(t for t in targets if t["type"] == "page")
    tab = Tab(await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0))
    for domain in ("Page", "Runtime", "Accessibility"):
        await tab.call(f"{domain}.enable")
    return tab


def from_pages(kafka: Kafka, tenant: str, type_: str) -> list[dict[str, Any]]:
    return [e for e in kafka.events(envelope.COMMANDS, tenant, type_) if e["source"] == "/usher/consent/web"]


async def test_a_visitor_confirms_then_unsubscribes_by_pressing_the_buttons(consent, kafka: Kafka, tenant: str, devtools: str) -> None:
    await asyncio.to_thread(consent.configure, tenant, double_opt_in=True)
    await asyncio.to_thread(consent.order, tenant, "c-1", {"newsletter": True})
    [mail] = await asyncio.to_thread(consent.mails, tenant, "c-1", 1)

    async with aiohttp.ClientSession() as session:
        tab = await open_tab(session, devtools)

        # Opening the link (as a mail scanner would) shows one button and confirms nothing.
        await tab.open(mail["vars"]["confirm_url"])
        assert await tab.seen() == {"lang": "nl", "headings": ["Bevestig je inschrijving"], "buttons": ["Ja, bevestigen"]}
        assert "Stuur mij de nieuwsbrief" in await tab.evaluate("document.body.innerText")
        assert from_pages(kafka, tenant, "consent.confirm") == []

        await tab.press("Ja, bevestigen")
        assert await tab.seen() == {"lang": "nl", "headings": ["Inschrijving bevestigd"], "buttons": []}
        await asyncio.to_thread(consent.statuses, tenant, "c-1", lambda s: s == {"newsletter": "opted_in"})

        token = make_unsubscribe_token(UnsubscribeClaims(tenant, "c-1", "email", "req-1"), consent.secret, envelope.utcnow())
        await tab.open(f"{consent.worker.url}/unsubscribe?token={quote(token)}")
        assert await tab.seen() == {"lang": "nl", "headings": ["Uitschrijven"], "buttons": ["Uitschrijven"]}
        assert from_pages(kafka, tenant, "consent.revoke") == []

        await tab.press("Uitschrijven")
        assert await tab.seen() == {"lang": "nl", "headings": ["Je bent uitgeschreven"], "buttons": []}
        # Every e-mail opt-in goes, the partners one (never answered) included.
        await asyncio.to_thread(consent.statuses, tenant, "c-1", lambda s: s == {"newsletter": "opted_out", "partners": "opted_out"})
