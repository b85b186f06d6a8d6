"""`usher demo`: the embedded broker, the topics, the four stages and a ticket shop.

The stages run as four `usher worker` processes, exactly as in production;
the shop publishes through Kafka, and the summary reads each stage's
`/metrics` and the output topics, so what it shows is what really flowed.
"""
from __future__ import annotations

import asyncio
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from workers import envelope
from workers.broker import BrokerError, start_broker, stop_broker
from workers.shop import Shop
from workers.stage import STAGES
from workers.topics import create_topics_sync

PARTITIONS = 6
WATCHED = (envelope.PROMPTS, envelope.CONSENT_STATE, envelope.CONSENT_LOG, envelope.CONTACTS_STATE, envelope.CONTACTS_REPLIES,
           envelope.SEGMENTS_MEMBERS, envelope.OUTBOX, envelope.DELIVERIES, envelope.DEAD_LETTERS)
METRIC_LINE = re.compile(r'^usher_(records_consumed|records_produced|dead_letters)_total\{stage="([^"]+)",topic="([^"]+)"\} ([0-9.e+]+)$')


def describe(event: dict[str, Any]) -> str | None:
    """One readable line for the records a person wants to see go by."""
    data, type_ = event.get("data") or {}, event.get("type")
    if type_ == "consent.changed":
        return f"consent   {data['contact']:>6} {data['optin']}: {data['from']} -> {data['to']} ({data.get('method')})"
    if type_ == "message.requested":
        to = (data.get("to") or {}).get("email") or (data.get("to") or {}).get("phone")
        return f"message   {data['kind']} for {data['contact']} to {to} ({data.get('language')})"
    if type_ == "delivery.status":
        return f"delivery  {data['status']} {data.get('channel')} for {data.get('contact')} via {data.get('provider')}" + (f": {data['error']}" if data.get("error") else "")
    if type_ == "record.rejected":
        stage = event.get("source", "").rsplit("/", 1)[-1]
        return f"rejected  by {stage} {data['topic']}@{data['offset']}: {data['reason'][:80]}"
    if type_ == "segment.member" and data.get("member"):
        return f"segment   {data['contact']} joins {data['message']}"
    if type_ == "contact.replied":
        return f"reply     {data['request'][:8]}: {'ok' if data['ok'] else data.get('error')}"
    return None


class Summary:
    def __init__(self, stage_ports: dict[str, int]) -> None:
        self.stage_ports = stage_ports
        self.by_type: collections.Counter[str] = collections.Counter()
        self.recent: collections.deque[str] = collections.deque(maxlen=10)
        self.confirm_urls: list[str] = []
        self.confirmed = 0
        self.published = 0

    def see(self, event: dict[str, Any]) -> None:
        self.by_type[event.get("type", "?")] += 1
        line = describe(event)
        if line:
            self.recent.append(line)
        url = (event.get("data") or {}).get("vars", {}).get("confirm_url") if event.get("type") == "message.requested" else None
        if url:
            self.confirm_urls.append(url)

    def stage_counts(self) -> dict[str, dict[str, float]]:
        counts: dict[str, dict[str, float]] = {}
        for stage, port in self.stage_ports.items():
            row = counts.setdefault(stage, {"consumed": 0.0, "produced": 0.0, "dead": 0.0})
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
                    text = response.read().decode()
            except OSError:
                row["down"] = 1
                continue
            for match in map(METRIC_LINE.match, text.splitlines()):
                if match:
                    kind = {"records_consumed": "consumed", "records_produced": "produced", "dead_letters": "dead"}[match[1]]
                    row[kind] += float(match[4])
        return counts

    def render(self, elapsed: float, shop: Shop) -> str:
        lines = [f"Usher demo: {elapsed:5.0f} s   shop published {self.published} records "
                 f"({shop.checkouts} checkouts, {shop.orders} orders); {self.confirmed} customers clicked their confirmation link", ""]
        lines.append(f"  {'stage':10} {'consumed':>9} {'produced':>9} {'dead letters':>13}")
        for stage, row in self.stage_counts().items():
            state = "  (not answering)" if row.get("down") else ""
            lines.append(f"  {stage:10} {row['consumed']:9.0f} {row['produced']:9.0f} {row['dead']:13.0f}{state}")
        lines += ["", "  records out: " + ", ".join(f"{t} {n}" for t, n in sorted(self.by_type.items())), "", "  lately:"]
        lines += [f"    {line}" for line in self.recent]
        return "\n".join(lines)


