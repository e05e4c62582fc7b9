#!/bin/sh
# For every SCANGATE_<NAME>_FILE in the environment, export SCANGATE_<NAME> with the file's
# contents (trailing newlines dropped) and unset the _FILE variable, then exec the command.
# This is how compose.yaml hands the master key and the URLs with passwords to scangate
# without putting them in the container's configuration.
set -eu
for name in $(env | sed -n 's/^\(SCANGATE_[A-Z0-9_]*\)_FILE=.*/\1/p'); do
    if [ -n "$(printenv "$name" || true)" ]; then
        echo "scangate-entrypoint: both $name and ${name}_FILE are set; use one" >&2
        exit 2
    fi
    file=$(printenv "${name}_FILE")
    value=$(cat "$file")
    export "$name=$value"
    unset "${name}_FILE"
done
exec "$@"
