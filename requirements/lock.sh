#!/usr/bin/env bash
# Writes the lock files from pyproject.toml: every package pinned with its hashes, so an
# install gets exactly what CI tested, or fails.
#   runtime.lock  the gateway's dependencies (deploy/Dockerfile installs it)
#   build.lock    the build backend of build.in (the image builds scangate with it)
#   test.lock     those and the test group (.ci/run installs it before the README's command)
#   lowest.lock   the gateway's dependencies at the lowest versions pyproject.toml allows,
#                 with the test runners of lowest-runners.in (.ci/run's floor check)
# Run it after changing a dependency; it needs uv (`pip install uv`). Set UV to use another.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}
common=(--python-version 3.11 --universal --generate-hashes --quiet
        --custom-compile-command "bash requirements/lock.sh")
"$uv" pip compile pyproject.toml "${common[@]}" -o requirements/runtime.lock
"$uv" pip compile requirements/build.in "${common[@]}" -o requirements/build.lock
"$uv" pip compile pyproject.toml --group test "${common[@]}" -o requirements/test.lock
"$uv" pip compile pyproject.toml requirements/lowest-runners.in --resolution lowest-direct \
    "${common[@]}" -o requirements/lowest.lock