async def click_confirmation(url: str) -> bool:
    """What a customer does: open the link (a page, nothing confirmed yet), then press the button."""
    def click() -> bool:
        with urllib.request.urlopen(url, timeout=5) as page:
            if page.status != 200:
                return False
        token = urllib.parse.parse_qs(urllib.parse.urlparse(url).query).get("token", [""])[0]
        form = urllib.parse.urlencode({"token": token}).encode()
        target = url.split("?", 1)[0]
        with urllib.request.urlopen(urllib.request.Request(target, data=form, method="POST"), timeout=5) as done:
            return done.status == 200

    try:
        return await asyncio.to_thread(click)
    except OSError:
        return False


async def run_shop(bootstrap: str, stage_ports: dict[str, int], duration_s: float, rate_per_s: float) -> Summary:
    shop = Shop()
    summary = Summary(stage_ports)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    consumer = AIOKafkaConsumer(*WATCHED, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await producer.start()
    await consumer.start()
    interactive = sys.stdout.isatty()

    async def publish(out: envelope.Out) -> None:
        await producer.send(out.topic, key=out.key.encode(), value=out.value_bytes())
        summary.published += 1

    async def watch() -> None:
        async for record in consumer:
            if record.value:
                summary.see(envelope.loads(record.value))

    async def show(final: bool = False) -> None:
        text = await asyncio.to_thread(summary.render, time.monotonic() - started, shop)
        print(("\x1b[H\x1b[2J" if interactive and not final else "\n") + text, flush=True)

    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    try:
        for out in shop.setup(public_url=f"http://127.0.0.1:{stage_ports['consent']}"):
            await publish(out)
        for topic, key, raw in shop.bad_records():
            await producer.send(topic, key=key.encode(), value=raw)
        traffic = shop.traffic()
        next_show = 0.0
        while (elapsed := time.monotonic() - started) < duration_s:
            await publish(next(traffic))
            if summary.confirm_urls and shop.random.random() < 0.05:
                summary.confirmed += await click_confirmation(summary.confirm_urls.pop(0))
            if elapsed >= next_show:
                await show()
                next_show = elapsed + (1.0 if interactive else 10.0)
            await asyncio.sleep(1 / rate_per_s)
        await producer.flush()
        await asyncio.sleep(5)  # let the stages drain what the shop just sent
        await show(final=True)
    finally:
        watcher.cancel()
        await consumer.stop()
        await producer.stop()
    return summary


def wait_ready(port: int, process: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"a stage exited early; its log is {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"a stage was not ready within {timeout:.0f} s; its log is {log}")


def run_demo(*, port: int, web_port: int, duration_s: float, outbox: str, rate_per_s: float = 20.0) -> int:
    try:
        broker = start_broker(port)
    except BrokerError as exc:
        print(f"usher demo: {exc}", file=sys.stderr)
        return 1
    bootstrap = f"127.0.0.1:{port}"
    logs = Path(tempfile.mkdtemp(prefix="usher-demo-"))
    workers: list[subprocess.Popen] = []
    try:
        print(f"broker   kafka://{bootstrap} (embedded, in memory)", flush=True)
        create_topics_sync(bootstrap, PARTITIONS)
        print(f"topics   {PARTITIONS} partitions each", flush=True)
        stage_ports = {stage: web_port + i for i, stage in enumerate(STAGES)}
        env = {**os.environ, "USHER_BROKER": f"kafka://{bootstrap}", "USHER_STORE": "memory://", "USHER_PARTITIONS": str(PARTITIONS),
               "USHER_OUTBOX_DIR": str(Path(outbox).resolve()), "USHER_DATA_DIR": str(logs / "data"),
               "USHER_API_TOKENS": os.environ.get("USHER_API_TOKENS", "demo-venue=demo-token")}
        for stage, stage_port in stage_ports.items():
            log = logs / f"{stage}.log"
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "worker", stage, "--web-port", str(stage_port), "--loglevel", "info"],
                env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True))  # stopped below, before the broker
        for (stage, stage_port), process in zip(stage_ports.items(), workers):
            wait_ready(stage_port, process, logs / f"{stage}.log")
            print(f"stage    {stage:9} http://127.0.0.1:{stage_port}  (log {logs / (stage + '.log')})", flush=True)
        asyncio.run(run_shop(bootstrap, stage_ports, duration_s, rate_per_s))
        print(f"\nMails and SMS are in {Path(outbox).resolve()}; stage logs in {logs}.")
        return 0
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"usher demo: {exc}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping the stages and the broker ...", flush=True)
        for process in workers:
            process.terminate()
        deadline = time.monotonic() + 15
        for process in workers:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
        stop_broker(broker)
