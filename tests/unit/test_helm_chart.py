"""The Helm chart lints, renders and validates offline; its alerts pass promtool.

No helm binary or cluster: helm-python-sdk (Helm's Go SDK) lints and renders,
kubernetes-validate checks the manifests against the Kubernetes 1.31 schemas, and
promtool (Debian's prometheus package) checks and unit-tests the alert rules.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from lotflow.metrics import SinkMetrics, WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "lotflow"
ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
ALERT_TESTS = ROOT / "helm" / "tests" / "alerts_test.yaml"
DASHBOARD_SCRIPT = ROOT / "helm" / "dashboards" / "lotflow_dashboard.py"

KUBE_VERSION = "1.31.0"
RELEASE = "lotflow"
NAMESPACE = "plant"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

MONITORING: dict[str, Any] = {
    "serviceMonitor": {"enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True},
}
EVERY_OPTION: dict[str, Any] = {
    **MONITORING,
    "image": {"tag": "1.2.3"},
    "imagePullSecrets": [{"name": "registry"}],
    "serviceAccountName": "lotflow",
    "kafka": {"schemaRegistryUrl": "http://schema-registry:8081", "topicPrefix": "plant1."},
    "config": {"extra": {"LOTFLOW_BATCH_SIZE": 5000, "LOTFLOW_SINK_BATCH_S": 0.25}},
    "worker": {
        "replicas": 12,
        "clickhouseDsn": True,
        "dataSizeLimit": "",
        "podAnnotations": {"example.com/team": "plant-it"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "kafka"}],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "worker"}},
            }
        ],
    },
    "sink": {"replicas": 2, "affinity": {}},
    "dashboard": {"annotations": {"grafana_folder": "Manufacturing"}},
}
SASL_SSL: dict[str, Any] = {
    "kafka": {"security": {"protocol": "SASL_SSL", "mechanism": "SCRAM-SHA-512",
                           "existingSecret": "lotflow-kafka", "caKey": "ca.pem"}},
    "worker": {"clickhouseDsn": True},
}
SASL_PLAINTEXT: dict[str, Any] = {
    "kafka": {"security": {"protocol": "SASL_PLAINTEXT", "existingSecret": "kafka-creds",
                           "usernameKey": "user", "passwordKey": "pass"}},
}
VALUE_SETS = {"defaults": {}, "monitoring": MONITORING, "every-option": EVERY_OPTION,
              "sasl-ssl": SASL_SSL, "sasl-plaintext": SASL_PLAINTEXT}

REQUIRED_CONFIG = {
    "LOTFLOW_BOOTSTRAP_SERVERS",
    "LOTFLOW_TOPIC_PREFIX",
    "LOTFLOW_PARTITIONS",
    "LOTFLOW_APP_ID",
    "LOTFLOW_DOCUMENT_WAIT_S",
    "LOTFLOW_RECEIVING_VERIFY_THRESHOLD",
    "LOTFLOW_RECEIVING_HIGH_PRIORITY_THRESHOLD",
    "LOTFLOW_WORKER_WEB_HOST",
    "LOTFLOW_VAR_DIR",
}
REQUIRED_PANELS = {
    "Throughput in / out by decision",
    "Exception ratio",
    "Dead letters",
    "Processing latency p50 / p99",
    "Consumer lag",
    "Confidence distribution",
    "Pending subjects",
    "Sink rows/s",
    "Sink batch latency p50 / p99",
    "Sink errors",
}
REQUIRED_ALERTS = {
    "LotflowWorkerDown",
    "LotflowConsumerLagHigh",
    "LotflowDeadLetters",
    "LotflowProcessingLatencyHigh",
    "LotflowExceptionRatioHigh",
    "LotflowSinkErrors",
    "LotflowSinkLagHigh",
}


# ---------------------------------------------------------------------- helpers


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every manifest the chart renders for ``values``, parsed."""
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    for template, text in sorted(rendered.items()):
        if not template.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, got {len(found)}"
    return found[0]


