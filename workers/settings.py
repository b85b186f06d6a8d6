"""Process configuration, from `USHER_*` environment variables and CLI flags."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="USHER_", extra="ignore")

    broker: str = "kafka://localhost:9092"
    secret: str = "change-me-in-production"
    api_tokens: str = ""
    email_provider: str = "outbox"
    sms_provider: str = "outbox"
    outbox_dir: Path = Path("./outbox")
    sendgrid_api_key: str = ""
    sendgrid_host: str = "https://api.sendgrid.com"
    sendgrid_webhook_public_key: str = ""
    aws_region: str = "eu-west-1"
    # Provider calls per second at most (a SendGrid call carries up to 1,000 mails; 0: no limit).
    email_rate_per_s: float = 10.0
    sms_rate_per_s: float = 20.0
    # Where an SNS webhook message may point us (signing certificate, subscription URL): comma-separated scheme://host[:port], subdomains included.
    sns_trusted_urls: str = "https://amazonaws.com"
    # SNS topics the SMS webhook takes messages from (comma-separated ARNs; empty: any).
    sns_topic_arns: str = ""
    # Shifts the stages' clocks by this many seconds, so tests can see days pass; 0 in production.
    clock_offset_s: float = 0.0
    data_dir: Path = Path("./data")
    # "rocksdb://" keeps tables on disk (production); "memory://" is for tests and demos.
    store: str = "rocksdb://"
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    partitions: int = 6
    # Short group timeouts let a restarted worker rejoin in seconds rather than the default minute.
    session_timeout_s: float = 10.0
    rebalance_timeout_s: float = 10.0
    heartbeat_interval_s: float = 1.0
    # Longest a worker's fetch waits for data: faust fixes 1.5 s, and the embedded broker always
    # waits it out (Apache Kafka answers as soon as there is data).
    fetch_max_wait_ms: int = Field(default=50, ge=1)
    # A stage handles what has been fetched in batches of up to `batch_size` records, gathered for
    # at most `batch_within_s` after the first (one mail to many recipients becomes one provider
    # request).
    batch_size: int = Field(default=1000, ge=1)
    batch_within_s: float = 0.05
    # Ids per partition the edge remembers to drop repeats (see workers/dedupe.py).
    dedupe_window: int = 20_000

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        if not value.startswith("kafka://"):
            raise ValueError(f"broker URL must look like kafka://host:port[,host:port], got {value!r}")
        return value

    @property
    def bootstrap_servers(self) -> str:
        """The broker URL as aiokafka and kafka-python want it."""
        return self.broker.removeprefix("kafka://")

    @cached_property
    def tokens_by_tenant(self) -> dict[str, str]:
        pairs = (item.split("=", 1) for item in self.api_tokens.split(",") if "=" in item)
        return {tenant.strip(): token.strip() for tenant, token in pairs}
