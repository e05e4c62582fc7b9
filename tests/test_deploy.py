"""deploy/: the YAML parses and is lint-clean, the settings it sets are ones scangate reads,
the commands are ones the CLI accepts, and shutdown gets more time than it needs. Grafana is
provisioned with the Prometheus its dashboard queries; the optional Ingress and
ServiceMonitors point at ports that exist and keep /metrics private; every alert links its
runbook. All checked statically: no Docker engine or cluster is needed."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from gateway import Settings, parse_duration_s
from gateway.http.context import MAX_BODY_BYTES
from gateway.http.web.docs import DOCS_PATH
from gateway.http.web.pages import PAGES
from gateway.run.cli import build_parser
from gateway.run.server import SHUTDOWN_DEADLINE_S
from storage.postgres import ACQUIRE_TIMEOUT_S, COMMAND_TIMEOUT_S

# GitHub's heading anchors, as the docs' own link check computes them.
from .test_docs import anchors, slug

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# Optional Kubernetes parts, kustomize Components outside the default kustomization.
INGRESS = KUBERNETES / "ingress"
MONITORING = KUBERNETES / "monitoring"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "scangate.json"
PROVISIONING = GRAFANA / "provisioning"
DATASOURCES = PROVISIONING / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = PROVISIONING / "dashboards" / "scangate.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
# The job names alerts.yml and the dashboard rely on.
JOBS = {"scangate-gateway", "scangate-flusher"}
# Served by the gateway, never to be routed from the Internet.
PRIVATE_PATHS = ("/metrics", "/healthz", "/readyz")
NGINX = "nginx.ingress.kubernetes.io/"
SCANGATE_IMAGE = "scangate"
# A deployment of several hosts cannot use the embedded Valkey, the SQLite file or a key
# file generated in one host's data dir.
REQUIRED = {"SCANGATE_REDIS_URL", "SCANGATE_STORAGE_URL", "SCANGATE_MASTER_KEY"}
# compose.yaml hands secrets over as SCANGATE_<NAME>_FILE, which scangate reads itself.
FILE_SUFFIX = "_FILE"
# Stand-ins for what the secrets hold, to check the other settings' values.
SECRET_STANDINS = {
    "SCANGATE_REDIS_URL": "redis://redis:6379/0",
    "SCANGATE_STORAGE_URL": "postgresql://scangate@postgres:5432/scangate",
    "SCANGATE_MASTER_KEY": "A" * 43 + "=",
}


def _yaml_files() -> list[Path]:
    return sorted(p for pattern in ("*.yaml", "*.yml") for p in DEPLOY.rglob(pattern))


def _load_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _load(path: Path) -> dict[str, Any]:
    (doc,) = _load_all(path)
    assert isinstance(doc, dict)
    return doc


def readable_variables() -> set[str]:
    """Every variable ``Settings.from_env`` reads: ``SCANGATE_`` + the field's name, and for
    a duration (``_s``) also without the unit."""
    names = set()
    for f in dataclasses.fields(Settings):
        var = "SCANGATE_" + f.name.upper()
        names |= {var, var.removesuffix("_S")}
    return names


def _scangate_variables(env: dict[str, str]) -> set[str]:
    return {
        name.removesuffix(FILE_SUFFIX) if name.endswith(FILE_SUFFIX) else name
        for name in env
        if name.startswith("SCANGATE_")
    }


def _check_values(env: dict[str, str]) -> None:
    """The non-secret values are ones ``Settings.from_env`` accepts."""
    plain = {k: v for k, v in env.items() if not k.endswith(FILE_SUFFIX)}
    Settings.from_env({**SECRET_STANDINS, **plain})


def _parse_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    assert argv[:1] == ["scangate"], argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"the CLI refuses {shlex.join(argv)}: {capsys.readouterr().err.strip()}")


def _check_serve(args: Any) -> None:
    if args.handler.__name__ == "cmd_serve":
        assert 1 <= args.workers <= 64  # cmd_serve's own range


# -- YAML ------------------------------------------------------------------------------------


def test_the_deploy_files_are_there() -> None:
    for path in (
        COMPOSE,
        DOCKERFILE,
        DEPLOY / ".yamllint",
        KUBERNETES / "kustomization.yaml",
        INGRESS / "kustomization.yaml",
        MONITORING / "kustomization.yaml",
        DASHBOARD,
        DATASOURCES,
        DASHBOARD_PROVIDERS,
    ):
        assert path.is_file(), path
    assert (DEPLOY / "redis" / "redis.conf").is_file()
    assert (DEPLOY / "postgresql" / "postgresql.conf").is_file()


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses_and_is_lint_clean(path: Path) -> None:
    _load_all(path)
    config = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    text = path.read_text(encoding="utf-8")
    problems = [
        f"{path.relative_to(DEPLOY)}:{p.line}:{p.column}: {p.desc} ({p.rule})"
        for p in linter.run(text, config, str(path))
    ]
    assert problems == []


# -- compose ---------------------------------------------------------------------------------


def _compose_scangate_services() -> dict[str, dict[str, Any]]:
    services = _load(COMPOSE)["services"]
    mine = {
        name: s
        for name, s in services.items()
        if str(s.get("image", "")).partition(":")[0] == SCANGATE_IMAGE
    }
    assert {"gateway", "flusher"} <= mine.keys()
    return mine


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_compose_sets_only_settings_scangate_reads() -> None:
    readable = readable_variables()
    for name, service in _compose_scangate_services().items():
        env = _compose_env(service)
        assert _scangate_variables(env) <= readable, name
        assert _scangate_variables(env) >= REQUIRED, name
        _check_values(env)


def test_compose_secret_files_are_mounted() -> None:
    compose = _load(COMPOSE)
    for name, service in _compose_scangate_services().items():
        mounted = {f"/run/secrets/{s}" for s in service.get("secrets", [])}
        for var, value in _compose_env(service).items():
            if var.endswith(FILE_SUFFIX):
                assert value in mounted, (name, var)
        assert set(service.get("secrets", [])) <= compose["secrets"].keys()


def test_compose_commands_are_real_cli_commands(capsys: pytest.CaptureFixture[str]) -> None:
    for service in _compose_scangate_services().values():
        _check_serve(_parse_cli(service["command"], capsys))


def test_compose_gives_shutdown_time_and_checks_health(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, service in _compose_scangate_services().items():
        assert parse_duration_s(service["stop_grace_period"]) > SHUTDOWN_DEADLINE_S, name
    gateway = _compose_scangate_services()["gateway"]
    port = _parse_cli(gateway["command"], capsys).port
    probe = " ".join(gateway["healthcheck"]["test"])
    assert re.search(rf"//127\.0\.0\.1:{port}/(readyz|healthz)\b", probe), probe


# -- Grafana in compose ----------------------------------------------------------------------


def _compose_mounts(service: dict[str, Any]) -> dict[str, tuple[Path, bool]]:
    """Bind mounts of a compose service: container path -> (host path, read-only)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *options = str(volume).split(":")
        if source.startswith("."):
            mounts[target] = ((DEPLOY / source).resolve(), "ro" in options)
    return mounts


