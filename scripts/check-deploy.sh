#!/usr/bin/env bash
# Validates what this machine can validate of the deployment without a Docker engine or a cluster:
#   docker-compose.yml   Debian's docker-compose 1.29 `config` (schema, merge keys, references)
#   deploy/k8s/*.yaml    kubernetes-validate (the API's JSON schemas, strict: unknown fields fail)
#   both                 scripts/check-deploy.py (keys documented, probes, security, references)
#   proto/               buf lint, and buf breaking against the last landed main (.ci/landed-main)
# Tools: docker-compose through apt if missing; kubernetes-validate and buf (PyPI buf-bin) into a
# venv under target/ (one install, ~10 s; every later run takes a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VERSION=1.30.0 # the oldest Kubernetes the manifests are checked against
TOOLS=target/deploy-tools
PINS="kubernetes-validate==1.37.0 buf-bin==1.75.0"

if ! command -v docker-compose >/dev/null; then
    echo "check-deploy: installing Debian's docker-compose"
    as_root=()
    if [ "$(id -u)" -ne 0 ]; then as_root=(sudo); fi
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 apt-get install -y -qq docker-compose >/dev/null
fi
if [ "$(cat "$TOOLS/pins" 2>/dev/null)" != "$PINS" ]; then
    echo "check-deploy: installing $PINS into $TOOLS"
    rm -rf "$TOOLS"
    python3 -m venv "$TOOLS"
    # shellcheck disable=SC2086 # PINS is a list of requirements
    "$TOOLS/bin/pip" install --quiet --disable-pip-version-check $PINS
    echo "$PINS" >"$TOOLS/pins"
fi

echo "check-deploy: docker-compose config ($(docker-compose version --short))"
docker-compose config -q
resolved=$(mktemp)
trap 'rm -f "$resolved"' EXIT
docker-compose config >"$resolved"

echo "check-deploy: kubernetes-validate --strict, Kubernetes $KUBERNETES_VERSION"
manifests=$(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
# shellcheck disable=SC2086 # one argument per manifest
"$TOOLS/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$KUBERNETES_VERSION" $manifests

echo "check-deploy: configuration keys, probes, security contexts, references"
"$TOOLS/bin/python" scripts/check-deploy.py "$resolved"

echo "check-deploy: buf lint ($("$TOOLS/bin/buf" --version))"
"$TOOLS/bin/buf" lint proto

landed=$(tr -d '[:space:]' <.ci/landed-main)
if ! git cat-file -e "$landed^{commit}" 2>/dev/null; then
    echo "check-deploy: .ci/landed-main names $landed, which this clone does not have (shallow clone?)" >&2
    exit 1
fi
echo "check-deploy: buf breaking against the last landed main ${landed:0:12}"
"$TOOLS/bin/buf" breaking proto --against ".git#ref=$landed,subdir=proto"
echo "check-deploy: all deployment checks passed"
