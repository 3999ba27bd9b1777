"""Cross-file rules of the deployment files that schema validators cannot see.

The schemas themselves are checked by tools (scripts/check-deploy.sh): compose by
check-jsonschema's copy of the Compose Specification, Kubernetes by kubernetes-validate.

docker-compose.yml, deploy/prometheus, deploy/grafana and deploy/k8s must agree with
each other, with the Dockerfile and with gunicorn.conf.py: files that are mounted must
exist, names that are referenced must be defined, and the shutdown timings must add
up. Prints one line per rule and exits 1 if any is broken. Needs PyYAML.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from smart.config import Settings  # noqa: E402 - standard library only, like this script

COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"

SERVICES = ("smart", "simulator", "prometheus", "grafana")

Check = Callable[[], Iterator[str]]
CHECKS: list[tuple[str, Check]] = []


def check(description: str) -> Callable[[Check], Check]:
    """Register a rule; the function yields one message per violation."""

    def register(function: Check) -> Check:
        CHECKS.append((description, function))
        return function

    return register


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dockerfile() -> dict[str, Any]:
    """ENV, USER and EXPOSE of the Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV\s+(.+)$", text, re.MULTILINE):
        env.update(re.findall(r"(\w+)=(\S+)", line))
    user = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    exposed = re.findall(r"^EXPOSE\s+(.+)$", text, re.MULTILINE)
    return {
        "env": env,
        "uid": int(user[-1].split(":")[0]) if user else None,
        "ports": {int(p.split("/")[0]) for line in exposed for p in line.split()},
    }


def graceful_timeout_s() -> int:
    """gunicorn's graceful timeout default (``Settings``, which gunicorn.conf.py reads)."""
    return int(Settings().graceful_timeout_s)


def duration_s(value: str | int) -> float:
    """Compose durations: 1m30s, 70s, 500ms."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", str(value))
    return sum(float(number) * units[unit] for number, unit in parts)


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load(COMPOSE)
    return data


def bind_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(host path, container path) of every bind mount in short syntax."""
    for volume in service.get("volumes", []):
        if isinstance(volume, str) and volume.startswith((".", "/")):
            host, container = volume.split(":")[:2]
            yield host, container


# --- docker-compose.yml -----------------------------------------------------------


@check("compose: no obsolete top-level `version` (the schema still accepts it)")
def compose_version() -> Iterator[str]:
    if "version" in compose():
        yield "remove `version`: Compose ignores it and warns on every command"


@check("compose: the four services exist, each with a build or a pinned image")
def compose_services() -> Iterator[str]:
    services = compose().get("services", {})
    for name in SERVICES:
        if name not in services:
            yield f"service {name} is missing"
    for name, service in services.items():
        image = service.get("image", "")
        if "build" not in service and (":" not in image or image.endswith(":latest")):
            yield f"service {name}: image {image!r} must be pinned to a tag"
        for dependency in service.get("depends_on", []):
            if dependency not in services:
                yield f"service {name} depends on undefined service {dependency!r}"


@check("compose: every build context has its Dockerfile, every bind mount exists")
def compose_paths() -> Iterator[str]:
    for name, service in compose().get("services", {}).items():
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            if not (ROOT / context / "Dockerfile").is_file():
                yield f"service {name}: no Dockerfile in build context {context!r}"
        for host, _ in bind_mounts(service):
            if not (ROOT / host).exists():
                yield f"service {name}: mounts {host}, which does not exist"


@check("compose: smart reaches the simulator and outlives its graceful timeout")
def compose_smart() -> Iterator[str]:
    services = compose().get("services", {})
    smart = services.get("smart", {})
    upstream = urlsplit(smart.get("environment", {}).get("SMART_UPSTREAM_URL", ""))
    if upstream.hostname not in services:
        yield f"SMART_UPSTREAM_URL host {upstream.hostname!r} is not a compose service"
    elif str(upstream.port) not in map(str, services[upstream.hostname].get("command", [])):
        yield f"the {upstream.hostname} service does not listen on port {upstream.port}"
    grace = duration_s(smart.get("stop_grace_period", "10s"))
    if grace <= graceful_timeout_s():
        yield (
            f"stop_grace_period {grace:g} s must exceed gunicorn's graceful timeout "
            f"({graceful_timeout_s()} s), or docker kills in-flight requests"
        )
    if smart.get("read_only") and "/tmp" not in smart.get("tmpfs", []):
        metrics_dir = dockerfile()["env"].get("PROMETHEUS_MULTIPROC_DIR")
        yield f"read_only smart needs a writable /tmp for {metrics_dir}"


