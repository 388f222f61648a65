#!/usr/bin/env bash
# Offline checks of the container and AWS definitions (part of `make test`); run from the repository root.
#   hadolint          Dockerfile
#   check-jsonschema  compose.yaml against the Compose specification (schema vendored in check-jsonschema)
#   cfn-lint          infra/*.yaml (errors and warnings both fail)
#   checkov           infra/*.yaml (cloudformation) and Dockerfile (dockerfile); skips carry their reason inline.
#                     The templates also go through our own policies, infra/rules/ (CKV_SLUICE_*, checkov custom
#                     checks: persistent Cassandra data, one node per zone, /healthz, circuit breakers, no binpack
#                     with zone rebalancing, IMDSv2, encryption, deletion protection, public routes, health checks,
#                     a broker that keeps an acknowledged write, an API that waits for a replica before its 202)
# Nothing here needs the network: checkov is kept from the Bridgecrew platform (--skip-download,
# BC_SKIP_MAPPING) and every step runs under a timeout, so a blocked connection cannot hang the build.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="${PWD}/.venv/bin:${PATH}"
export BC_SKIP_MAPPING=TRUE CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false LOG_LEVEL=WARNING
templates=(infra/foundation.yaml infra/network.yaml infra/cluster.yaml infra/data.yaml infra/services.yaml)

step() {
    local title="$1"
    shift
    echo "==> ${title}"
    if ! timeout 600 "$@"; then
        echo "FAILED: ${title}" >&2
        exit 1
    fi
}

step "hadolint: Dockerfile" hadolint --failure-threshold info Dockerfile
step "check-jsonschema: compose.yaml against the Compose specification" \
    check-jsonschema --builtin-schema vendor.compose-spec compose.yaml
step "cfn-lint: ${templates[*]}" cfn-lint --non-zero-exit-code informational -- "${templates[@]}"
checkov_args=(--skip-download --compact --quiet --output cli)
template_files=()
for template in "${templates[@]}"; do template_files+=(--file "$template"); done
step "checkov: CloudFormation templates (built-in checks and infra/rules/)" \
    checkov "${checkov_args[@]}" --framework cloudformation --external-checks-dir infra/rules "${template_files[@]}"
step "checkov: Dockerfile" checkov "${checkov_args[@]}" --framework dockerfile --file Dockerfile
echo "==> all infrastructure checks passed"