def config_data(docs: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap", f"{RELEASE}-config")["data"]
    return data


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def env_map(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def exposed_metric_names() -> set[str]:
    """Series names lotflow.metrics exposes (counters with _total, histograms' series)."""
    registry = CollectorRegistry()
    WorkerMetrics.create(registry)
    SinkMetrics.create(registry)
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def load_dashboard_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lotflow_dashboard", DASHBOARD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[str]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]


# ---------------------------------------------------------------------- lint and render


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_lints_strictly(values: dict[str, Any]) -> None:
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert problems == []


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rendered_manifests_validate_against_kubernetes(values: dict[str, Any]) -> None:
    docs = render(values)
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue  # no CRD schemas offline: checked in test_monitoring_resources
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {exc.path}")


def test_default_render_has_the_expected_resources() -> None:
    docs = render()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [
        ("ConfigMap", f"{RELEASE}-config"),
        ("ConfigMap", f"{RELEASE}-dashboard"),
        ("Deployment", f"{RELEASE}-sink"),
        ("Deployment", f"{RELEASE}-worker"),
        ("Job", f"{RELEASE}-setup"),
        ("Service", f"{RELEASE}-sink"),
        ("Service", f"{RELEASE}-worker"),
    ]
    assert not find(docs, "ServiceMonitor") and not find(docs, "PrometheusRule")


def test_names_follow_the_release() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render({}, name="prod", namespace=NAMESPACE)
    text = "\n".join(rendered.values())
    assert "name: prod-lotflow-worker" in text
    assert "name: prod-lotflow-config" in text


def test_more_workers_than_partitions_is_refused() -> None:
    with pytest.raises(helm.HelmError, match="partitions"):
        render({"worker": {"replicas": 13}, "kafka": {"partitions": 12}})


@pytest.mark.parametrize(
    "values",
    [
        {"worker": {"replicas": "two"}},
        {"serviceMonitr": {"enabled": True}},  # typo of a top-level key
        {"receiving": {"verifyThreshold": 1.5}},
        {"kafka": {"partitions": 0}},
        {"varDir": "var"},  # must be absolute: it is a mount path
    ],
    ids=["replicas-type", "unknown-key", "threshold-range", "partitions", "relative-var-dir"],
)
def test_values_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    assert helm.lint(str(CHART), values, strict=True)["errors"]
    with pytest.raises(helm.HelmValuesError):
        render(values)


# ---------------------------------------------------------------------- configuration


def test_configmap_carries_the_non_secret_settings() -> None:
    data = config_data(render())
    assert set(data) >= REQUIRED_CONFIG
    assert all(key.startswith("LOTFLOW_") for key in data)
    assert all(isinstance(value, str) for value in data.values())
    assert data["LOTFLOW_WORKER_WEB_HOST"] == "0.0.0.0"
    assert data["LOTFLOW_WORKER_WEB_PORT"] == "6066"
    assert data["LOTFLOW_SINK_METRICS_PORT"] == "9108"
    assert data["LOTFLOW_PARTITIONS"] == "12"
    assert data["LOTFLOW_RECEIVING_VERIFY_THRESHOLD"] == "0.9"
    assert "LOTFLOW_CLICKHOUSE_DSN" not in data
    # Unset registry: absent, not "", so the settings keep None and use bundled schemas.
    assert "LOTFLOW_SCHEMA_REGISTRY_URL" not in data


def test_configmap_takes_registry_url_and_extra_settings() -> None:
    data = config_data(render(EVERY_OPTION))
    assert data["LOTFLOW_SCHEMA_REGISTRY_URL"] == "http://schema-registry:8081"
    assert data["LOTFLOW_TOPIC_PREFIX"] == "plant1."
    assert data["LOTFLOW_BATCH_SIZE"] == "5000"
    assert data["LOTFLOW_SINK_BATCH_S"] == "0.25"


def test_extra_config_must_be_lotflow_settings() -> None:
    with pytest.raises(helm.HelmError, match="LOTFLOW_"):
        render({"config": {"extra": {"PATH": "/tmp"}}})


def test_config_change_rolls_the_pods() -> None:
    def checksum(values: dict[str, Any]) -> str:
        worker = one(render(values), "Deployment", f"{RELEASE}-worker")
        annotations: dict[str, str] = worker["spec"]["template"]["metadata"]["annotations"]
        return annotations["checksum/config"]

    assert checksum({}) != checksum({"receiving": {"verifyThreshold": 0.8}})


# ---------------------------------------------------------------------- workloads


@pytest.mark.parametrize(("component", "args", "port"), [("worker", ["worker"], 6066), ("sink", ["sink"], 9108)])
def test_deployment(component: str, args: list[str], port: int) -> None:
    docs = render()
    deployment = one(docs, "Deployment", f"{RELEASE}-{component}")
    spec = pod_spec(deployment)
    (container,) = spec["containers"]

    assert container["command"] == ["lotflow"] and container["args"] == args
    assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    assert container["envFrom"] == [{"configMapRef": {"name": f"{RELEASE}-config"}}]
    assert container["startupProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    # The worker's /healthz answers 503 when it is unhealthy; the sink serves /metrics only.
    health = "/healthz" if component == "worker" else "/metrics"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": health, "port": "metrics"}, probe
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}

    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    var_dir = config_data(docs)["LOTFLOW_VAR_DIR"]
    for path in ("/tmp", var_dir):
        assert "emptyDir" in volumes[mounts[path]], path

    # Only the sink writes ClickHouse: by default the worker never sees the secret.
    dsn = env_map(container).get("LOTFLOW_CLICKHOUSE_DSN")
    if component == "sink":
        assert dsn == {"secretKeyRef": {"name": "lotflow-clickhouse", "key": "dsn"}}
    else:
        assert dsn is None

    service = one(docs, "Service", f"{RELEASE}-{component}")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}]
    assert service["spec"]["selector"].items() <= deployment["spec"]["selector"]["matchLabels"].items()
    assert service["metadata"]["labels"]["lotflow.io/job"] == f"lotflow-{component}"


