"""The prompts stage's faust wiring (walking skeleton: consumes its real topics)."""
from __future__ import annotations

import faust

from workers import envelope
from workers.edge import Accepted
from workers.stage import StageContext


def register(app: faust.App, ctx: StageContext) -> None:
    def handle(record: Accepted) -> list[envelope.Out]:
        return []

    ctx.edge.subscribe("inputs", [envelope.CONFIG, envelope.EVENTS, envelope.CHECKOUTS, envelope.CONSENT_STATE], on_record=handle)
