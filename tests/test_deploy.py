"""docker-compose.yml and deploy/ cannot run here (no Docker engine): check their shape."""
from __future__ import annotations

from pathlib import Path

import yaml

from workers.cli import parser
from workers.stage import STAGES

ROOT = Path(__file__).resolve().parent.parent


def usher_command_parses(args: list[str]) -> None:
    """The argument list a container passes to the `usher` entry point must be a real command."""
    parsed = parser().parse_args(args)
    assert callable(parsed.run)


def test_compose_runs_kafka_topics_and_every_stage() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["topics"]["command"][:2] == ["topics", "create"]
    for stage in STAGES:
        service = services[stage]
        assert service["command"][:2] == ["worker", stage]
        assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        assert service["environment"]["USHER_BROKER"] == "kafka://kafka:9092"
    for name, service in services.items():
        if "command" in service:
            usher_command_parses(service["command"])


def test_dockerfile_copies_what_the_package_reads_at_run_time() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for folder in ("workers", "schemas", "layouts"):
        assert f"COPY {folder} ./{folder}" in dockerfile
        assert (ROOT / folder).is_dir()
    assert 'ENTRYPOINT ["usher"]' in dockerfile


def test_kubernetes_has_a_statefulset_and_service_per_stage() -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/usher.yaml").read_text()) if d]
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    usher_command_parses(by_kind["Job"]["usher-topics"]["spec"]["template"]["spec"]["containers"][0]["args"])
    for stage in STAGES:
        container = by_kind["StatefulSet"][f"usher-{stage}"]["spec"]["template"]["spec"]["containers"][0]
        assert container["args"][:2] == ["worker", stage]
        usher_command_parses(container["args"])
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert f"usher-{stage}" in by_kind["Service"]
