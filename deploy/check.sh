#!/usr/bin/env bash
# Checks the deployment files without a container engine or a cluster:
#
#   hadolint     deploy/Dockerfile, deploy/Dockerfile.cuda (deploy/.hadolint.yaml)
#   kustomize    `kubectl kustomize` renders deploy/k8s and deploy/k8s/gpu
#   kubernetes   every manifest, rendered and as files, against the Kubernetes
#                OpenAPI schemas of $K8S_VERSIONS, strict (unknown fields fail)
#   compose      deploy/compose.yaml against the Compose Specification schema
#   policy       deploy/checks/policy.py: non-root, read-only root filesystem,
#                resources, gRPC probes, grace period > drain, PDB, PVC, Redis
#                settings, Prometheus targets, Dockerfile runtime stage, the
#                Grafana dashboard against deploy/checks/metrics.txt...
#
#   deploy/check.sh             all checks
#   deploy/check.sh policy ...  only the named ones
#
# The tools come from scripts/ensure-deploy-tools.sh (installed on first use).
# NORMSERVE_DEPLOY_ROOT checks another copy of the repository (the self-test,
# deploy/checks/selftest.sh, uses it to break each rule on purpose).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root=${NORMSERVE_DEPLOY_ROOT:-$repo}
# The oldest Kubernetes the manifests support (native preStop sleep: 1.30) and
# the newest schema kubernetes-validate ships.
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}

bin=$("$repo/scripts/ensure-deploy-tools.sh")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run_hadolint() {
  "$bin/hadolint" --config "$root/deploy/.hadolint.yaml" \
    "$root/deploy/Dockerfile" "$root/deploy/Dockerfile.cuda"
}

# Each check runs as an `if` condition, where `set -e` does not apply: every
# step that can fail says `|| return 1`.
run_kustomize() {
  rm -f "$work/k8s.yaml" "$work/gpu.yaml"
  "$bin/kubectl" kustomize "$root/deploy/k8s" >"$work/k8s.yaml.tmp" || return 1
  "$bin/kubectl" kustomize "$root/deploy/k8s/gpu" >"$work/gpu.yaml.tmp" || return 1
  mv "$work/k8s.yaml.tmp" "$work/k8s.yaml" && mv "$work/gpu.yaml.tmp" "$work/gpu.yaml"
}

rendered() {
  [ -s "$work/k8s.yaml" ] && [ -s "$work/gpu.yaml" ] || run_kustomize
}

run_kubernetes() {
  rendered || return 1
  local manifests=() f
  for f in "$root"/deploy/k8s/base/*.yaml; do
    [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
  done
  local version status=0
  for version in $K8S_VERSIONS; do
    "$bin/kubernetes-validate" --strict --quiet --kubernetes-version "$version" \
      "$work/k8s.yaml" "$work/gpu.yaml" "${manifests[@]}" || status=1
  done
  return $status
}

run_compose() {
  "$bin/check-jsonschema" --builtin-schema vendor.compose-spec "$root/deploy/compose.yaml"
}

run_policy() {
  rendered || return 1
  "$bin/python" "$root/deploy/checks/policy.py" "$root" "$work/k8s.yaml" "$work/gpu.yaml"
}

all=(hadolint kustomize kubernetes compose policy)
selected=("$@")
[ ${#selected[@]} -gt 0 ] || selected=("${all[@]}")
failed=()
for check in "${selected[@]}"; do
  case " ${all[*]} " in *" $check "*) ;; *) echo "deploy-check: unknown check $check (${all[*]})" >&2; exit 2 ;; esac
  echo "== deploy-check: $check"
  if "run_$check"; then
    echo "-- $check: ok"
  else
    echo "-- $check: FAILED"
    failed+=("$check")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "deploy-check: failed: ${failed[*]}"
  exit 1
fi
echo "deploy-check: ${#selected[@]} checks passed"
