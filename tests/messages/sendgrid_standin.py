"""A local stand-in for SendGrid's v3 mail send, for tests and benchmarks.

It checks each request against the documented /v3/mail/send shape and answers
as SendGrid does: 202 with an `X-Message-Id` header, or 400 with
`{"errors": [{"message", "field", "help"}]}`. Answers can be scripted (`script`)
to test retries; a scripted status 0 drops the connection without an answer.
Accepted bodies are kept in `accepted`.
"""
from __future__ import annotations

import json
import secrets
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

API_KEY = "SG.test-key"
MAX_PERSONALIZATIONS = 1000
MAX_BYTES = 10_000
RESERVED_HEADERS = {
    "x-sg-id", "x-sg-eid", "received", "dkim-signature", "content-type", "content-transfer-encoding",
    "to", "from", "subject", "reply-to", "cc", "bcc",
}


def shape_errors(body: Any) -> list[dict[str, Any]]:
    """What SendGrid would refuse in `body`, as its error objects."""
    errors: list[dict[str, Any]] = []

    def error(message: str, field: str | None) -> None:
        errors.append({"message": message, "field": field, "help": None})

    if not isinstance(body, dict):
        error("The request body must be a JSON object.", None)
        return errors
    personalizations = body.get("personalizations")
    if not isinstance(personalizations, list) or not 1 <= len(personalizations) <= MAX_PERSONALIZATIONS:
        error("The personalizations field is required and must have at least one and at most 1000 personalizations.",
              "personalizations")
        personalizations = []
    for index, item in enumerate(personalizations):
        field = f"personalizations.{index}"
        to = item.get("to") if isinstance(item, dict) else None
        if not isinstance(to, list) or not to:
            error("The to array is required for all personalization objects, and must have at least one email object "
                  "with a valid email address.", f"{field}.to")
            continue
        addresses = [entry.get("email") if isinstance(entry, dict) else None for entry in to]
        if not all(isinstance(address, str) and "@" in address for address in addresses):
            error("Does not contain a valid address.", f"{field}.to")
        if len(set(addresses)) != len(addresses):
            error("Each email address in the personalization block should be unique.", f"{field}.to")
        for name in ("headers", "substitutions", "custom_args"):
            values = item.get(name, {})
            if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
                error(f"The {name} values must be strings.", f"{field}.{name}")
            elif name != "headers" and len(json.dumps(values).encode()) > MAX_BYTES:
                error(f"The {name} may not exceed {MAX_BYTES} bytes per personalization.", f"{field}.{name}")
        reserved = RESERVED_HEADERS & {name.lower() for name in item.get("headers", {})}
        if reserved:
            error(f"The headers {sorted(reserved)} are reserved.", f"{field}.headers")
        if "subject" in item and not isinstance(item["subject"], str):
            error("The subject must be a string.", f"{field}.subject")
    if not isinstance(body.get("subject"), str) and not all(
        isinstance(item, dict) and isinstance(item.get("subject"), str) for item in personalizations
    ):
        error("The subject is required. You can get around this requirement if you use a template with a subject "
              "defined or if every personalization has a subject defined.", "subject")
    sender = body.get("from")
    if not isinstance(sender, dict) or not isinstance(sender.get("email"), str) or "@" not in sender["email"]:
        error("The from object must be provided for every email send. It is an object that requires the email "
              "parameter, but may also contain a name parameter.", "from")
    content = body.get("content")
    if not isinstance(content, list) or not content:
        error("Unless a valid template_id is provided, the content parameter is required.", "content")
        content = []
    types = [part.get("type") if isinstance(part, dict) else None for part in content]
    if any(not isinstance(part, dict) or not part.get("value") for part in content):
        error("The content value must be a string at least one character in length.", "content")
    if "text/html" in types and "text/plain" in types and types.index("text/plain") > types.index("text/html"):
        error("If present, text/plain and text/html may only be provided in this order.", "content")
    return errors


class SendGridStandIn:
    """Serves on 127.0.0.1 on a free port while used as a context manager; `host`
    is what `SendGridAPIClient(host=...)` needs."""

    def __init__(self) -> None:
        self.accepted: list[dict[str, Any]] = []
        self.requests = 0
        # Answers to give before the normal ones: (status, body, headers).
        self.script: deque[tuple[int, dict[str, Any], dict[str, str]]] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        # A short poll keeps shutting down quick.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> SendGridStandIn:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, authorization: str | None, raw: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            self.requests += 1
            if self.script:
                return self.script.popleft()
        if authorization != f"Bearer {API_KEY}":
            return 401, {"errors": [{"message": "Permission denied, wrong credentials", "field": None}]}, {}
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, {"errors": [{"message": "Bad Request", "field": None}]}, {}
        errors = shape_errors(body)
        if errors:
            return 400, {"errors": errors}, {}
        with self._lock:
            self.accepted.append(body)
        return 202, {}, {"X-Message-Id": secrets.token_urlsafe(16)}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/v3/mail/send":
                    status, body, headers = 404, {"errors": [{"message": "not found", "field": None}]}, {}
                else:
                    status, body, headers = standin._answer(self.headers.get("Authorization"), raw)
                if status == 0:
                    self.close_connection = True
                    return
                payload = json.dumps(body).encode() if body else b""
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_: Any) -> None:
                """Quiet: the tests read what was accepted, not the access log."""

        return Handler