# --- Prometheus and Grafana for the compose stack ----------------------------------


@check("prometheus: scrapes smart's metrics port and loads only mounted rule files")
def prometheus_config() -> Iterator[str]:
    services = compose().get("services", {})
    mounted = {container for _, container in bind_mounts(services.get("prometheus", {}))}
    config = load(ROOT / "deploy" / "prometheus" / "prometheus.yml")
    if "/etc/prometheus/prometheus.yml" not in mounted:
        yield "deploy/prometheus/prometheus.yml is not mounted into the prometheus service"
    for rule_file in config.get("rule_files", []):
        if rule_file not in mounted:
            yield f"rule file {rule_file} is not mounted into the prometheus service"
    targets = {
        target
        for job in config.get("scrape_configs", [])
        for static in job.get("static_configs", [])
        for target in static.get("targets", [])
    }
    for port in dockerfile()["ports"]:
        if f"smart:{port}" not in targets:
            yield f"no scrape target smart:{port} (the port the image exposes)"


@check("grafana: datasource points at prometheus, dashboards at the mounted JSON")
def grafana_provisioning() -> Iterator[str]:
    services = compose().get("services", {})
    grafana = services.get("grafana", {})
    mounts = dict(bind_mounts(grafana))
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    for source in ("datasources", "dashboards"):
        if f"/etc/grafana/provisioning/{source}" not in mounts.values():
            yield f"provisioning/{source} is not mounted into the grafana service"
    for path in sorted((provisioning / "datasources").glob("*.yml")):
        for source in load(path).get("datasources", []):
            host = urlsplit(source.get("url", "")).hostname
            if host not in services:
                yield f"{path.name}: datasource {source.get('name')} points at {host!r}"
    dashboard_dirs = {str(Path(container).parent) for container in mounts.values()}
    for path in sorted((provisioning / "dashboards").glob("*.yml")):
        for provider in load(path).get("providers", []):
            folder = provider.get("options", {}).get("path")
            if folder not in dashboard_dirs:
                yield f"{path.name}: provider path {folder} receives no mounted dashboard"


# --- Kubernetes --------------------------------------------------------------------


