"""`GET /v1/prompts` latency: p99 at a steady 500 requests a second, with 100,000 contacts known.

The tenant's configuration and one `consent.status` per contact are published first; then one
prompts worker is started and, once it has read them all, requests for random contacts go out
open-loop (each at its planned moment, whether or not earlier ones were answered), and each
latency counts from that moment, so a stalled worker cannot hide behind a waiting client.
"""
from __future__ import annotations

import asyncio
import random
import re
import statistics
import subprocess
import time
from itertools import chain
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import load, run_alone, stage_worker
from workers import envelope
from workers.shop import LANGUAGES, Shop

TENANT = "bench-prompts-http"
TOKEN = "bench-prompts-token"
CONTACTS = 100_000
REQUESTS_PER_S = 500
DURATION_S = 10.0
STATUSES = ("opted_in", "opted_out", "pending", "expired", "unknown")
READY_TIMEOUT_S = 300.0
IDLE_S = 2.0
INPUT_TOPICS = (envelope.CHECKOUTS, envelope.CONSENT_STATE, envelope.CONTACTS_STATE)


def consent_status(number: int) -> envelope.Out:
    contact = f"c-{number}"
    rng = random.Random(number)
    optins = {optin: {"status": rng.choice(STATUSES), "method": "checkout", "channel": "web"} for optin in ("newsletter", "sms-alerts")}
    event = envelope.make_event("consent.status", TENANT, {"contact": contact, "optins": optins}, source="/bench")
    return envelope.Out(envelope.CONSENT_STATE, envelope.contact_key(TENANT, contact), event)


async def consumed(session: aiohttp.ClientSession, base: str, topic: str) -> float:
    """Records of `topic` the worker's prompts stage has read (its /metrics); 0 while it starts."""
    try:
        async with session.get(f"{base}/metrics") as response:
            text = await response.text()
    except aiohttp.ClientError:
        return 0.0
    found = re.search(rf'^usher_records_consumed_total{{stage="prompts",topic="{re.escape(topic)}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def wait_caught_up(session: aiohttp.ClientSession, base: str, contacts: int, worker: subprocess.Popen) -> None:
    """Until the worker knows the contacts and has worked through every record waiting for it (in
    `make bench`, the earlier benches leave statuses and profiles of other tenants): its counts of
    records read stop moving. The latencies are then those of a worker keeping up, not catching up."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    read, unchanged_since, statuses = -1.0, time.monotonic(), 0.0
    while True:
        if worker.poll() is not None:
            raise RuntimeError(f"prompts worker exited with {worker.returncode} before it caught up")
        if time.monotonic() > deadline:
            # Once seen in `make bench` (the bench run alone and the next `make bench` passed): what it had read says more.
            raise RuntimeError(f"prompts worker did not catch up with {', '.join(INPUT_TOPICS)} in {READY_TIMEOUT_S:.0f} s: "
                               f"it had read {read:.0f} records, {statuses:.0f} of them {envelope.CONSENT_STATE} "
                               f"({contacts} needed), the count last moving {time.monotonic() - unchanged_since:.0f} s before")
        statuses = await consumed(session, base, envelope.CONSENT_STATE)
        now_read = sum([await consumed(session, base, topic) for topic in INPUT_TOPICS])
        if now_read != read:
            read, unchanged_since = now_read, time.monotonic()
        elif statuses >= contacts and time.monotonic() - unchanged_since > IDLE_S:
            break
        await asyncio.sleep(0.5)
    while True:
        async with session.get(f"{base}/readyz") as response:
            if response.status == 200:
                return
        await asyncio.sleep(0.2)


async def drive(session: aiohttp.ClientSession, base: str, contacts: int) -> tuple[list[float], int]:
    """Latencies (ms) of the answered requests, and how many failed."""
    rng = random.Random(1)
    latencies: list[float] = []
    failures = 0

    async def ask(planned: float) -> None:
        nonlocal failures
        params = {"tenant": TENANT, "event": "ev-hamlet", "channel": "web", "contact": f"c-{rng.randrange(contacts)}",
                  "language": rng.choice(LANGUAGES)}
        try:
            async with session.get(f"{base}/v1/prompts", params=params, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                await response.read()
                ok = response.status == 200
        except aiohttp.ClientError:
            ok = False
        if ok:
            latencies.append((time.perf_counter() - planned) * 1000)
        else:
            failures += 1

    started = time.perf_counter()
    tasks = []
    for number in range(int(REQUESTS_PER_S * DURATION_S)):
        planned = started + number / REQUESTS_PER_S
        await asyncio.sleep(max(0.0, planned - time.perf_counter()))
        tasks.append(asyncio.create_task(ask(planned)))
    await asyncio.gather(*tasks)
    return latencies, failures


async def measure(bootstrap: str, workdir: Path, contacts: int = CONTACTS) -> dict[str, Any]:
    await load(bootstrap, chain(Shop(tenant=TENANT).setup(), map(consent_status, range(contacts))))
    with stage_worker("prompts", bootstrap, workdir, "prompts-http", {"USHER_API_TOKENS": f"{TENANT}={TOKEN}"}) as (worker, port):
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await wait_caught_up(session, base, contacts, worker)
            started = time.perf_counter()
            latencies, failures = await drive(session, base, contacts)
            elapsed = time.perf_counter() - started
    if not latencies:
        return {"prompts_http_p99_ms": None, "note": f"no request answered; see {workdir}/prompts-http.log"}
    latencies.sort()
    return {
        "prompts_http_p99_ms": round(latencies[max(0, int(len(latencies) * 0.99) - 1)], 2),
        "prompts_http_p50_ms": round(statistics.median(latencies), 2),
        "rps": round(len(latencies) / elapsed, 1),
        "contacts": contacts,
        "failed": failures,
    }


if __name__ == "__main__":
    run_alone(measure)
