"""The messages stage sending one message to many recipients through SendGrid (a local stand-in).

One worker (`usher worker messages`, the production RocksDB store) is started on pre-loaded
`message.requested` records of one e-mail message. `send_per_s` counts the e-mails the
stand-in received per second, from its first request to its last; `send_peak_rss_mb` is the
worker's peak resident memory (VmHWM) over the whole run, startup included; `send_cpu_us_per_mail`
the worker's CPU time (every thread) over the same span as `send_per_s`, per mail: unlike the
rate, it holds on a machine that other work keeps busy.
"""
from __future__ import annotations

import asyncio
import os
import time
from itertools import chain
from pathlib import Path
from typing import Any

from bench.common import load, run_alone, stage_worker, wait_ready
from tests.messages.sendgrid_standin import API_KEY, SendGridStandIn
from workers import envelope

TENANT = "bench-send"
MESSAGE = "msg-bench-send"
# The case: one message to a million recipients (about six minutes here); fewer for a quick look.
RECIPIENTS = int(os.environ.get("USHER_BENCH_SEND_RECIPIENTS", "1000000"))
SETTINGS = {"default_language": "en", "sender": {"email": "tickets@venue.example", "name": "Venue"},
            "public_url": "https://usher.venue.example"}
EVENT = {"event": "ev-bench", "name": "Hamlet", "starts_at": "2026-12-01T19:30:00+01:00", "ends_at": "2026-12-01T22:00:00+01:00",
         "timezone": "Europe/Brussels"}
FIRST_NAMES = ("Ann", "Bob", "Chloé", "Dirk", "Eva", "Femke")
LAST_NAMES = ("Peeters", "Janssens", "Maes", "Jacobs", "Mertens", "Willems")
IDLE_S = 20.0
DEADLINE_S = 900.0


class CountingStandIn(SendGridStandIn):
    """The stand-in, also noting when each accepted request came and how many of the bench's
    mails it carried. Only the bench tenant's count: in `make bench` the worker also sends what
    earlier benches left on messages.outbox (the consent bench's confirmation mails, say)."""

    def __init__(self) -> None:
        super().__init__()
        # (when, the bench's mails it carried, the worker's CPU seconds by then)
        self.arrivals: list[tuple[float, int, float]] = []
        self.worker_pid: int | None = None

    def _answer(self, authorization: str | None, raw: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        answer = super()._answer(authorization, raw)
        if answer[0] == 202:
            # Each acceptance keeps one body; counted and dropped, so a million mails fit in memory.
            with self._lock:
                personalizations = self.accepted.pop()["personalizations"]
                ours = sum(1 for item in personalizations if item["custom_args"]["tenant"] == TENANT)
                if ours:
                    self.arrivals.append((time.perf_counter(), ours, cpu_s(self.worker_pid)))
        return answer

    @property
    def received(self) -> int:
        return sum(count for _, count, _ in self.arrivals)


def request(number: int) -> envelope.Out:
    contact = f"c-{number}"
    data = {
        "request": f"{MESSAGE}-{number}", "kind": "event-message", "message": MESSAGE, "contact": contact, "channel": "email",
        "to": {"email": f"{contact}@example.com"}, "layout": "event-message", "language": "en",
        "vars": {"custom_text": "Doors open at 19:00. Bring your ticket.", "first_name": FIRST_NAMES[number % 6],
                 "last_name": LAST_NAMES[number // 6 % 6], "event": EVENT, "orders": [f"o-{number}"], "marketing": True},
    }
    event = envelope.make_event("message.requested", TENANT, data, source="/bench", id_=data["request"])
    return envelope.Out(envelope.OUTBOX, envelope.key(TENANT, contact), event)


def settings() -> envelope.Out:
    event = envelope.make_event("config.settings", TENANT, SETTINGS, source="/bench")
    return envelope.Out(envelope.CONFIG, envelope.key(TENANT, "settings", "default"), event)


def cpu_s(pid: int | None) -> float:
    """The CPU seconds (user and system, every thread) process `pid` has used so far."""
    if pid is None:
        return 0.0
    # Fields 14 and 15 of /proc/PID/stat, after the command name in parentheses.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def measure(bootstrap: str, workdir: Path) -> dict[str, Any]:
    await load(bootstrap, chain([settings()], map(request, range(RECIPIENTS))))
    with CountingStandIn() as standin:
        env = {"USHER_EMAIL_PROVIDER": "sendgrid", "USHER_SENDGRID_API_KEY": API_KEY,
               "USHER_SENDGRID_HOST": standin.host, "USHER_EMAIL_RATE_PER_S": "0"}
        with stage_worker("messages", bootstrap, workdir, "messages-send", env) as (worker, port):
            standin.worker_pid = worker.pid
            await wait_ready(port, worker, workdir / "messages-send.log")
            deadline, last_count, last_change = time.monotonic() + DEADLINE_S, 0, time.monotonic()
            while standin.received < RECIPIENTS and time.monotonic() < deadline and worker.poll() is None:
                await asyncio.sleep(0.5)
                if standin.received != last_count:
                    last_count, last_change = standin.received, time.monotonic()
                elif time.monotonic() - last_change > IDLE_S:
                    break
            peak = peak_rss_mb(worker.pid)
    arrivals = standin.arrivals
    if len(arrivals) < 2:
        return {"send_per_s": 0.0, "send_peak_rss_mb": round(peak, 1), "note": f"SendGrid received {standin.received}; see {workdir}/messages-send.log"}
    # The first request's mails were rendered before the clock starts: count the ones after it.
    elapsed = arrivals[-1][0] - arrivals[0][0]
    mails = standin.received - arrivals[0][1]
    return {
        "send_per_s": round(mails / elapsed, 1),
        "send_cpu_us_per_mail": round((arrivals[-1][2] - arrivals[0][2]) / mails * 1e6, 1),
        "send_peak_rss_mb": round(peak, 1),
        "send_peak_rss_recipients": standin.received,
        "send_requests": len(arrivals),
    }


if __name__ == "__main__":
    run_alone(measure)
