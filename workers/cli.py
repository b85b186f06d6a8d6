"""The `usher` command: broker, topics create, worker, demo."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from workers import memory
from workers.settings import Settings
from workers.stage import STAGES

# How long a thread holds the interpreter while another waits for it. A worker's event loop
# keeps it busy, and its other threads (faust's consumer, the provider calls) wait for it after
# every socket read or write: at Python's default of 5 ms, a SendGrid request of 1,000 mails
# took 41-48 ms against a local stand-in while the loop was busy, and 21 ms at 0.5 ms.
SWITCH_INTERVAL_S = 0.0005


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "broker", None):
        overrides["broker"] = args.broker
    if getattr(args, "web_port", None):
        overrides["web_port"] = args.web_port
    if getattr(args, "partitions", None):
        overrides["partitions"] = args.partitions
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    if getattr(args, "store", None):
        overrides["store"] = args.store
    return Settings(**overrides)


def cmd_broker(args: argparse.Namespace) -> int:
    from workers.broker import BrokerError, start_broker, stop_broker

    try:
        process = start_broker(args.port, args.host, quiet=False)
    except BrokerError as exc:
        print(f"usher broker: {exc}", file=sys.stderr)
        return 1
    print(f"usher broker: listening on kafka://{args.host}:{args.port} (in memory; Ctrl-C stops it)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: stop_broker(process))
    try:
        return process.wait()
    except KeyboardInterrupt:
        stop_broker(process)
        return 0


def cmd_topics_create(args: argparse.Namespace) -> int:
    from workers.topics import create_topics_sync

    settings = _settings(args)
    try:
        outcome = create_topics_sync(settings.bootstrap_servers, settings.partitions)
    except Exception as exc:  # one actionable line instead of a traceback
        print(f"usher topics create: {type(exc).__name__}: {exc} (is the broker at {settings.broker} up?)", file=sys.stderr)
        return 1
    for name, state in sorted(outcome.items()):
        print(f"{state:8} {name}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import faust

    from workers.stage import build_app

    settings = _settings(args)
    stages = STAGES if args.stage == "all" else (args.stage,)
    from mode.utils.logging import level_number

    class Worker(faust.Worker):
        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            # mode leaves the root logger at DEBUG whatever the log level asked for, and aiokafka
            # then builds a log record for every broker response (a few % of a stage's time).
            logger.setLevel(level_number(self.loglevel))

    memory.tune_process()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    app = build_app(stages, settings)
    worker = Worker(app, loglevel=args.loglevel, quiet=True)
    worker.execute_from_commandline()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from workers.demo import run_demo

    return run_demo(port=args.port, web_port=args.web_port, duration_s=args.duration, outbox=args.outbox)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="usher", description="Consent-aware audience messaging pipeline.")
    commands = root.add_subparsers(dest="command", required=True)

    broker = commands.add_parser("broker", help="run the embedded Kafka-compatible broker")
    broker.add_argument("--port", type=int, default=9092)
    broker.add_argument("--host", default="127.0.0.1")
    broker.set_defaults(run=cmd_broker)

    topics = commands.add_parser("topics", help="manage topics")
    topics_commands = topics.add_subparsers(dest="topics_command", required=True)
    create = topics_commands.add_parser("create", help="create every topic (idempotent)")
    create.add_argument("--broker", default=os.environ.get("USHER_BROKER"), help="kafka://host:port[,host:port]")
    create.add_argument("--partitions", type=int)
    create.set_defaults(run=cmd_topics_create)

    worker = commands.add_parser("worker", help="run one stage, or all four in one process")
    worker.add_argument("stage", choices=(*STAGES, "all"))
    worker.add_argument("--broker", default=os.environ.get("USHER_BROKER"), help="kafka://host:port[,host:port]")
    worker.add_argument("--web-port", type=int)
    worker.add_argument("--data-dir")
    worker.add_argument("--store", help="rocksdb:// (default) or memory://")
    worker.add_argument("--loglevel", default="warn", choices=("crit", "error", "warn", "info", "debug"))
    worker.set_defaults(run=cmd_worker)

    demo = commands.add_parser("demo", help="broker, topics, the four stages and a simulated ticket shop")
    demo.add_argument("--port", type=int, default=9092, help="broker port")
    demo.add_argument("--web-port", type=int, default=6066, help="first of four web ports")
    demo.add_argument("--duration", type=float, default=90.0, help="seconds the shop keeps selling")
    demo.add_argument("--outbox", default="./outbox")
    demo.set_defaults(run=cmd_demo)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
