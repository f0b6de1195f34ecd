"""deploy/: every file parsed and validated by a tool that knows its format, plus the contract.

- compose: the Compose specification's JSON schema (vendored, deploy/schemas/), then secrets
  only as ${...} from deploy/.env, the queues of each worker service, Redis' flags, graceful stop.
- Kubernetes: kubernetes-validate (strict, pinned Kubernetes version) for the core kinds; KEDA
  ScaledObjects against the KEDA CRD's openAPIV3Schema (vendored), made strict (no unknown
  field); then queues, grace periods, KEDA list names, PDBs, beat's Recreate, Flower's auth.
- systemd: ``systemd-analyze verify`` in a throw-away root (fake ExecStart binaries, the host's
  unit library) with no warning allowed, and ``systemd-analyze security --offline``.
- Dockerfile: dockerfile-parse; multi-stage, non-root final USER, HEALTHCHECK, no secret ENV.
- Least privilege (issue 16): which service, pod and unit gets which secret, computed from the
  files (compose interpolation, Kubernetes env expansion, systemd EnvironmentFile); the
  NetworkPolicies evaluated by their documented semantics; every Redis template started as a
  real ``redis-server`` that refuses a client without the password; beat and Flower run on
  exactly the variables compose gives them; a real worker binds /metrics where it is told.
No Docker, no cluster, no network beyond this machine.
"""

from __future__ import annotations

import base64
import copy
import functools
import http.server
import io
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import httpx
import jsonschema
import pytest
import redis
import yaml

from tests.conftest import Worker, free_port, moonbatch_cmd

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the manifests promise to run on

SECRET_KEYS = {"MOONDREAM_API_KEY", "MOONBATCH_API_KEY", "FAL_KEY", "MOONBATCH_FAL_KEY",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "FLOWER_BASIC_AUTH", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
               "GF_SECURITY_ADMIN_USER", "GF_SECURITY_ADMIN_PASSWORD", "REDIS_PASSWORD",
               "REDISCLI_AUTH"}
SECRETISH = re.compile(r"KEY|SECRET|PASSW|TOKEN|BASIC_AUTH|CREDENTIAL", re.I)
IO_QUEUE, CONTROL_QUEUE = "moonbatch", "moonbatch-control"
METRICS_PORT = 9808
MULTIPROC_DIR = "/run/moonbatch/metrics"

# Least privilege: what each service reads, worked out from the code. Workers call the
# providers and S3 and talk to the broker; beat only publishes the reconcile task (importing
# workers.app touches neither S3 nor a key: test_beat_and_flower_run_on_what_compose_gives_them);
# Flower reads the broker and FLOWER_BASIC_AUTH (producer/cli/tools.py flower); a producer Job lists
# and plans on S3, enqueues and preflight-checks its provider's key.
BROKER = {"REDIS_PASSWORD"}
WORKER_SECRETS = BROKER | {"MOONDREAM_API_KEY", "FAL_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
COMPOSE_SECRETS = {
    "redis": BROKER,
    "minio": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"},
    "minio-init": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "AWS_ACCESS_KEY_ID",
                   "AWS_SECRET_ACCESS_KEY"},
    "worker-io": WORKER_SECRETS,
    "worker-control": WORKER_SECRETS,
    "beat": BROKER,
    "flower": BROKER | {"FLOWER_BASIC_AUTH"},
    "prometheus": set(),
    "grafana": {"GF_SECURITY_ADMIN_USER", "GF_SECURITY_ADMIN_PASSWORD"},
}
K8S_SECRETS = {
    ("Deployment", "moonbatch-worker-io"): WORKER_SECRETS,
    ("Deployment", "moonbatch-worker-control"): WORKER_SECRETS,
    ("Deployment", "moonbatch-beat"): BROKER,
    ("Deployment", "moonbatch-flower"): BROKER | {"FLOWER_BASIC_AUTH"},
    ("Job", "moonbatch-submit-"): WORKER_SECRETS,
    ("StatefulSet", "redis"): BROKER,
}
BROKER_URLS = {"MOONBATCH_BROKER_URL", "MOONBATCH_RESULT_BACKEND"}  # they carry the password
SYSTEMD_SECRETS = {
    "moonbatch-worker-io.service": BROKER_URLS | WORKER_SECRETS - BROKER,
    "moonbatch-worker-control.service": BROKER_URLS | WORKER_SECRETS - BROKER,
    "moonbatch-beat.service": BROKER_URLS,
    "moonbatch-flower.service": BROKER_URLS | {"FLOWER_BASIC_AUTH"},
}


def queue_of(command: list[str]) -> str:
    """The -Q argument of a celery worker command."""
    assert command[:4] == ["celery", "-A", "moonbatch.workers", "worker"], command
    return command[command.index("-Q") + 1]


