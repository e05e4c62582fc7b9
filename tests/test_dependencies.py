"""The dependency contract: what pyproject.toml declares is what the lock files pin, and the
lowest lock holds the lowest versions it allows, so the floors CI tests are the floors users
get (requirements/lock.sh writes the locks; .ci/run installs them)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# The code reads private parts of these (see the comment on each in pyproject.toml), so a new
# version is taken only once the tests pass on it.
PRIVATE_APIS_USED = {"aiohttp", "redis", "prometheus-client"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)")


def runtime_requirements() -> list[Requirement]:
    return [Requirement(text) for text in PYPROJECT["project"]["dependencies"]]


def group_requirements(group: str) -> list[Requirement]:
    return [Requirement(text) for text in PYPROJECT["dependency-groups"][group]]


def pins(lock: str) -> dict[str, Version]:
    """Package -> version pinned in a lock file (uv's requirements format)."""
    found: dict[str, Version] = {}
    for line in (REQUIREMENTS / lock).read_text(encoding="utf-8").splitlines():
        if match := PIN.match(line):
            found[canonicalize_name(match[1])] = Version(match[2])
    return found


def applies_here(requirement: Requirement) -> bool:
    return requirement.marker is None or requirement.marker.evaluate(default_environment())


@pytest.mark.parametrize(
    ("lock", "groups"),
    [("runtime.lock", []), ("test.lock", ["test"]), ("lowest.lock", [])],
)
def test_every_declared_dependency_is_pinned_within_its_range(lock: str, groups: list[str]) -> None:
    pinned = pins(lock)
    wanted = runtime_requirements() + [r for g in groups for r in group_requirements(g)]
    for requirement in filter(applies_here, wanted):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not in {lock}: run bash requirements/lock.sh"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{lock} pins {name}=={pinned[name]}, outside {requirement.specifier}: "
            "run bash requirements/lock.sh"
        )


def test_the_build_lock_holds_a_backend_the_project_builds_with() -> None:
    backend = pins("build.lock")
    for text in PYPROJECT["build-system"]["requires"]:
        requirement = Requirement(text)
        assert requirement.specifier.contains(backend[canonicalize_name(requirement.name)])


def test_every_pin_carries_its_hashes() -> None:
    for lock in ("runtime.lock", "build.lock", "test.lock", "lowest.lock"):
        text = (REQUIREMENTS / lock).read_text(encoding="utf-8")
        for entry in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2]):
            if PIN.match(entry):
                assert "--hash=sha256:" in entry, (lock, entry.splitlines()[0])


def test_the_lowest_lock_holds_each_dependency_at_its_floor() -> None:
    """What CI's floor check installs is what pyproject.toml promises works."""
    pinned = pins("lowest.lock")
    for requirement in filter(applies_here, runtime_requirements()):
        floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
        assert len(floors) == 1, f"{requirement} needs one floor (>=)"
        assert pinned[canonicalize_name(requirement.name)] == floors[0], requirement


def test_dependencies_whose_private_parts_are_used_have_an_upper_bound() -> None:
    for requirement in runtime_requirements():
        if canonicalize_name(requirement.name) in PRIVATE_APIS_USED:
            assert any(s.operator == "<" for s in requirement.specifier), requirement


def test_the_floor_checks_runners_are_the_tested_ones() -> None:
    """lowest-runners.in pins the test runners to test.lock's versions: the floor check
    varies the gateway's dependencies, nothing else."""
    tested = pins("test.lock")
    runners = [
        Requirement(line)
        for line in (REQUIREMENTS / "lowest-runners.in").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert runners
    for runner in runners:
        (spec,) = runner.specifier
        assert Version(spec.version) == tested[canonicalize_name(runner.name)], runner
        assert pins("lowest.lock")[canonicalize_name(runner.name)] == Version(spec.version)


def test_ci_and_the_image_install_the_locks_by_hash() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "--require-hashes -r requirements/test.lock" in ci
    assert "--require-hashes -r requirements/lowest.lock" in ci
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    assert (
        "pip install --require-hashes -r requirements/runtime.lock -r requirements/build.lock"
        in dockerfile
    )
    # Built with the locked backend: an isolated build would fetch one unchecked.
    assert "pip install --no-deps --no-build-isolation ." in dockerfile
    # Everything the image copies is in its build context.
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    allowed = {line.removeprefix("!").rstrip("/") for line in ignore.splitlines()}
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.MULTILINE):
        *sources, _destination = line.split()
        for source in sources:
            assert source.rstrip("/") in allowed, f"{source} is not in the build context"


def test_development_tools_are_dependency_groups_not_published_extras() -> None:
    assert "optional-dependencies" not in PYPROJECT["project"]
    assert {"test", "bench"} <= PYPROJECT["dependency-groups"].keys()