def test_worker_replicas_and_options() -> None:
    docs = render(EVERY_OPTION)
    worker = one(docs, "Deployment", f"{RELEASE}-worker")
    assert worker["spec"]["replicas"] == 12
    spec = pod_spec(worker)
    assert spec["serviceAccountName"] == "lotflow"
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    (container,) = spec["containers"]
    assert container["image"].endswith(":1.2.3")
    assert "secretKeyRef" in env_map(container)["LOTFLOW_CLICKHOUSE_DSN"]
    assert one(docs, "Deployment", f"{RELEASE}-sink")["spec"]["replicas"] == 2


def test_setup_job_is_a_pre_install_hook_creating_topics_then_migrating() -> None:
    docs = render()
    job = one(docs, "Job", f"{RELEASE}-setup")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]

    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never"
    (topics,) = spec["initContainers"]
    (migrate,) = spec["containers"]
    assert [topics["command"] + topics["args"], migrate["command"] + migrate["args"]] == [
        ["lotflow", "topics", "create"],
        ["lotflow", "db", "migrate"],
    ]
    # Hooks run before the ConfigMap exists: the settings are inline, and identical.
    config = config_data(docs)
    for container in (topics, migrate):
        assert "envFrom" not in container
        env = env_map(container)
        assert {k: env[k] for k in config} == config
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "secretKeyRef" in env_map(migrate)["LOTFLOW_CLICKHOUSE_DSN"]


# ---------------------------------------------------------------------- Kafka security


