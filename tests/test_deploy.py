"""deploy/: the YAML parses and is lint-clean, the settings it sets are ones scangate reads,
the commands are ones the CLI accepts, and shutdown gets more time than it needs."""

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
from gateway.run.cli import build_parser
from gateway.run.server import SHUTDOWN_DEADLINE_S

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
SCANGATE_IMAGE = "scangate"
# A deployment of several hosts cannot use the embedded Valkey, the SQLite file or a key
# file generated in one host's data dir.
REQUIRED = {"SCANGATE_REDIS_URL", "SCANGATE_STORAGE_URL", "SCANGATE_MASTER_KEY"}
# compose.yaml hands secrets over as SCANGATE_<NAME>_FILE (deploy/docker-entrypoint.sh).
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
    for path in (COMPOSE, DOCKERFILE, DEPLOY / ".yamllint", KUBERNETES / "kustomization.yaml"):
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
    entrypoint = DEPLOY / "docker-entrypoint.sh"
    assert entrypoint.stat().st_mode & 0o111, "the entrypoint must be executable"
