#!/usr/bin/env bash
# Checks the packaging and deployment files: lints the Dockerfile and the YAML,
# validates the Kubernetes manifests against the API schemas, checks that compose,
# Prometheus, Grafana, Kubernetes, the Dockerfile and gunicorn.conf.py agree, and
# checks the licences of the runtime dependencies. Runs every check, then exits 1 if
# any failed. Needs .venv (`make install`); installs requirements-ci.txt into it.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=.venv/bin
CI_STAMP=.venv/.ci-installed
# The oldest and the newest Kubernetes minor the manifests are meant for.
K8S_VERSIONS=(1.30.0 1.37.0)

if [[ ! -x $BIN/python ]]; then
    echo "check-deploy: $BIN/python is missing; run 'make install' first" >&2
    exit 2
fi
if [[ ! -f $CI_STAMP || requirements-ci.txt -nt $CI_STAMP ]]; then
    echo "== installing requirements-ci.txt into .venv"
    "$BIN/python" -m pip install --quiet --disable-pip-version-check -r requirements-ci.txt
    touch "$CI_STAMP"
fi

passed=()
failed=()
step() {
    local name=$1
    shift
    echo
    echo "== $name: $*"
    if "$@"; then
        echo "-- ok: $name"
        passed+=("$name")
    else
        echo "-- FAILED: $name"
        failed+=("$name")
    fi
}

manifests=()
for file in deploy/k8s/*.yaml; do
    # kustomization.yaml is kustomize's, not an API object; check_deploy_config.py
    # checks that it lists exactly these files.
    [[ $file == */kustomization.yaml ]] || manifests+=("$file")
done

step hadolint "$BIN/hadolint" Dockerfile
step yamllint "$BIN/yamllint" --strict .yamllint docker-compose.yml deploy/
step "compose schema" "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec \
    docker-compose.yml
for version in "${K8S_VERSIONS[@]}"; do
    step "kubernetes-validate $version" "$BIN/kubernetes-validate" --strict \
        --kubernetes-version "$version" "${manifests[@]}"
done
if docker compose version >/dev/null 2>&1; then
    step "docker compose config" docker compose config --quiet
else
    echo
    echo "== docker compose config: skipped, no compose plugin here" \
        "(the schema is checked by check-jsonschema)"
fi
step "deployment files agree" "$BIN/python" scripts/check_deploy_config.py
step "runtime licences" "$BIN/python" scripts/check_licenses.py

echo
echo "check-deploy: passed: ${passed[*]:-none}"
echo "check-deploy: failed: ${failed[*]:-none}"
echo "${#passed[@]} passed, ${#failed[@]} failed"
[[ ${#failed[@]} -eq 0 ]]