def kafka_pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every container that talks to Kafka or reads the settings, by name, with its pod spec."""
    pods: dict[str, dict[str, Any]] = {}
    for kind, name in (("Deployment", "worker"), ("Deployment", "sink"), ("Job", "setup")):
        spec = pod_spec(one(docs, kind, f"{RELEASE}-{name}"))
        for container in spec.get("initContainers", []) + spec["containers"]:
            pods[container["name"]] = {"container": container, "spec": spec}
    return pods


def test_plaintext_by_default_without_credentials() -> None:
    docs = render()
    data = config_data(docs)
    assert data["LOTFLOW_KAFKA_SECURITY_PROTOCOL"] == "PLAINTEXT"
    assert "LOTFLOW_KAFKA_SASL_MECHANISM" not in data and "LOTFLOW_KAFKA_SSL_CAFILE" not in data
    for name, pod in kafka_pods(docs).items():
        env = env_map(pod["container"])
        assert "LOTFLOW_KAFKA_SASL_USERNAME" not in env and "LOTFLOW_KAFKA_SASL_PASSWORD" not in env, name
        assert "kafka-ca" not in {v["name"] for v in pod["spec"]["volumes"]}, name


def test_sasl_credentials_and_ca_come_from_the_secret() -> None:
    docs = render(SASL_SSL)
    data = config_data(docs)
    assert data["LOTFLOW_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert data["LOTFLOW_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert data["LOTFLOW_KAFKA_SSL_CAFILE"] == "/etc/lotflow/kafka/ca.crt"
    assert not any("PASSWORD" in key or "USERNAME" in key for key in data)  # never in the ConfigMap
    pods = kafka_pods(docs)
    assert set(pods) == {"worker", "sink", "topics-create", "db-migrate"}
    for name, pod in pods.items():
        container, spec = pod["container"], pod["spec"]
        env = env_map(container)
        assert env["LOTFLOW_KAFKA_SASL_USERNAME"] == {"secretKeyRef": {"name": "lotflow-kafka", "key": "username"}}
        assert env["LOTFLOW_KAFKA_SASL_PASSWORD"] == {"secretKeyRef": {"name": "lotflow-kafka", "key": "password"}}
        if name in ("topics-create", "db-migrate"):  # the hook gets the settings inline
            assert env["LOTFLOW_KAFKA_SSL_CAFILE"] == "/etc/lotflow/kafka/ca.crt"
            assert env["LOTFLOW_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["kafka-ca"] == {"name": "kafka-ca", "mountPath": "/etc/lotflow/kafka", "readOnly": True}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["kafka-ca"]["secret"]["secretName"] == "lotflow-kafka"
        assert volumes["kafka-ca"]["secret"]["items"] == [{"key": "ca.pem", "path": "ca.crt"}]
    # the worker keeps its ClickHouse DSN next to the Kafka credentials
    assert "secretKeyRef" in env_map(pods["worker"]["container"])["LOTFLOW_CLICKHOUSE_DSN"]


def test_sasl_plaintext_with_custom_keys_and_no_ca() -> None:
    docs = render(SASL_PLAINTEXT)
    data = config_data(docs)
    assert data["LOTFLOW_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
    assert data["LOTFLOW_KAFKA_SASL_MECHANISM"] == "PLAIN"
    assert "LOTFLOW_KAFKA_SSL_CAFILE" not in data
    for pod in kafka_pods(docs).values():
        env = env_map(pod["container"])
        assert env["LOTFLOW_KAFKA_SASL_USERNAME"] == {"secretKeyRef": {"name": "kafka-creds", "key": "user"}}
        assert env["LOTFLOW_KAFKA_SASL_PASSWORD"] == {"secretKeyRef": {"name": "kafka-creds", "key": "pass"}}
        assert "kafka-ca" not in {v["name"] for v in pod["spec"]["volumes"]}


def test_security_settings_are_valid_lotflow_settings() -> None:
    """What the chart sets (plus the Secret's values) is accepted by lotflow's Settings."""
    from pydantic import SecretStr

    from lotflow.kafka_clients import client_config
    from lotflow.settings import Settings

    for values in (SASL_SSL, SASL_PLAINTEXT):
        data = config_data(render(values))
        env = {k: v for k, v in data.items() if k.startswith("LOTFLOW_KAFKA_")}
        settings = Settings.model_validate({
            k.removeprefix("LOTFLOW_").lower(): v for k, v in env.items()
        } | {"kafka_sasl_username": "u", "kafka_sasl_password": SecretStr("p")})
        config = client_config(settings)
        assert config["security.protocol"] == values["kafka"]["security"]["protocol"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kafka": {"security": {"protocol": "SASL_SSL"}}}, "needs kafka.security.existingSecret"),
        ({"kafka": {"security": {"protocol": "SSL", "caKey": "ca.crt"}}}, "caKey needs kafka.security.existingSecret"),
        ({"kafka": {"security": {"protocol": "SASL_PLAINTEXT", "existingSecret": "s", "caKey": "ca.crt"}}},
         "only used with protocol SSL or SASL_SSL"),
    ],
    ids=["sasl-without-secret", "ca-without-secret", "ca-without-tls"],
)
def test_inconsistent_security_is_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(values)


@pytest.mark.parametrize("security", [{"protocol": "SASL"}, {"mechanism": "GSSAPI"}, {"caMountPath": "etc"},
                                      {"password": "inline"}], ids=["protocol", "mechanism", "mount", "no-inline"])
def test_values_schema_rejects_bad_security(security: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render({"kafka": {"security": security}})


def test_setup_job_can_be_disabled() -> None:
    assert not find(render({"setupJob": {"enabled": False}}), "Job")


# ---------------------------------------------------------------------- monitoring


def test_monitoring_resources() -> None:
    docs = render(MONITORING)

    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["jobLabel"] == "lotflow.io/job"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in find(docs, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in selected} == {f"{RELEASE}-worker", f"{RELEASE}-sink"}

    (rule,) = find(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text(encoding="utf-8"))


def test_alert_rules_cover_the_required_alerts() -> None:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    alerts = {rule["alert"] for rule in rules}
    assert alerts >= REQUIRED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_alerts_and_dashboard_only_use_exposed_metrics() -> None:
    exposed = exposed_metric_names()
    alerts_text = ALERTS.read_text(encoding="utf-8")
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    used = set(re.findall(r"\blotflow_[a-z_]+", alerts_text))
    used |= {name for expr in dashboard_exprs(dashboard) for name in re.findall(r"\blotflow_[a-z_]+", expr)}
    assert used, "no lotflow metric referenced"
    assert sorted(used - exposed) == []


def test_dashboard_configmap() -> None:
    docs = render()
    configmap = one(docs, "ConfigMap", f"{RELEASE}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["lotflow.json"])
    assert dashboard == json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "lotflow-overview"
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert titles >= REQUIRED_PANELS
    assert not find(render({"dashboard": {"enabled": False}}), "ConfigMap", f"{RELEASE}-dashboard")


def test_dashboard_json_is_up_to_date_with_its_generator() -> None:
    script = load_dashboard_script()
    assert script.render() == DASHBOARD.read_text(encoding="utf-8"), (
        "helm/lotflow/files/dashboard.json is stale: run helm/dashboards/lotflow_dashboard.py"
    )


# ---------------------------------------------------------------------- promtool

promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, check=False)


@promtool
def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


@promtool
def test_promtool_test_rules() -> None:
    result = run_promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