def strict(schema):
    """An OpenAPI v3 structural schema as the API server's strict field validation reads it: an
    object with ``properties`` and nothing else said takes no other field."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


# ---------------------------------------------------------------------------------- compose

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def compose_validator():
    import json
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_matches_the_compose_specification(compose, compose_validator):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in compose_validator.iter_errors(compose)]
    assert not errors, errors
    broken = copy.deepcopy(compose)  # the validator bites: a wrong type and an unknown key
    broken["services"]["redis"]["command"] = 5
    broken["services"]["beat"]["stop_grace"] = "5m"
    assert len(list(compose_validator.iter_errors(broken))) == 2


def env_file(path: Path) -> dict[str, str]:
    """The variables of an env file (KEY=value lines; # comments)."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#"))


VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's interpolation: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR?error}`` (KeyError when it would refuse); ``$$`` is a ``$``."""
    def one(match: re.Match) -> str:
        name, op, arg = match.groups()
        value = variables.get(name)
        missing = (not value) if op in (":-", ":?") else value is None
        if op and missing:
            if op.endswith("?"):
                raise KeyError(f"{name}: {arg}")
            return arg
        return value or ""
    return "$".join(VARIABLE.sub(one, part) for part in text.split("$$"))


def strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return []


def compose_secrets(compose: dict, name: str) -> set[str]:
    """The secret variables of deploy/.env that reach service ``name``: interpolated anywhere
    in its definition or in a config it mounts, or handed over by an env_file."""
    service = compose["services"][name]
    texts = strings(service)
    for config in service.get("configs", []):
        source = config if isinstance(config, str) else config["source"]
        texts += strings(compose["configs"][source])
    seen = {m.group(1) for text in texts for m in VARIABLE.finditer(text.replace("$$", ""))}
    for path in service.get("env_file", []):
        path = path if isinstance(path, str) else path["path"]
        example = DEPLOY / (path + ".example")
        seen |= set(env_file(example if example.exists() else DEPLOY / path))
    return seen & SECRET_KEYS


def test_compose_gives_each_service_only_the_secrets_it_uses(compose):
    assert {name: compose_secrets(compose, name) for name in compose["services"]} == COMPOSE_SECRETS
    for name, service in compose["services"].items():  # deploy/.env is Compose's, no container's
        assert "env_file" not in service, name


def test_compose_secrets_are_interpolated_never_written(compose):
    example = env_file(DEPLOY / ".env.example")
    assert set().union(*COMPOSE_SECRETS.values()) <= set(example)
    for key, value in example.items():  # a template: no password or key has a value
        if key in SECRET_KEYS and not key.endswith(("_USER", "_KEY_ID")):
            assert value == "", key
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if key in SECRET_KEYS:  # only ever "${KEY...}", never a value
                assert re.fullmatch(r"\$\{[A-Z_]+(:?[-?][^}]*)?\}", value), (name, key)
                assert value.startswith("${" + key) or key == "REDISCLI_AUTH", (name, key)


def test_compose_broker_requires_the_redis_password(compose):
    """Every moonbatch service's broker URL carries the password of deploy/.env; Redis requires
    it; without REDIS_PASSWORD, compose refuses to start Redis or any moonbatch service."""
    password = secrets.token_hex(16)
    variables = {k: "x" for k in SECRET_KEYS} | {"REDIS_PASSWORD": password}
    services = compose["services"]
    ours = [n for n, s in services.items() if s.get("image", "").startswith("${MOONBATCH_IMAGE")]
    assert set(ours) == {"worker-io", "worker-control", "beat", "flower"}
    for name in ours:
        env = services[name]["environment"]
        assert interpolate(env["MOONBATCH_BROKER_URL"], variables) == \
            f"redis://:{password}@redis:6379/0", name
        assert interpolate(env["MOONBATCH_RESULT_BACKEND"], variables) == \
            f"redis://:{password}@redis:6379/1", name
        with pytest.raises(KeyError, match="REDIS_PASSWORD"):
            interpolate(env["MOONBATCH_BROKER_URL"], {})
    (config,) = services["redis"]["configs"]
    content = compose["configs"][config["source"]]["content"]
    assert interpolate(content, variables).split() == ["requirepass", password]
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        interpolate(content, {})
    assert services["redis"]["command"][1] == config["target"]  # redis-server CONFIG flags...


def test_compose_workers_queues_and_graceful_stop(compose):
    services = compose["services"]
    io_, control = services["worker-io"], services["worker-control"]
    assert io_["command"] == ["celery", "-A", "moonbatch.workers", "worker", "-Q", IO_QUEUE, "--concurrency",
                              "4", "--loglevel", "INFO"]
    assert queue_of(control["command"]) == CONTROL_QUEUE
    assert control["command"][control["command"].index("--concurrency") + 1] == "8"
    for worker in (io_, control):
        env = worker["environment"]
        assert env["MOONBATCH_QUEUE"] == IO_QUEUE and env["MOONBATCH_CONTROL_QUEUE"] == CONTROL_QUEUE
        assert env["MOONBATCH_METRICS_PORT"] == str(METRICS_PORT)
        assert env["MOONBATCH_LOG_FORMAT"] == "json"
        assert env["PROMETHEUS_MULTIPROC_DIR"] == MULTIPROC_DIR
        assert any(t.startswith(MULTIPROC_DIR + ":") for t in worker["tmpfs"])
        assert worker["stop_signal"] == "SIGTERM" and "entrypoint" not in worker  # tini's
        minutes = int(worker["stop_grace_period"].rstrip("m"))
        assert worker["stop_grace_period"].endswith("m") and minutes >= 5
        assert "deploy" not in worker and "container_name" not in worker  # --scale works
    assert services["beat"]["command"][:4] == ["celery", "-A", "moonbatch.workers", "beat"]
    assert services["beat"]["deploy"]["replicas"] == 1
    flower = services["flower"]
    assert flower["command"] == ["moonbatch", "flower", "--address", "0.0.0.0", "--port", "5555"]
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])
    for name, service in services.items():  # nothing but on localhost
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_compose_redis_minio_prometheus_grafana(compose):
    services = compose["services"]
    redis = services["redis"]["command"]
    assert redis[0] == "redis-server"
    assert redis[redis.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert "redis-data:/data" in services["redis"]["volumes"] and "redis-data" in compose["volumes"]
    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing" in init["command"][0]
    assert services["worker-io"]["depends_on"]["minio-init"]["condition"] == \
        "service_completed_successfully"
    assert services["worker-io"]["depends_on"]["redis"]["condition"] == "service_healthy"

    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    scraped = {}
    for job in prometheus["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                scraped[name] = sd["port"]
    assert scraped == {"worker-io": METRICS_PORT, "worker-control": METRICS_PORT}
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in \
        services["prometheus"]["volumes"]

    grafana = services["grafana"]["volumes"]
    dashboards = next(v.split(":")[1] for v in grafana if v.startswith("./grafana:"))
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/moonbatch.yml").read_text())
    assert provider["apiVersion"] == 1
    assert [p["options"]["path"] for p in provider["providers"]] == [dashboards]
    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"


# ------------------------------------------------------------------------------- Kubernetes

@functools.cache
def _k8s_parsed() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s_documents() -> list[tuple[str, dict]]:
    """Every document of deploy/k8s/ (a copy: a test may change it)."""
    return copy.deepcopy(_k8s_parsed())


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"].get("name") or d["metadata"]["generateName"]: d
            for _, d in k8s_documents() if d["kind"] == kind}


def test_k8s_core_kinds_are_valid_for_kubernetes():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = set()
    for name, doc in k8s_documents():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} {doc['kind']}: {exc.message} at {list(exc.path)}")
        checked.add(doc["kind"])
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "moonbatch", name
    assert checked >= {"Namespace", "ConfigMap", "Secret", "Deployment", "Service",
                       "PodDisruptionBudget", "Job", "NetworkPolicy", "StatefulSet"}
    broken = copy.deepcopy(by_kind("Deployment")["moonbatch-beat"])
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_keda_scaled_objects_match_the_keda_crd():
    crd = yaml.safe_load((SCHEMAS / "keda.sh_scaledobjects.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    validator = jsonschema.Draft7Validator(schema)
    scaled = by_kind("ScaledObject")
    assert set(scaled) == {"moonbatch-worker-io", "moonbatch-worker-control"}
    for name, doc in scaled.items():
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(doc)]
        assert not errors, (name, errors)
    broken = copy.deepcopy(scaled["moonbatch-worker-io"])
    broken["spec"]["minReplicas"] = 1  # HPA's name, not KEDA's: unknown field
    assert list(validator.iter_errors(broken))


def test_k8s_workers_queues_grace_metrics_and_scaling():
    config = by_kind("ConfigMap")["moonbatch-config"]["data"]
    assert not SECRET_KEYS & set(config)
    assert config["MOONBATCH_QUEUE"] == IO_QUEUE and config["MOONBATCH_CONTROL_QUEUE"] == CONTROL_QUEUE
    assert config["MOONBATCH_METRICS_PORT"] == str(METRICS_PORT)
    assert config["MOONBATCH_LOG_FORMAT"] == "json"
    deployments, scaled = by_kind("Deployment"), by_kind("ScaledObject")
    pdbs = by_kind("PodDisruptionBudget")
    for name, queue, concurrency in (("moonbatch-worker-io", IO_QUEUE, "4"),
                                     ("moonbatch-worker-control", CONTROL_QUEUE, "8")):
        pod = deployments[name]["spec"]["template"]
        spec = pod["spec"]
        (container,) = spec["containers"]
        assert queue_of(container["args"]) == queue
        assert container["args"][container["args"].index("--concurrency") + 1] == concurrency
        assert spec["terminationGracePeriodSeconds"] >= 600
        assert "lifecycle" not in container  # warm shutdown on SIGTERM, no preStop
        assert "replicas" not in deployments[name]["spec"]  # KEDA owns it
        assert {"requests", "limits"} <= set(container["resources"])
        assert {c for r in container["resources"].values() for c in r} == {"cpu", "memory"}
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["PROMETHEUS_MULTIPROC_DIR"] == MULTIPROC_DIR
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == MULTIPROC_DIR)
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert "emptyDir" in volume
        assert [p["containerPort"] for p in container["ports"]] == [METRICS_PORT]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
        assert container["envFrom"] == [{"configMapRef": {"name": "moonbatch-config"}}]
        assert spec["securityContext"]["runAsNonRoot"] is True

        trigger = scaled[name]["spec"]["triggers"][0]
        assert scaled[name]["spec"]["scaleTargetRef"]["name"] == name
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == queue
        assert trigger["metadata"]["addressFromEnv"] in config
        broker = next(e["value"] for e in container["env"] if e["name"] == "MOONBATCH_BROKER_URL")
        assert broker.endswith(f"@$({trigger['metadata']['addressFromEnv']})/"
                               f"{trigger['metadata']['databaseIndex']}")

        labels = pod["metadata"]["labels"]
        pdb = pdbs[name]["spec"]
        assert pdb["selector"]["matchLabels"].items() <= labels.items()
    metrics = by_kind("Service")["moonbatch-worker-metrics"]["spec"]
    assert metrics["ports"][0]["port"] == METRICS_PORT
    for name in ("moonbatch-worker-io", "moonbatch-worker-control"):
        assert metrics["selector"].items() <= \
            deployments[name]["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_beat_flower_secret_and_producer():
    deployments = by_kind("Deployment")
    beat = deployments["moonbatch-beat"]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"] == {"type": "Recreate"}
    beat_args = beat["template"]["spec"]["containers"][0]["args"]
    assert beat_args[:4] == ["celery", "-A", "moonbatch.workers", "beat"]

    flower = deployments["moonbatch-flower"]["spec"]["template"]
    (container,) = flower["spec"]["containers"]
    assert container["args"] == ["moonbatch", "flower", "--address", "0.0.0.0", "--port", "5555"]
    auth = next(e for e in container["env"] if e["name"] == "FLOWER_BASIC_AUTH")
    assert auth["valueFrom"]["secretKeyRef"] == {"name": "moonbatch-flower", "key": "FLOWER_BASIC_AUTH"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthcheck"
    service = by_kind("Service")["moonbatch-flower"]["spec"]
    assert service["type"] == "ClusterIP"
    assert service["selector"].items() <= flower["metadata"]["labels"].items()

    stored = {name: set(doc["stringData"]) for name, doc in by_kind("Secret").items()}
    assert stored == {"moonbatch-redis": {"REDIS_PASSWORD"}, "moonbatch-flower": {"FLOWER_BASIC_AUTH"},
                      "moonbatch-workers": {"MOONDREAM_API_KEY", "FAL_KEY", "AWS_ACCESS_KEY_ID",
                                            "AWS_SECRET_ACCESS_KEY"}}
    for name, doc in k8s_documents():  # no secret value written into any manifest
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            for env in container.get("env", []):
                assert (env["name"] not in SECRET_KEYS or "value" not in env  # or $(A_SECRET)
                        or re.fullmatch(r"\$\([A-Z_]+\)", env["value"])), (name, env["name"])

    (job,) = by_kind("Job").values()
    (submit,) = job["spec"]["template"]["spec"]["containers"]
    assert submit["args"][:2] == ["moonbatch", "submit"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    numbered = sorted(p.name for p in K8S.glob("[0-9][0-9]-*.yaml"))
    assert kustomization["resources"] == numbered  # apply order = file order


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_k8s_kustomization_renders():
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                              timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered.stdout) if d]
    assert sorted(kinds) == sorted(d["kind"] for n, d in k8s_documents() if n[0].isdigit())


# --------------------------------------------------------------- Kubernetes: least privilege

def pod_templates() -> dict[tuple[str, str], dict]:
    """(kind, name) → the pod template of every workload in deploy/k8s/."""
    out = {}
    for _, doc in k8s_documents():
        if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            name = doc["metadata"].get("name") or doc["metadata"]["generateName"]
            out[(doc["kind"], name)] = doc["spec"]["template"]
    return out


def pod_secret_keys(pod: dict) -> set[tuple[str, str]]:
    """(Secret, key) pairs a pod's containers can read: envFrom secretRef (every key of that
    Secret), env secretKeyRef, and secret volumes."""
    stored = {name: set(doc.get("stringData", {})) | set(doc.get("data", {}))
              for name, doc in by_kind("Secret").items()}
    spec = pod["spec"]
    keys: set[tuple[str, str]] = set()
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                name = source["secretRef"]["name"]
                keys |= {(name, key) for key in stored[name]}
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                keys.add((ref["name"], ref["key"]))
    for volume in spec.get("volumes", []):
        sources = [volume] + volume.get("projected", {}).get("sources", [])
        for source in sources:
            secret = source.get("secret")
            if secret:
                name = secret.get("secretName") or secret["name"]
                keys |= {(name, key) for key in stored[name]}
    return keys


def container_env(container: dict, secret_values: dict[tuple[str, str], str]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom first, then env in order,
    ``$(VAR)`` expanded from what is defined so far."""
    configmaps = {name: doc["data"] for name, doc in by_kind("ConfigMap").items()}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
        if "secretRef" in source:
            name = source["secretRef"]["name"]
            env.update({k: v for (s, k), v in secret_values.items() if s == name})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                       lambda m: env.get(m.group(1), m.group(0)), item["value"])
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret_values[(ref["name"], ref["key"])]
    return env


def test_k8s_gives_each_pod_only_the_secret_keys_it_uses():
    pods = pod_templates()
    got = {ident: {key for _, key in pod_secret_keys(pod)} for ident, pod in pods.items()}
    assert got == K8S_SECRETS
    stored = {name: set(doc["stringData"]) for name, doc in by_kind("Secret").items()}
    for ident, pod in pods.items():  # every reference names a key the templates define
        for name, key in pod_secret_keys(pod):
            assert key in stored.get(name, set()), (ident, name, key)
    # Secrets split by who needs them: whoever reads one Secret object (KEDA, Redis) sees
    # nothing but the Redis password.
    holders = {key: name for name, keys in stored.items() for key in keys}
    assert {holders[k] for k in BROKER} == {"moonbatch-redis"} and stored["moonbatch-redis"] == BROKER
    assert stored["moonbatch-flower"] == {"FLOWER_BASIC_AUTH"}
    assert all(re.fullmatch(r"<[^<>]+>(:<[^<>]+>)?", value)
               for doc in by_kind("Secret").values() for value in doc["stringData"].values())


def test_k8s_broker_urls_carry_the_password_from_the_secret():
    password = secrets.token_hex(16)
    values = {("moonbatch-redis", "REDIS_PASSWORD"): password}
    values |= {(name, key): f"<{key}>" for (_, _), pod in pod_templates().items()
               for name, key in pod_secret_keys(pod) if key != "REDIS_PASSWORD"}
    config = by_kind("ConfigMap")["moonbatch-config"]["data"]
    address = config["MOONBATCH_REDIS_ADDRESS"]
    assert not BROKER_URLS & set(config)  # never in the ConfigMap
    assert not any(password in v or "@" in v for v in config.values())
    for (_, name), pod in pod_templates().items():
        if name == "redis":
            continue
        (container,) = pod["spec"]["containers"]
        env = container_env(container, values)
        assert env["MOONBATCH_BROKER_URL"] == f"redis://:{password}@{address}/0", name
        assert env["MOONBATCH_RESULT_BACKEND"] == f"redis://:{password}@{address}/1", name
        for item in container.get("env", []):  # no value written into a manifest
            assert password not in item.get("value", "")


def test_keda_authenticates_to_redis_from_the_secret():
    auths = by_kind("TriggerAuthentication")
    # The shape KEDA's CRD (keda.sh_triggerauthentications.yaml, v1alpha1) gives
    # spec.secretTargetRef: a list of {parameter, name, key}, all three required.
    for name, auth in auths.items():
        assert auth["apiVersion"] == "keda.sh/v1alpha1" and set(auth) == {
            "apiVersion", "kind", "metadata", "spec"}, name
        assert set(auth["spec"]) == {"secretTargetRef"}, name
        for ref in auth["spec"]["secretTargetRef"]:
            assert set(ref) == {"parameter", "name", "key"}, ref
    for name, scaled in by_kind("ScaledObject").items():
        (trigger,) = scaled["spec"]["triggers"]
        auth = auths[trigger["authenticationRef"]["name"]]
        assert auth["spec"]["secretTargetRef"] == [
            {"parameter": "password", "name": "moonbatch-redis", "key": "REDIS_PASSWORD"}], name


class Endpoint(NamedTuple):
    """One end of a connection: a pod (namespace, labels, named container ports) or, with
    namespace None, an address outside the cluster."""
    namespace: str | None
    labels: dict[str, str]
    ports: dict[str, int] = {}
    ip: str = ""


def outside(ip: str) -> Endpoint:
    return Endpoint(None, {}, {}, ip)


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions) matches ``labels``; {} matches all."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        if ((op == "In" and labels.get(key) not in values)
                or (op == "NotIn" and key in labels and labels[key] in values)
                or (op == "Exists" and key not in labels)
                or (op == "DoesNotExist" and key in labels)):
            return False
    return True


def peer_matches(peer: dict, policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:  # addresses outside the cluster (pod IPs in ipBlocks: CNI-defined)
        if other.namespace is not None:
            return False
        address = ipaddress.ip_address(other.ip)
        cidr = ipaddress.ip_network(peer["ipBlock"]["cidr"])
        return (address.version == cidr.version and address in cidr
                and not any(address in ipaddress.ip_network(x)
                            for x in peer["ipBlock"].get("except", [])
                            if ipaddress.ip_network(x).version == address.version))
    if other.namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": other.namespace}):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector", {}), other.labels)


def port_matches(ports: list[dict] | None, port: int, protocol: str, destination: Endpoint) -> bool:
    if not ports:
        return True
    for item in ports:
        if item.get("protocol", "TCP") != protocol:
            continue
        if "port" not in item:
            return True
        want = item["port"]
        want = destination.ports.get(want) if isinstance(want, str) else want
        if want is not None and want <= port <= item.get("endPort", want):
            return True
    return False


def direction_allows(policies: list[dict], kind: str, pod: Endpoint, other: Endpoint, port: int,
                     protocol: str, destination: Endpoint) -> bool:
    """Whether ``pod``'s policies of ``kind`` (Ingress, Egress) let the connection through: a pod
    no policy selects for that direction is open; otherwise any rule of any selecting policy."""
    if pod.namespace is None:
        return True
    chosen = [p for p in policies if p["metadata"]["namespace"] == pod.namespace
              and selects(p["spec"]["podSelector"], pod.labels)
              and kind in p["spec"].get("policyTypes", ["Ingress"] + (["Egress"] if "egress" in
                                                                         p["spec"] else []))]
    if not chosen:
        return True
    rules, peers = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    return any((not rule.get(peers) or any(peer_matches(peer, pod.namespace, other)
                                           for peer in rule[peers]))
               and port_matches(rule.get("ports"), port, protocol, destination)
               for policy in chosen for rule in policy["spec"].get(rules, []))


def connects(source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """networking.k8s.io/v1 NetworkPolicy semantics over deploy/k8s/: the source's egress and
    the destination's ingress must both allow the connection."""
    policies = [d for _, d in k8s_documents() if d["kind"] == "NetworkPolicy"]
    return (direction_allows(policies, "Egress", source, destination, port, protocol, destination)
            and direction_allows(policies, "Ingress", destination, source, port, protocol,
                                 destination))


# Documented in 40-networkpolicy.yaml and README: Prometheus runs in namespace "monitoring" with
# app.kubernetes.io/name=prometheus; KEDA's operator in "keda"; DNS is kube-system's kube-dns.
PROMETHEUS = Endpoint("monitoring", {"app.kubernetes.io/name": "prometheus"})
KEDA = Endpoint("keda", {"app.kubernetes.io/name": "keda-operator"})
KUBE_DNS = Endpoint("kube-system", {"k8s-app": "kube-dns"})


def pod_endpoint(kind: str, name: str) -> Endpoint:
    pod = pod_templates()[(kind, name)]
    ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"]
             for p in c.get("ports", []) if "name" in p}
    return Endpoint("moonbatch", pod["metadata"]["labels"], ports)


def test_k8s_network_policies_let_only_moonbatch_reach_redis_and_prometheus_the_metrics():
    io_, control = (pod_endpoint("Deployment", f"moonbatch-worker-{q}") for q in ("io", "control"))
    beat, flower = pod_endpoint("Deployment", "moonbatch-beat"), pod_endpoint("Deployment",
                                                                               "moonbatch-flower")
    job, redis_pod = pod_endpoint("Job", "moonbatch-submit-"), pod_endpoint("StatefulSet", "redis")
    intruder = Endpoint("moonbatch", {"app": "debug-shell"})  # a pod someone added
    lookalike = Endpoint("default", dict(io_.labels))  # our labels, another namespace
    fake_prometheus = Endpoint("default", dict(PROMETHEUS.labels))
    clients = (io_, control, beat, flower, job)

    for client in clients + (KEDA,):  # the broker: moonbatch's pods and KEDA's scaler
        assert connects(client, redis_pod, 6379), client.labels
    for other in (intruder, lookalike, PROMETHEUS, fake_prometheus):
        assert not connects(other, redis_pod, 6379), other
    for worker in (io_, control):  # metrics: Prometheus, on the metrics port only
        assert connects(PROMETHEUS, worker, METRICS_PORT)
        for other in (intruder, lookalike, fake_prometheus, flower, beat, KEDA):
            assert not connects(other, worker, METRICS_PORT), other
        assert not connects(PROMETHEUS, worker, 6379) and not connects(PROMETHEUS, worker, 5555)
    assert connects(PROMETHEUS, flower, 5555)  # Flower's own /metrics
    assert not connects(intruder, flower, 5555) and not connects(lookalike, flower, 5555)
    for pod in clients + (redis_pod, intruder):  # nothing else reaches anything of ours
        assert not connects(intruder, pod, 8080)

    s3, api = outside("52.216.8.1"), outside("2606:4700::6810:84e5")  # public v4 and v6
    for pod in (io_, control, job):  # S3 and the APIs, over HTTPS (and HTTP image URLs)
        assert connects(pod, s3, 443) and connects(pod, api, 443) and connects(pod, s3, 80)
    for pod in clients:
        assert connects(pod, KUBE_DNS, 53, "UDP") and connects(pod, KUBE_DNS, 53, "TCP")
        for internal in ("10.0.3.7", "172.20.0.5", "192.168.1.1", "169.254.169.254", "127.0.0.1",
                         "100.64.0.1", "fd00::1", "fe80::1"):
            assert not connects(pod, outside(internal), 443), internal  # no internal service
            assert not connects(pod, outside(internal), 80), internal  # nor the metadata API
        assert not connects(pod, intruder, 8080) and not connects(pod, PROMETHEUS, 9090)
    for pod in (beat, flower, redis_pod):  # these talk to nothing outside
        assert not connects(pod, s3, 443)


# ---------------------------------------------------------------------------------- systemd

UNITS = sorted(p.name for p in SYSTEMD.glob("*.service"))


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_units_say_what_an_operator_needs():
    assert UNITS == ["moonbatch-beat.service", "moonbatch-flower.service",
                     "moonbatch-worker-control.service", "moonbatch-worker-io.service"]
    for name in UNITS:
        s = unit_settings(name)
        assert s["EnvironmentFile"][:2] == ["/etc/moonbatch/moonbatch.env",
                                            "/etc/moonbatch/broker.env"], name
        assert s["User"] == ["moonbatch"] or s["DynamicUser"] == ["yes"], name
        assert s["KillSignal"] == ["SIGTERM"], name
        assert s["Restart"] == ["on-failure"], name
        assert s["NoNewPrivileges"] == ["yes"] and s["ProtectSystem"] == ["strict"], name
        assert not any(SECRETISH.search(v) for v in s.get("Environment", [])), name
    for name, queue_var, queue in (("moonbatch-worker-io.service", "MOONBATCH_QUEUE", IO_QUEUE),
                                   ("moonbatch-worker-control.service", "MOONBATCH_CONTROL_QUEUE",
                                    CONTROL_QUEUE)):
        s = unit_settings(name)
        assert s["TimeoutStopSec"] == ["600"], name
        assert f"-Q ${{{queue_var}}}" in s["ExecStart"][0]
        assert f"{queue_var}={queue}" in " ".join(s["Environment"])
        assert "PROMETHEUS_MULTIPROC_DIR=%t/" in " ".join(s["Environment"])
    assert "moonbatch flower --address" in unit_settings("moonbatch-flower.service")["ExecStart"][0]
    assert "beat" in unit_settings("moonbatch-beat.service")["ExecStart"][0]
    assert (SYSTEMD / "moonbatch.sysusers.conf").read_text().count("\nu moonbatch ") == 1


def unit_environment_files(name: str) -> list[Path]:
    """The example files of deploy/systemd/ behind a unit's EnvironmentFile= lines
    (/etc/moonbatch/X.env is installed from X.env.example); a missing one fails."""
    files = []
    for path in unit_settings(name)["EnvironmentFile"]:
        assert path.startswith("/etc/moonbatch/") and not path.startswith("-"), (name, path)
        example = SYSTEMD / (Path(path).name + ".example")
        assert example.exists(), f"{name}: {path} has no {example.name}"
        files.append(example)
    return files


def secret_variables(variables: dict[str, str]) -> set[str]:
    """The secret ones: keys, passwords, and Redis URLs (they carry the password)."""
    return {k for k, v in variables.items() if k in SECRET_KEYS or v.startswith("redis")}


def test_systemd_units_get_only_the_secrets_they_use():
    got = {name: set().union(*(secret_variables(env_file(f)) for f in unit_environment_files(name)))
           for name in UNITS}
    assert got == SYSTEMD_SECRETS
    for name in UNITS:  # the unit files themselves hold no secret
        text = (SYSTEMD / name).read_text()
        assert not re.search(r"redis://[^\s]*@", text), name
        for value in unit_settings(name).get("Environment", []):
            assert not any(SECRETISH.search(v.split("=")[0]) or "redis" in v.split("=", 1)[-1]
                           for v in value.split()), (name, value)
    settings = env_file(SYSTEMD / "moonbatch.env.example")  # shared, not secret
    assert settings and not secret_variables(settings)
    for example in SYSTEMD.glob("*.env.example"):
        for key, value in env_file(example).items():  # placeholders only
            assert key not in SECRET_KEYS or value == "", (example.name, key)
            if key in BROKER_URLS:
                assert re.fullmatch(r"redis://:<redis-password>@[\w.-]+:\d+/\d", value), value
    # beat and Flower run as users of their own: a Flower (web-facing) or beat that is taken
    # over cannot read a worker's /proc/PID/environ (the keys): ProtectProc hides other users.
    for name in ("moonbatch-beat.service", "moonbatch-flower.service"):
        assert unit_settings(name).get("DynamicUser") == ["yes"], name
        assert unit_settings(name).get("User") != ["moonbatch"], name
    for name in ("moonbatch-worker-io.service", "moonbatch-worker-control.service"):
        assert "MOONBATCH_METRICS_ADDRESS=127.0.0.1" in " ".join(unit_settings(name)["Environment"])


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    """A root for ``systemd-analyze --root``: the host's unit library (so sysinit.target and
    friends exist), the units under /etc/systemd/system, and a stand-in for every ExecStart
    binary (the venv does not exist here; verify checks that it is executable)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    library = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                    if (p / "sysinit.target").exists()), None)
    if library is None:
        pytest.skip("no systemd unit library (sysinit.target) on this machine")
    root = tmp_path_factory.mktemp("systemd-root")
    shutil.copytree(library, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in UNITS:
        shutil.copy(SYSTEMD / name, root / "etc/systemd/system" / name)
        binary = root / unit_settings(name)["ExecStart"][0].split()[0].lstrip("/")
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
    return root


def analyze(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", *args, "--man=no", f"--root={root}"],
                          capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verify(fake_root):
    result = analyze(fake_root, "verify", *UNITS)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    # The check bites: an unknown key is only a warning, which this test treats as a failure.
    bad = fake_root / "etc/systemd/system/moonbatch-typo.service"
    bad.write_text((SYSTEMD / UNITS[0]).read_text().replace("KillSignal=", "KillSignl="))
    try:
        result = analyze(fake_root, "verify", bad.name)
        assert "Unknown key" in result.stderr
    finally:
        bad.unlink()


def test_systemd_analyze_security(fake_root):
    probe = analyze(fake_root, "security", "--offline=true", UNITS[0])
    if "--offline" in probe.stderr and probe.returncode != 0:
        pytest.skip(f"systemd-analyze security has no --offline here: {probe.stderr.strip()}")
    for name in UNITS:  # exposure at most 2.5 of 10 ("OK")
        result = analyze(fake_root, "security", "--offline=true", "--threshold=25", name)
        assert result.returncode == 0, (name, result.stdout[-400:], result.stderr)


# ------------------------------------------------------------------------------- Dockerfile

@pytest.fixture(scope="module")
def dockerfile():
    dockerfile_parse = pytest.importorskip("dockerfile_parse")
    return dockerfile_parse.DockerfileParser(
        fileobj=io.BytesIO((DEPLOY / "Dockerfile").read_bytes()))


def stages(parser) -> list[list[dict]]:
    out: list[list[dict]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(instruction)
    return out


def test_dockerfile(dockerfile):
    assert dockerfile.is_multistage
    assert dockerfile.parent_images == ["python:3.11-slim", "python:3.11-slim"]
    builder, runtime = stages(dockerfile)
    assert builder[0]["value"].endswith("AS builder")
    assert any("pip wheel" in i["value"] for i in builder if i["instruction"] == "RUN")
    assert any("from=builder" in i["value"] and "--no-index" in i["value"]
               for i in runtime if i["instruction"] == "RUN")  # installs the builder's wheels
    users = [i["value"] for i in runtime if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0].isdigit()  # numeric: Kubernetes' runAsNonRoot can check it
    health = [i["value"] for i in runtime if i["instruction"] == "HEALTHCHECK"]
    assert health and "CMD" in health[-1] and "NONE" not in health[-1]
    cmd = [i["value"] for i in runtime if i["instruction"] == "CMD"][-1]
    # The image alone runs a worker of both fleet queues (no -Q); deployments split them.
    assert yaml.safe_load(cmd) == ["celery", "-A", "moonbatch.workers", "worker", "--concurrency", "4",
                                   "--loglevel", "INFO"]
    assert "tini" in [i["value"] for i in runtime if i["instruction"] == "ENTRYPOINT"][-1]
    for instruction in dockerfile.structure:  # no secret baked in
        if instruction["instruction"] in ("ENV", "ARG", "LABEL"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", instruction["value"])
            assert not [n for n in names if SECRETISH.search(n)], instruction["content"]
    assert not set(dockerfile.envs) & SECRET_KEYS


def test_dockerignore_sends_what_the_dockerfile_copies(dockerfile):
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines()
             if r and not r.startswith("#")]
    assert rules[0] == "*" and "**/.env" in rules
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for instruction in dockerfile.structure:
        if instruction["instruction"] != "COPY" or "--from" in instruction["value"]:
            continue
        sources = [w for w in instruction["value"].split() if not w.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


def test_entrypoint_and_healthcheck_scripts(tmp_path, broker):
    entrypoint = DEPLOY / "docker-entrypoint.sh"
    multiproc = tmp_path / "metrics"
    multiproc.mkdir()
    (multiproc / "counter_123.db").write_bytes(b"stale")
    out = subprocess.run(["sh", str(entrypoint), "echo", "ran"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PROMETHEUS_MULTIPROC_DIR": str(multiproc)},
                         timeout=10)
    assert out.returncode == 0 and out.stdout == "ran\n" and not list(multiproc.iterdir())

    script = [sys.executable, str(DEPLOY / "healthcheck.py")]

    def health(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([*script, *args], capture_output=True, text=True, timeout=20,
                              env={"PATH": "/usr/bin:/bin", **env})

    assert health(MOONBATCH_BROKER_URL=broker.url(0)).returncode == 0
    down = health(MOONBATCH_BROKER_URL="redis://127.0.0.1:1/0")
    assert down.returncode == 1 and "broker unreachable" in down.stderr

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(200 if self.path == "/healthcheck" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert health("--http", url + "/healthcheck", FLOWER_BASIC_AUTH="u:p").returncode == 0
        assert seen == ["Basic " + base64.b64encode(b"u:p").decode()]
        assert health("--http", url + "/nope").returncode == 1
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------- least privilege, over real processes

def redis_binaries() -> tuple[str, str | None]:
    """``redis-server`` (conftest's choice) and the ``redis-cli`` beside it or on PATH."""
    from moonbatch.workers.embedded import find_redis_server

    server = find_redis_server()
    if server is None:
        pytest.skip("no redis-server")
    cli = Path(server).parent / "redis-cli"
    return server, str(cli) if cli.exists() else shutil.which("redis-cli")


def redis_reply(port: int, command: bytes = b"PING\r\n") -> bytes:
    """Redis' first reply line to ``command`` sent without a password (raw protocol, no client
    library retries); b"" when nothing listens."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(command)
            return s.recv(200).split(b"\r\n")[0]
    except OSError:
        return b""


def wait_for_redis(proc: subprocess.Popen, port: int, log: Path) -> None:
    """Until ``redis-server`` on ``port`` answers at all (NOAUTH is an answer)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"redis-server exited {proc.returncode}: {log.read_text()[-800:]}")
        if redis_reply(port):
            return
        time.sleep(0.1)
    raise AssertionError(f"redis-server did not answer on {port}: {log.read_text()[-800:]}")


def assert_requires_password(port: int, password: str) -> redis.Redis:
    """A client without the password is refused; the URL with it is served. Returns the
    authenticated client."""
    assert redis_reply(port).startswith(b"-NOAUTH")
    assert redis_reply(port, b"SET k v\r\n").startswith(b"-NOAUTH")
    with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
        redis.Redis.from_url(f"redis://:wrong-{password}@127.0.0.1:{port}/0").ping()
    client = redis.Redis.from_url(f"redis://:{password}@127.0.0.1:{port}/0")
    assert client.ping()
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    assert client.config_get("appendonly")["appendonly"] == "yes"
    return client


def start_compose_redis(compose: dict, tmp_path: Path, password: str
                        ) -> tuple[subprocess.Popen, int]:
    """deploy/docker-compose.yml's redis service as a real redis-server: its config (the
    requirepass of deploy/.env) and its command line, on a free local port."""
    server, _ = redis_binaries()
    service = compose["services"]["redis"]
    (config,) = service["configs"]
    conf = tmp_path / "redis-auth.conf"
    conf.write_text(interpolate(compose["configs"][config["source"]]["content"],
                                {"REDIS_PASSWORD": password}))
    command = [interpolate(a, {}) for a in service["command"]]
    assert command[0] == "redis-server" and command[1] == config["target"]
    port, log = free_port(), tmp_path / "redis.log"
    (tmp_path / "redis-data").mkdir()
    proc = subprocess.Popen([server, str(conf), *command[2:], "--port", str(port), "--bind",
                             "127.0.0.1", "--dir", str(tmp_path / "redis-data"), "--save", ""],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_for_redis(proc, port, log)
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_compose_redis_requires_the_password_and_its_healthcheck_knows_it(compose, tmp_path):
    password = secrets.token_hex(16)
    proc, port = start_compose_redis(compose, tmp_path, password)
    try:
        assert_requires_password(port, password)
        _, cli = redis_binaries()
        if cli is None:
            pytest.skip("no redis-cli for the healthcheck")
        service = compose["services"]["redis"]
        kind, script = service["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        script = interpolate(script, {}).replace("redis-cli", f"{cli} -p {port}")
        env = {k: interpolate(v, {"REDIS_PASSWORD": password})
               for k, v in service["environment"].items()}

        def healthy(**extra: str) -> bool:
            return subprocess.run(["sh", "-c", script], env={"PATH": "/usr/bin:/bin", **extra},
                                  capture_output=True, timeout=20).returncode == 0
        assert healthy(**env)
        assert not healthy()  # a plain `redis-cli ping` says NOAUTH: not healthy
        assert not healthy(REDISCLI_AUTH="wrong")
    finally:
        stop(proc)


def test_k8s_redis_example_requires_the_password(tmp_path):
    """The StatefulSet of redis.example.yaml: its own shell command (requirepass on stdin, not
    on the command line), run with the environment the kubelet would give it."""
    server, cli = redis_binaries()
    pod = pod_templates()[("StatefulSet", "redis")]
    (container,) = pod["spec"]["containers"]
    password = secrets.token_hex(16)
    env = container_env(container, {("moonbatch-redis", "REDIS_PASSWORD"): password})
    port, log, data = free_port(), tmp_path / "redis.log", tmp_path / "data"
    data.mkdir()
    bindir = tmp_path / "bin"  # the image's binaries, on a local port and directory
    bindir.mkdir()
    (bindir / "redis-server").write_text(
        f'#!/bin/sh\nexec {server} "$@" --port {port} --bind 127.0.0.1 --save ""\n')
    (bindir / "redis-cli").write_text(f'#!/bin/sh\nexec {cli} -p {port} "$@"\n')
    for exe in bindir.iterdir():
        exe.chmod(0o755)
    path = f"{bindir}:/usr/bin:/bin"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "data")
    assert container["workingDir"] == mount["mountPath"]  # data: the persistent volume
    proc = subprocess.Popen(container["command"] + container.get("args", []), cwd=data,
                            env={**env, "PATH": path}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    try:
        wait_for_redis(proc, port, log)
        assert_requires_password(port, password)
        assert password not in " ".join(container["command"] + container.get("args", []))
        probe = container["readinessProbe"]["exec"]["command"]
        if cli is not None:
            run = subprocess.run(probe, env={**env, "PATH": path}, capture_output=True, timeout=20)
            assert run.returncode == 0, run
            bad = subprocess.run(probe, env={**env, "PATH": path, "REDISCLI_AUTH": "wrong"},
                                 capture_output=True, timeout=20)
            assert bad.returncode != 0
    finally:
        stop(proc)


def test_systemd_redis_config_requires_the_password(tmp_path):
    """deploy/systemd/redis-moonbatch.conf (included from the distribution's redis.conf):
    Redis refuses to start until its requirepass line is completed, then requires it."""
    server, _ = redis_binaries()
    template = (SYSTEMD / "redis-moonbatch.conf").read_text()
    assert re.search(r"^requirepass$", template, re.M)  # left for the operator to complete
    port, data = free_port(), tmp_path / "data"
    data.mkdir()
    local = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", ""]
    (tmp_path / "as-shipped.conf").write_text(template)
    refused = subprocess.run([server, str(tmp_path / "as-shipped.conf"), *local],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "requirepass" in refused.stdout + refused.stderr
    password = secrets.token_hex(16)
    conf = tmp_path / "moonbatch.conf"
    conf.write_text(re.sub(r"^requirepass$", f"requirepass {password}", template, flags=re.M))
    log = tmp_path / "redis.log"
    proc = subprocess.Popen([server, str(conf), *local], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    try:
        wait_for_redis(proc, port, log)
        assert_requires_password(port, password)
    finally:
        stop(proc)


def process_env(tmp_path: Path, variables: dict[str, str]) -> dict[str, str]:
    """Exactly ``variables`` plus what runs Python here (PATH, PYTHONPATH, a HOME of its own):
    no AWS credentials, no key, nothing else inherited."""
    keep = {k: os.environ[k] for k in ("PATH", "PYTHONPATH", "LANG") if k in os.environ}
    return {**keep, "HOME": str(tmp_path), **variables}


def test_beat_and_flower_run_on_what_compose_gives_them(compose, tmp_path):
    """beat publishes the reconciler and Flower serves its UI behind basic auth on exactly the
    environment compose gives them (the broker URLs with the Redis password; Flower's
    FLOWER_BASIC_AUTH): no S3 credentials, no provider key needed."""
    password = secrets.token_hex(16)
    auth = f"ops:{secrets.token_hex(8)}"
    variables = {"REDIS_PASSWORD": password, "FLOWER_BASIC_AUTH": auth}
    redis_proc, port = start_compose_redis(compose, tmp_path, password)

    def environment(name: str) -> dict[str, str]:
        env = {k: interpolate(v, variables).replace("@redis:6379/", f"@127.0.0.1:{port}/")
               for k, v in compose["services"][name]["environment"].items()}
        assert not SECRET_KEYS - {"REDIS_PASSWORD", "FLOWER_BASIC_AUTH"} & set(env), name
        return process_env(tmp_path, env)

    beat_cmd = [interpolate(a, {}) for a in compose["services"]["beat"]["command"]]
    beat_cmd[beat_cmd.index("--schedule") + 1] = str(tmp_path / "celerybeat-schedule")
    beat_log, flower_log = tmp_path / "beat.log", tmp_path / "flower.log"
    beat = subprocess.Popen([sys.executable, "-m", *beat_cmd], cwd=tmp_path,
                            env={**environment("beat"), "MOONBATCH_RECONCILE_INTERVAL": "1"},
                            stdout=beat_log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    flower_cmd = compose["services"]["flower"]["command"]
    assert flower_cmd[:2] == ["moonbatch", "flower"]
    web = free_port()
    flower = subprocess.Popen(moonbatch_cmd() + ["flower", "--address", "127.0.0.1", "--port",
                                                 str(web)], cwd=tmp_path,
                              env=environment("flower"), stdout=flower_log.open("wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    client = redis.Redis.from_url(f"redis://:{password}@127.0.0.1:{port}/0")
    control = compose["x-moonbatch-environment"]["MOONBATCH_CONTROL_QUEUE"]
    try:
        deadline, published = time.time() + 90, []
        while time.time() < deadline and not published:
            assert beat.poll() is None, beat_log.read_text()[-2000:]
            published = [json.loads(m)["headers"]["task"] for m in client.lrange(control, 0, -1)]
            time.sleep(0.2)
        assert published and set(published) == {"moonbatch.reconcile"}, beat_log.read_text()[-2000:]

        base = f"http://127.0.0.1:{web}"
        deadline = time.time() + 90
        while time.time() < deadline:
            assert flower.poll() is None, flower_log.read_text()[-2000:]
            try:
                if httpx.get(f"{base}/healthcheck", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError("Flower did not answer:\n" + flower_log.read_text()[-2000:])
        assert httpx.get(f"{base}/api/tasks", timeout=10).status_code == 401
        user, secret = auth.split(":")
        assert httpx.get(f"{base}/api/tasks", auth=(user, secret), timeout=10).status_code == 200
    finally:
        for proc in (beat, flower):
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
        for proc in (beat, flower):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        stop(redis_proc)
    for log in (beat_log, flower_log):
        text = log.read_text()
        assert password not in text and auth not in text, log.name
        assert "Traceback" not in text, text[-2000:]


def listening_addresses(pid: int, port: int) -> set[str]:
    """Local addresses a process tree listens on, on ``port`` (psutil)."""
    import psutil

    root = psutil.Process(pid)
    return {c.laddr.ip for p in [root, *root.children(recursive=True)]
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def external_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return a.address
    return None


def test_worker_serves_metrics_only_where_the_systemd_unit_says(broker, tmp_path):
    """A real worker with the io unit's Environment= (MOONBATCH_METRICS_ADDRESS=127.0.0.1)
    listens on 127.0.0.1 only; without the variable (containers) on every interface."""
    unit = dict(item.split("=", 1) for line in unit_settings("moonbatch-worker-io.service")
                ["Environment"] for item in line.split())
    assert unit["MOONBATCH_METRICS_ADDRESS"] == "127.0.0.1"
    workers = {}
    for name, address in (("unit", unit["MOONBATCH_METRICS_ADDRESS"]), ("default", None)):
        port = free_port()
        env = {**unit, "MOONBATCH_METRICS_PORT": str(port),
               "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"metrics-{name}"),
               "MOONBATCH_BROKER_URL": broker.url(0), "MOONBATCH_RESULT_BACKEND": broker.url(1)}
        if address is None:
            del env["MOONBATCH_METRICS_ADDRESS"]
        worker = Worker(process_env(tmp_path, env), "t-" + uuid.uuid4().hex[:8],
                        tmp_path / f"worker-{name}.log", concurrency=1)
        workers[name] = (worker.start(), port)
    try:
        for name, (worker, port) in workers.items():
            worker.wait_ready()
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            else:
                raise AssertionError(f"{name}: no /metrics:\n" + worker.log_path.read_text()[-2000:])
        (unit_worker, unit_port), (default_worker, default_port) = workers["unit"], workers["default"]
        assert listening_addresses(unit_worker.proc.pid, unit_port) == {"127.0.0.1"}
        assert listening_addresses(default_worker.proc.pid, default_port) == {"0.0.0.0"}
        other = external_address()
        if other is not None:  # from another interface: refused, unless all interfaces
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{other}:{unit_port}/metrics", timeout=5)
            assert httpx.get(f"http://{other}:{default_port}/metrics", timeout=5).status_code == 200
        assert "metrics: serving /metrics on 127.0.0.1:" in unit_worker.log_path.read_text()
    finally:
        for worker, _ in workers.values():
            worker.stop()
