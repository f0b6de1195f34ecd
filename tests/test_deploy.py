"""deploy/: every file parsed and validated by a tool that knows its format, plus the contract.

- compose: the Compose specification's JSON schema (vendored, deploy/schemas/), then secrets
  only through env_file, the queues of each worker service, Redis' flags, graceful stop.
- Kubernetes: kubernetes-validate (strict, pinned Kubernetes version) for the core kinds; KEDA
  ScaledObjects against the KEDA CRD's openAPIV3Schema (vendored), made strict (no unknown
  field); then queues, grace periods, KEDA list names, PDBs, beat's Recreate, Flower's auth.
- systemd: ``systemd-analyze verify`` in a throw-away root (fake ExecStart binaries, the host's
  unit library) with no warning allowed, and ``systemd-analyze security --offline``.
- Dockerfile: dockerfile-parse; multi-stage, non-root final USER, HEALTHCHECK, no secret ENV.
Offline and fast: no Docker, no cluster, no network.
"""

from __future__ import annotations

import base64
import copy
import http.server
import io
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the manifests promise to run on

SECRET_KEYS = {"MOONDREAM_API_KEY", "MOONBATCH_API_KEY", "FAL_KEY", "MOONBATCH_FAL_KEY",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "FLOWER_BASIC_AUTH", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
               "GF_SECURITY_ADMIN_USER", "GF_SECURITY_ADMIN_PASSWORD"}
SECRETISH = re.compile(r"KEY|SECRET|PASSW|TOKEN|BASIC_AUTH|CREDENTIAL", re.I)
IO_QUEUE, CONTROL_QUEUE = "moonbatch", "moonbatch-control"
METRICS_PORT = 9808
MULTIPROC_DIR = "/run/moonbatch/metrics"


def queue_of(command: list[str]) -> str:
    """The -Q argument of a celery worker command."""
    assert command[:4] == ["celery", "-A", "workers", "worker"], command
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


def test_compose_secrets_come_only_from_env_file(compose):
    env_example = dict(line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines()
                       if line.strip() and not line.startswith("#"))
    for key in ("MOONDREAM_API_KEY", "FAL_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "FLOWER_BASIC_AUTH", "MINIO_ROOT_PASSWORD", "GF_SECURITY_ADMIN_PASSWORD"):
        assert key in env_example
    for key, value in env_example.items():  # a template: no password or key has a value
        if SECRETISH.search(key) and key != "AWS_ACCESS_KEY_ID":
            assert value == "", key
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    text = (DEPLOY / "docker-compose.yml").read_text()
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        assert isinstance(environment, dict), name
        assert not SECRET_KEYS & set(environment), f"{name}: a secret in environment:"
        assert not any(SECRETISH.search(k) for k in environment), name
        uses_secret = (service.get("image", "").startswith("${MOONBATCH_IMAGE")
                       or name in ("minio", "minio-init", "grafana"))
        if uses_secret:
            assert service.get("env_file") == [".env"], f"{name} must read secrets from .env"
    for key in SECRET_KEYS:  # nor interpolated into the file (${KEY} would be resolved at up)
        assert "${" + key not in text, key


def test_compose_workers_queues_and_graceful_stop(compose):
    services = compose["services"]
    io_, control = services["worker-io"], services["worker-control"]
    assert io_["command"] == ["celery", "-A", "workers", "worker", "-Q", IO_QUEUE, "--concurrency",
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
    assert services["beat"]["command"][:4] == ["celery", "-A", "workers", "beat"]
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

def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


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
                       "PodDisruptionBudget", "Job"}
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
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env["PROMETHEUS_MULTIPROC_DIR"] == MULTIPROC_DIR
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == MULTIPROC_DIR)
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert "emptyDir" in volume
        assert [p["containerPort"] for p in container["ports"]] == [METRICS_PORT]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
        assert {"configMapRef": {"name": "moonbatch-config"}} in container["envFrom"]
        assert {"secretRef": {"name": "moonbatch-secrets"}} in container["envFrom"]
        assert spec["securityContext"]["runAsNonRoot"] is True

        trigger = scaled[name]["spec"]["triggers"][0]
        assert scaled[name]["spec"]["scaleTargetRef"]["name"] == name
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == queue
        assert trigger["metadata"]["addressFromEnv"] in config
        assert config["MOONBATCH_BROKER_URL"].startswith(
            f"redis://{config[trigger['metadata']['addressFromEnv']]}/{trigger['metadata']['databaseIndex']}")

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
    assert beat["template"]["spec"]["containers"][0]["args"][:4] == ["celery", "-A", "workers", "beat"]

    flower = deployments["moonbatch-flower"]["spec"]["template"]
    (container,) = flower["spec"]["containers"]
    assert container["args"] == ["moonbatch", "flower", "--address", "0.0.0.0", "--port", "5555"]
    auth = next(e for e in container["env"] if e["name"] == "FLOWER_BASIC_AUTH")
    assert auth["valueFrom"]["secretKeyRef"] == {"name": "moonbatch-secrets", "key": "FLOWER_BASIC_AUTH"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthcheck"
    service = by_kind("Service")["moonbatch-flower"]["spec"]
    assert service["type"] == "ClusterIP"
    assert service["selector"].items() <= flower["metadata"]["labels"].items()

    secret = by_kind("Secret")["moonbatch-secrets"]["stringData"]
    assert {"MOONDREAM_API_KEY", "FAL_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "FLOWER_BASIC_AUTH"} == set(secret)
    assert all(re.fullmatch(r"<[^<>]+>(:<[^<>]+>)?", value) for value in secret.values())
    for name, doc in k8s_documents():  # no secret value written into any manifest
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            for env in container.get("env", []):
                assert env["name"] not in SECRET_KEYS or "value" not in env, (name, env["name"])

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
        assert s["EnvironmentFile"] == ["/etc/moonbatch/moonbatch.env"], name
        assert s["User"] == ["moonbatch"] and s["KillSignal"] == ["SIGTERM"], name
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
    assert yaml.safe_load(cmd) == ["celery", "-A", "workers", "worker", "-Q", IO_QUEUE,
                                   "--concurrency", "4", "--loglevel", "INFO"]
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
