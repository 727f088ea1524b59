"""The deployment files refer to things that exist: metrics, files, commands, partitions."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from streamproc import topics
from streamproc.cli.main import build_parser
from streamproc.config import KafkaSecurity, WorkerConfig
from streamproc.flow.lag import PartitionLag, Throughput
from streamproc.logs import JsonFormatter
from streamproc.metrics.lag_monitor import LagReport
from streamproc.metrics.prometheus import LiveGauges, WorkerCollector
from streamproc.metrics.stats import WorkerStats

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\b(streamproc_[a-z_]+)")


def exported_names() -> set[str]:
    """Every sample name a worker exposes, with lag and GPU series present."""
    report = LagReport("g", 0.0, [PartitionLag("t", 0, 5, 3, 1.0, 2.0)],
                       Throughput(10.0, 5.0, 1), 1, "OK")
    gauges = LiveGauges(1, 2, 3, 4, 5, 0.01, 8, 16, 0.02, 0, {"allocated": 1})
    stats = WorkerStats()
    stats.outcomes["length"] += 1
    stats.window_changes["itl_over_target"] += 1
    registry = CollectorRegistry()
    registry.register(WorkerCollector(stats, lambda: gauges, lambda: report))
    return {s.name for family in registry.collect() for s in family.samples}


def referenced(text: str) -> set[str]:
    return set(METRIC.findall(text))


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "streamproc.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(dashboard["panels"]) >= 10
    assert referenced(" ".join(exprs)) <= exported_names()
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("lag", "drain", "first token", "inter-token", "throughput", "batch",
                  "window", "outcome", "health", "running cap", "tokens per chunk"):
        assert topic in titles, topic


def test_alert_rules_use_exported_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert referenced(" ".join(exprs)) <= exported_names()


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_compose_services_mounts_and_ports_are_consistent() -> None:
    services = compose()["services"]
    assert {"kafka", "topics", "worker", "worker-gpu", "prometheus", "grafana"} <= set(services)
    host_ports = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    dockerfile = services["worker"]["build"]["dockerfile"]
    assert (ROOT / dockerfile).exists()


@pytest.mark.parametrize("service", ["topics", "model", "worker", "worker-gpu"])
def test_compose_commands_are_valid_streamproc_commands(service: str) -> None:
    command = compose()["services"][service]["command"]
    build_parser().parse_args(command)  # exits on an unknown flag


def test_prometheus_scrapes_compose_workers_and_grafana_reads_prometheus() -> None:
    services = compose()["services"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    for target in targets:
        host, port = target.split(":")
        assert host in services
        assert f"--metrics-port {port}" in shlex.join(services[host]["command"])
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"].split("//")[1].split(":")[0] in services


def kubernetes() -> dict[str, dict[str, Any]]:
    folder = DEPLOY / "k8s"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return {doc["kind"]: doc for name in kustomization["resources"]
            for doc in yaml.safe_load_all((folder / name).read_text())}


def test_kubernetes_scaling_fits_the_declared_topics_and_config() -> None:
    docs = kubernetes()
    assert {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
            "ScaledObject"} <= set(docs)
    config = docs["ConfigMap"]["data"]
    WorkerConfig.from_env(config)  # every STREAMPROC_ setting is valid
    scaler = docs["ScaledObject"]["spec"]
    partitions = {s.name: s.partitions for s in topics.load_specs()}
    lanes = {s.name for s in topics.load_specs() if s.role == "requests"}
    triggers = [t["metadata"] for t in scaler["triggers"]]
    assert {t["topic"] for t in triggers} == lanes  # every lane's lag scales workers
    for trigger in triggers:
        assert trigger["consumerGroup"] == config["STREAMPROC_GROUP_ID"]
        assert scaler["maxReplicaCount"] <= partitions[trigger["topic"]]
    assert scaler["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    build_parser().parse_args(container["args"])
    assert "nvidia.com/gpu" in container["resources"]["requests"]
    assert docs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > \
        WorkerConfig().drain_timeout_s + WorkerConfig().close_timeout_s


KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256",
             "SCRAM-SHA-512": "scram_sha512"}


def test_workers_and_the_scaler_read_one_set_of_kafka_credentials(tmp_path: Path) -> None:
    docs = kubernetes()
    secret = docs["Secret"]
    values = secret["stringData"]
    auth = docs["TriggerAuthentication"]
    for trigger in docs["ScaledObject"]["spec"]["triggers"]:
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = auth["spec"]["secretTargetRef"]
    assert {r["parameter"] for r in refs} >= {"sasl", "tls", "username", "password", "ca"}
    assert all(r["name"] == secret["metadata"]["name"] and r["key"] in values for r in refs)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {}
    for item in container["env"]:
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"] in values) == (secret["metadata"]["name"], True)
            env[item["name"]] = values[ref["key"]]
        else:
            env[item["name"]] = item["value"]
    [volume] = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    # The password file the worker is pointed at is the Secret's key, mounted.
    password_file = Path(env["STREAMPROC_SASL_PASSWORD_FILE"])
    assert password_file.parent == Path(mount["mountPath"])
    assert password_file.name in values
    (tmp_path / password_file.name).write_text(values[password_file.name])
    env["STREAMPROC_SASL_PASSWORD_FILE"] = str(tmp_path / password_file.name)
    security = KafkaSecurity.from_env(env)  # what the worker would run with: valid
    # ... and the scaler connects the same way.
    sasl = KEDA_SASL[security.sasl_mechanism] if security.protocol.startswith("SASL") \
        else "none"
    assert values["keda-sasl"] == sasl
    assert values["keda-tls"] == ("enable" if security.protocol.endswith("SSL") else "disable")


def test_json_logs_carry_the_record_context() -> None:
    import logging

    record = logging.LogRecord("streamproc.ingest", logging.WARNING, __file__, 1,
                               "dead letter from %s", ("t",), None)
    for key, value in {"topic": "t", "partition": 2, "offset": 41, "request_id": "r"}.items():
        setattr(record, key, value)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "dead letter from t"
    assert (entry["topic"], entry["partition"], entry["offset"], entry["request_id"]) == \
        ("t", 2, 41, "r")
    assert entry["level"] == "warning"


def test_transformers_logs_in_the_same_json_lines(capfd: pytest.CaptureFixture[str],
                                                  json_logs: None) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers.streamproc_probe").warning("from transformers")
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()]
    assert [(line["logger"], line["message"]) for line in lines] == \
        [("transformers.streamproc_probe", "from transformers")]