def k8s_documents() -> dict[str, dict[str, Any]]:
    """Kind -> manifest, for the resources listed in kustomization.yaml."""
    kustomization = load(K8S / "kustomization.yaml")
    documents: dict[str, dict[str, Any]] = {}
    for resource in kustomization.get("resources", []):
        for document in yaml.safe_load_all((K8S / resource).read_text()):
            if document:
                documents[document["kind"]] = document
    return documents


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = k8s_documents()["Deployment"]["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec()["containers"]
    return next(c for c in containers if c["name"] == "smart")


@check("k8s: kustomization.yaml lists exactly the manifests in deploy/k8s")
def k8s_kustomization() -> Iterator[str]:
    listed = set(load(K8S / "kustomization.yaml").get("resources", []))
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    for name in sorted(listed - present):
        yield f"kustomization.yaml lists {name}, which does not exist"
    for name in sorted(present - listed):
        yield f"{name} is not listed in kustomization.yaml"
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        if kind not in k8s_documents():
            yield f"no {kind}"


@check("k8s: grace period covers preStop plus gunicorn's graceful timeout")
def k8s_shutdown() -> Iterator[str]:
    command = container().get("lifecycle", {}).get("preStop", {}).get("exec", {})
    sleep = command.get("command", [])
    pre_stop_s = int(sleep[1]) if sleep[:1] == ["sleep"] and len(sleep) == 2 else 0
    if pre_stop_s == 0:
        yield "no preStop sleep: endpoints would still route to a pod that stops accepting"
    grace = pod_spec().get("terminationGracePeriodSeconds", 30)
    needed = pre_stop_s + graceful_timeout_s()
    if grace <= needed:
        yield f"terminationGracePeriodSeconds {grace} must exceed preStop + graceful ({needed})"


@check("k8s: probes, worker count and resources follow the image")
def k8s_container() -> Iterator[str]:
    smart = container()
    if smart.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
        yield "livenessProbe must GET /healthz"
    if smart.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
        yield "readinessProbe must GET /readyz"
    env = {e["name"]: e for e in smart.get("env", [])}
    field = env.get("WEB_CONCURRENCY", {}).get("valueFrom", {}).get("resourceFieldRef", {})
    if field.get("resource") != "limits.cpu":
        yield "WEB_CONCURRENCY must follow limits.cpu (one gevent worker per core)"
    resources = smart.get("resources", {})
    for kind in ("requests", "limits"):
        for name in ("cpu", "memory"):
            if name not in resources.get(kind, {}):
                yield f"resources.{kind}.{name} is not set"
    ports = {p["containerPort"] for p in smart.get("ports", [])}
    if ports != dockerfile()["ports"]:
        yield f"containerPort {sorted(ports)} differs from EXPOSE {sorted(dockerfile()['ports'])}"
    annotations = k8s_documents()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    if int(annotations.get("prometheus.io/port", 0)) not in ports:
        yield "prometheus.io/port is not a container port"


@check("k8s: non-root, read-only root, writable dirs where the image writes")
def k8s_security() -> Iterator[str]:
    pod, smart, image = pod_spec(), container(), dockerfile()
    pod_security = pod.get("securityContext", {})
    if not pod_security.get("runAsNonRoot"):
        yield "runAsNonRoot must be true"
    if pod_security.get("runAsUser") != image["uid"]:
        yield f"runAsUser {pod_security.get('runAsUser')} differs from USER {image['uid']}"
    security = smart.get("securityContext", {})
    if not security.get("readOnlyRootFilesystem") or security.get("allowPrivilegeEscalation"):
        yield "the container needs readOnlyRootFilesystem and no privilege escalation"
    mounts = [m["mountPath"] for m in smart.get("volumeMounts", [])]
    for variable in ("PROMETHEUS_MULTIPROC_DIR", "SMART_WORKER_TMP_DIR"):
        path = image["env"].get(variable, "")
        if not any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts):
            yield f"{variable}={path} is on the read-only root filesystem"
        if path in mounts and variable == "PROMETHEUS_MULTIPROC_DIR":
            yield f"{path} is a mount point; gunicorn.conf.py could not remove it"


@check("k8s: Service, PDB and HPA select the Deployment's pods")
def k8s_selectors() -> Iterator[str]:
    documents = k8s_documents()
    deployment = documents["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = documents["Service"]["spec"]
    pdb = documents["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    for name, selector in (("Service", service["selector"]), ("PodDisruptionBudget", pdb)):
        if not selector.items() <= labels.items():
            yield f"{name} selector {selector} does not match pod labels {labels}"
    port_names = {p.get("name") for p in container().get("ports", [])}
    for port in service.get("ports", []):
        if isinstance(port["targetPort"], str) and port["targetPort"] not in port_names:
            yield f"Service targetPort {port['targetPort']} is not a named container port"
    hpa = documents["HorizontalPodAutoscaler"]["spec"]
    if hpa["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
        yield "the HorizontalPodAutoscaler scales another Deployment"
    if hpa.get("minReplicas", 1) < 2:
        yield "minReplicas must be at least 2 for the PodDisruptionBudget to allow drains"


def main() -> int:
    failed = 0
    for description, function in CHECKS:
        try:
            problems = list(function())
        except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as error:
            problems = [f"could not be checked: {type(error).__name__}: {error}"]
        print(f"{'FAIL' if problems else 'ok  '} {description}")
        for problem in problems:
            print(f"     - {problem}")
        failed += bool(problems)
    print(f"{len(CHECKS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
