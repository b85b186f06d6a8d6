"""Prometheus metrics every stage exposes on `/metrics` (and the demo reads)."""
from prometheus_client import Counter

CONSUMED = Counter("usher_records_consumed", "Records read from a topic", ["stage", "topic"])
PRODUCED = Counter("usher_records_produced", "Records written to a topic", ["stage", "topic"])
DEAD_LETTERS = Counter("usher_dead_letters", "Records rejected to usher.dead-letters", ["stage", "topic"])
DUPLICATES = Counter("usher_duplicates_dropped", "Repeats of an already handled (tenant, source, id)", ["stage"])