def _depends_on(service: dict[str, Any]) -> set[str]:
    return set(service.get("depends_on", []))  # a list, or a dict keyed by service


def _provisioned_datasource() -> dict[str, Any]:
    provisioning = _load(DATASOURCES)
    assert provisioning["apiVersion"] == 1
    (source,) = provisioning["datasources"]
    assert source["type"] == "prometheus" and source["uid"]
    return dict(source)


def test_compose_grafana_is_provisioned_with_the_dashboard() -> None:
    compose = _load(COMPOSE)
    grafana = compose["services"]["grafana"]
    # Pinned: a release, never latest.
    assert re.fullmatch(r"grafana/grafana(-oss)?:\d+\.\d+\.\d+", grafana["image"]), grafana["image"]
    assert "prometheus" in _depends_on(grafana)

    mounts = _compose_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == (PROVISIONING.resolve(), True)
    providers = _load(DASHBOARD_PROVIDERS)
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    mounted_dashboard = f"{provider['options']['path']}/{DASHBOARD.name}"
    assert mounts[mounted_dashboard] == (DASHBOARD.resolve(), True)
    env = _compose_env(grafana)
    assert env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", mounted_dashboard) == (
        mounted_dashboard
    )


def test_compose_grafana_is_private_to_the_host() -> None:
    compose = _load(COMPOSE)
    grafana = compose["services"]["grafana"]
    env = _compose_env(grafana)
    # The admin password comes from a secret file, as scangate's own secrets do.
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    (secret,) = grafana["secrets"]
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == f"/run/secrets/{secret}"
    assert compose["secrets"][secret]["file"].startswith("./secrets/")
    # Anonymous visitors, if let in at all, only view.
    if env.get("GF_AUTH_ANONYMOUS_ENABLED", "false") != "false":
        assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer"
    # Reachable from this host only.
    if grafana.get("network_mode") == "host":
        assert "ports" not in grafana
        assert env["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    else:
        assert grafana["ports"]
        for port in grafana["ports"]:
            assert str(port).startswith("127.0.0.1:"), port


def test_compose_grafana_queries_the_compose_prometheus() -> None:
    services = _load(COMPOSE)["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    # Prometheus has the config and the alerts of deploy/prometheus.
    mounts = _compose_mounts(prometheus)
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in prometheus["command"])
    config_dir, config_name = flags["config.file"].rsplit("/", 1)
    assert mounts[config_dir] == (PROMETHEUS.resolve(), True)
    config = _load(PROMETHEUS / config_name)
    assert config["rule_files"] == [ALERTS.name]
    # Grafana shares its network namespace (or its network) and uses its address.
    source = _provisioned_datasource()
    listen = flags["web.listen-address"]
    if prometheus.get("network_mode") == "host":
        assert grafana.get("network_mode") == "host"
        assert source["url"] == f"http://{listen}"
    else:
        assert source["url"] == f"http://prometheus:{listen.rpartition(':')[2]}"
    # $__rate_interval is right only when Grafana knows the scrape interval.
    assert source["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]


def _datasource_uid(ref: dict[str, Any], variables: dict[str, dict[str, Any]]) -> str:
    """The uid a panel's or a target's datasource reference resolves to."""
    assert ref["type"] == "prometheus", ref
    uid = str(ref["uid"])
    found = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", uid)
    if found is None:
        return uid
    variable = variables[found.group(1) or found.group(2)]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    return str(variable["current"]["value"])


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def test_every_dashboard_panel_queries_the_provisioned_datasource() -> None:
    uid = _provisioned_datasource()["uid"]
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert "__inputs" not in dashboard, "provisioning does not fill in ${DS_...} inputs"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    queried = 0
    for panel in _panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert _datasource_uid(panel["datasource"], variables) == uid, panel["title"]
        for target in panel["targets"]:
            ref = target.get("datasource", panel["datasource"])
            assert _datasource_uid(ref, variables) == uid, panel["title"]
            queried += 1
    assert queried > 10


# -- Kubernetes ------------------------------------------------------------------------------


def _k8s_documents() -> list[dict[str, Any]]:
    kustomization = _load(KUBERNETES / "kustomization.yaml")
    listed = kustomization["resources"]
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk, "kustomization.yaml must list every manifest"
    docs = [doc for name in listed for doc in _load_all(KUBERNETES / name)]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()
    return docs


def _k8s(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d
        for d in _k8s_documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def _scangate_containers(deployment: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        if c["image"].partition(":")[0] == SCANGATE_IMAGE:
            yield c


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables, with those of the ConfigMaps and Secrets it takes whole."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            (cm,) = _k8s("ConfigMap", source["configMapRef"]["name"])
            env.update(cm["data"])
        else:
            (secret,) = _k8s("Secret", source["secretRef"]["name"])
            env.update(secret.get("stringData", {}))
            env.update(dict.fromkeys(secret.get("data", {}), ""))
    for item in container.get("env", []):
        env[item["name"]] = str(item.get("value", ""))
    return env


def test_kubernetes_sets_only_settings_scangate_reads() -> None:
    readable = readable_variables()
    for kind, key in (("ConfigMap", "data"), ("Secret", "stringData")):
        for doc in _k8s(kind):
            assert _scangate_variables(doc.get(key, {})) <= readable, doc["metadata"]["name"]
    for cm in _k8s("ConfigMap"):
        _check_values(cm["data"])
    deployments = _k8s("Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {"scangate-gateway", "scangate-flusher"}
    for deployment in deployments:
        for container in _scangate_containers(deployment):
            env = _container_env(container)
            assert _scangate_variables(env) <= readable, deployment["metadata"]["name"]
            assert _scangate_variables(env) >= REQUIRED, deployment["metadata"]["name"]


def test_kubernetes_commands_are_real_cli_commands(capsys: pytest.CaptureFixture[str]) -> None:
    subcommands = {}
    for deployment in _k8s("Deployment"):
        (container,) = _scangate_containers(deployment)
        argv = container.get("command", []) + container.get("args", [])
        args = _parse_cli(argv, capsys)
        _check_serve(args)
        subcommands[deployment["metadata"]["name"]] = args.handler.__name__
    assert subcommands == {"scangate-gateway": "cmd_serve", "scangate-flusher": "cmd_flush"}


def _prestop_sleep_s(container: dict[str, Any]) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def test_kubernetes_gateway_drains_and_probes_the_right_paths(
    capsys: pytest.CaptureFixture[str],
) -> None:
    (deployment,) = _k8s("Deployment", "scangate-gateway")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = _scangate_containers(deployment)
    sleep_s = _prestop_sleep_s(container)
    assert sleep_s > 0
    assert pod["terminationGracePeriodSeconds"] > SHUTDOWN_DEADLINE_S + sleep_s

    port = _parse_cli(container["args"], capsys).port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in ports.values()

    def probe(kind: str) -> tuple[str, int]:
        get = container[kind]["httpGet"]
        return get["path"], ports.get(get["port"], get["port"])

    assert probe("readinessProbe") == ("/readyz", port)
    assert probe("livenessProbe") == ("/healthz", port)

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    (service,) = _k8s("Service", "scangate-gateway")
    assert all(
        ports.get(p["targetPort"], p["targetPort"]) == port for p in service["spec"]["ports"]
    )


def test_kubernetes_flusher_metrics_port_matches(capsys: pytest.CaptureFixture[str]) -> None:
    (deployment,) = _k8s("Deployment", "scangate-flusher")
    (container,) = _scangate_containers(deployment)
    port = _parse_cli(container["args"], capsys).metrics_port
    assert port in {p["containerPort"] for p in container["ports"]}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)


def test_kubernetes_every_deployment_has_a_disruption_budget() -> None:
    budgets = [pdb["spec"]["selector"]["matchLabels"] for pdb in _k8s("PodDisruptionBudget")]
    for deployment in _k8s("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(b.items() <= labels.items() for b in budgets), deployment["metadata"]["name"]
    (hpa,) = _k8s("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "scangate-gateway"


# -- Kubernetes: the optional Ingress and ServiceMonitors ------------------------------------


def _component_documents(directory: Path) -> list[dict[str, Any]]:
    """The manifests of a kustomize Component, which must list every one of them."""
    component = _load(directory / "kustomization.yaml")
    assert component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    assert component["kind"] == "Component"
    on_disk = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(component["resources"]) == on_disk
    namespace = _load(KUBERNETES / "kustomization.yaml")["namespace"]
    docs = [doc for name in component["resources"] for doc in _load_all(directory / name)]
    for doc in docs:
        # Right with kubectl apply -f too, where the kustomization's namespace is not set.
        assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]
    return docs


def test_kubernetes_optional_parts_are_components() -> None:
    components = {p.parent for p in KUBERNETES.glob("*/kustomization.yaml")}
    assert components == {INGRESS, MONITORING}
    kustomization = _load(KUBERNETES / "kustomization.yaml")
    assert set(kustomization.get("components", [])) <= {p.name for p in components}
    # The default apply needs no CRD: nothing of prometheus-operator's in it.
    assert not any(d["apiVersion"].startswith("monitoring.coreos.com/") for d in _k8s_documents())


def _ingress() -> dict[str, Any]:
    (ingress,) = [d for d in _component_documents(INGRESS) if d["kind"] == "Ingress"]
    return ingress


def _routed(paths: list[dict[str, Any]], request_path: str) -> bool:
    """Whether any Ingress path takes ``request_path`` (Kubernetes' matching: Exact is the
    whole path, Prefix whole path elements)."""
    for item in paths:
        path = item["path"]
        if item["pathType"] == "Exact" and request_path == path:
            return True
        if item["pathType"] == "Prefix":
            prefix = path.rstrip("/")
            if request_path == prefix or request_path.startswith(prefix + "/"):
                return True
    return False


def test_the_ingress_routes_the_public_paths_and_never_metrics() -> None:
    ingress = _ingress()
    (service,) = _k8s("Service", "scangate-gateway")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    tls_hosts = {host for tls in ingress["spec"]["tls"] for host in tls["hosts"]}
    assert all(tls["secretName"] for tls in ingress["spec"]["tls"])
    paths = []
    for rule in ingress["spec"]["rules"]:
        assert rule["host"] in tls_hosts, rule["host"]
        for item in rule["http"]["paths"]:
            # Exact and Prefix mean the same on every controller; ImplementationSpecific
            # may be a regular expression that matches more than it says.
            assert item["pathType"] in {"Exact", "Prefix"}, item
            backend = item["backend"]["service"]
            assert backend["name"] == "scangate-gateway"
            assert backend["port"]["name"] in port_names
            paths.append(item)
    for path in PRIVATE_PATHS:
        assert not _routed(paths, path), path
        assert not _routed(paths, path + "/x"), path
    public = [*PAGES, DOCS_PATH, "/openapi.json", "/v1/scans", "/web/api/otp", "/static/site.css"]
    assert [path for path in public if not _routed(paths, path)] == []


def _nginx_size_bytes(size: str) -> int:
    """An nginx size ("1m", "512k", "1048576") in bytes."""
    found = re.fullmatch(r"(\d+)([kmg]?)", size.lower())
    assert found is not None, size
    return int(found.group(1)) * 1024 ** " kmg".index(found.group(2) or " ")


def test_the_ingress_keeps_to_the_gateway_limits() -> None:
    annotations = _ingress()["metadata"]["annotations"]
    (config,) = _k8s("ConfigMap", "scangate-config")
    settings = Settings.from_env({**SECRET_STANDINS, **config["data"]})
    # nginx refuses what the gateway would refuse, before it crosses the cluster.
    assert _nginx_size_bytes(annotations[NGINX + "proxy-body-size"]) == MAX_BODY_BYTES
    assert float(annotations[NGINX + "proxy-send-timeout"]) == settings.body_timeout_s
    # The gateway answers its own slow requests before nginx gives up with a 504.
    read_timeout_s = float(annotations[NGINX + "proxy-read-timeout"])
    assert read_timeout_s > ACQUIRE_TIMEOUT_S + COMMAND_TIMEOUT_S


def _metrics_port(deployment: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> int:
    """The container port a scangate Deployment serves /metrics on."""
    (container,) = _scangate_containers(deployment)
    args = _parse_cli(container.get("command", []) + container.get("args", []), capsys)
    if args.handler.__name__ == "cmd_flush":
        return int(args.metrics_port)
    assert args.handler.__name__ == "cmd_serve"
    own_port = _container_env(container).get("SCANGATE_METRICS_PORT", "0")
    return int(own_port) or int(args.port)


def _relabelled_job(endpoint: dict[str, Any], service: dict[str, Any]) -> str:
    """The job label prometheus-operator gives the endpoint's targets: the Service's name
    unless a relabeling replaces it."""
    job = str(service["metadata"]["name"])
    for relabel in endpoint.get("relabelings", []):
        if relabel.get("targetLabel") == "job" and relabel.get("action", "replace") == "replace":
            assert not relabel.get("sourceLabels"), relabel
            job = relabel["replacement"]
    return job


def test_the_servicemonitors_scrape_every_metrics_port_as_the_alerts_jobs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    monitors = [d for d in _component_documents(MONITORING) if d["kind"] == "ServiceMonitor"]
    assert {m["apiVersion"] for m in monitors} == {"monitoring.coreos.com/v1"}
    jobs = set()
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [
            s for s in _k8s("Service") if selector.items() <= s["metadata"]["labels"].items()
        ]
        (deployment,) = [
            d
            for d in _k8s("Deployment")
            if service["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        (container,) = _scangate_containers(deployment)
        container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        service_ports = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            target = service_ports[endpoint["port"]]
            assert container_ports.get(target, target) == _metrics_port(deployment, capsys)
            assert endpoint.get("path", "/metrics") == "/metrics"
            jobs.add(_relabelled_job(endpoint, service))
    assert jobs == JOBS
    prometheus = _load(PROMETHEUS / "prometheus.yml")
    assert {job["job_name"] for job in prometheus["scrape_configs"]} == JOBS
    assert set(re.findall(r'job="([^"]+)"', ALERTS.read_text(encoding="utf-8"))) <= JOBS


# -- alerts and their runbooks ---------------------------------------------------------------


def _alerts() -> list[dict[str, Any]]:
    groups = _load(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


RUNBOOK_URL = re.compile(r"(https://[^#\s]+/)docs/operations\.md#([\w-]+)")


def _runbook_link(rule: dict[str, Any]) -> tuple[str, str]:
    """(base, anchor) of an alert's runbook_url."""
    url = rule["annotations"]["runbook_url"]
    found = RUNBOOK_URL.fullmatch(url)
    assert found is not None, (rule["alert"], url)
    return found.group(1), found.group(2)


def test_every_alert_links_its_runbook_section() -> None:
    bases = set()
    alerts = _alerts()
    assert len(alerts) >= 10
    for rule in alerts:
        base, anchor = _runbook_link(rule)
        assert anchor == slug(rule["alert"]), rule["alert"]
        bases.add(base)
    # One base, named in the file's header, where operators replace it.
    (base,) = bases
    header = ALERTS.read_text(encoding="utf-8").partition("\ngroups:")[0]
    assert base in header


def test_every_runbook_url_names_a_section_of_the_operations_document() -> None:
    sections = anchors(OPERATIONS)
    missing = [rule["alert"] for rule in _alerts() if _runbook_link(rule)[1] not in sections]
    assert missing == [], "docs/operations.md has no section for these alerts"


# -- the image -------------------------------------------------------------------------------


def test_the_image_runs_a_real_command(capsys: pytest.CaptureFixture[str]) -> None:
    (cmd,) = [
        line.removeprefix("CMD").strip()
        for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()
        if line.startswith("CMD ")
    ]
    args = _parse_cli(json.loads(cmd), capsys)
    assert args.handler.__name__ == "cmd_serve"
    assert args.host == "0.0.0.0"  # noqa: S104 - a container listens on its own interface
    # scangate reads SCANGATE_<NAME>_FILE itself; a script in front would be a second
    # reader that `docker compose exec` skips.
    assert "ENTRYPOINT" not in DOCKERFILE.read_text(encoding="utf-8")
