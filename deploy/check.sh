#!/usr/bin/env bash
# Checks the deployment files without a container engine or a cluster:
#
#   hadolint     deploy/Dockerfile, deploy/Dockerfile.cuda (deploy/.hadolint.yaml)
#   kustomize    `kubectl kustomize` renders each deploy/k8s/overlays/<mode>, and
#                the redis overlay with every component (gpu, prometheus-operator,
#                shared-memory-sidecar)
#   kubernetes   every manifest, rendered and as files, against the Kubernetes
#                OpenAPI schemas of $K8S_VERSIONS, strict (unknown fields fail)
#   crds         the Prometheus Operator resources (PodMonitor) against the
#                operator's CRD schemas (deploy/checks/crds, Node.js)
#   compose      deploy/compose.yaml against the Compose Specification schema
#   policy       deploy/checks/policy.py: one mode per overlay, non-root,
#                read-only root filesystem, resources, gRPC probes, grace period
#                > drain, PDB, PVC, Redis password from a Secret, NetworkPolicy,
#                HPA, PodMonitor, images pinned by digest, Prometheus targets,
#                Dockerfile stages (debug info stripped), the Grafana dashboard
#                against deploy/checks/metrics.txt...
#
#   deploy/check.sh             all checks
#   deploy/check.sh policy ...  only the named ones
#
# The tools come from scripts/ensure-deploy-tools.sh and, for crds,
# scripts/ensure-node-packages.sh (installed on first use).
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
overlays=(embedded gpu redis)
run_kustomize() {
  rm -rf "$work/rendered" "$work/rendered.tmp" && mkdir -p "$work/rendered.tmp" "$work/all"
  local overlay
  for overlay in "${overlays[@]}"; do
    "$bin/kubectl" kustomize "$root/deploy/k8s/overlays/$overlay" >"$work/rendered.tmp/$overlay.yaml" || return 1
  done
  # Everything at once: the redis overlay (a Deployment) with both components.
  # kustomize takes relative paths only.
  local k8s
  k8s=$("$bin/python" -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' \
    "$root/deploy/k8s" "$work/all") || return 1
  cat >"$work/all/kustomization.yaml" <<EOF_ALL
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $k8s/overlays/redis
components:
  - $k8s/components/gpu
  - $k8s/components/prometheus-operator
  - $k8s/components/shared-memory-sidecar
EOF_ALL
  "$bin/kubectl" kustomize "$work/all" >"$work/rendered.tmp/all.yaml" || return 1
  mv "$work/rendered.tmp" "$work/rendered"
}

rendered() {
  [ -d "$work/rendered" ] || run_kustomize
}

run_kubernetes() {
  rendered || return 1
  local manifests=() f
  while IFS= read -r f; do
    case "$(basename "$f")" in
      kustomization.yaml | *.patch.yaml) ;;  # kustomize's files, not Kubernetes objects
      podmonitor.yaml) ;;                     # a CRD's resource: the crds check
      *) manifests+=("$f") ;;
    esac
  done < <(find "$root/deploy/k8s" -name '*.yaml' | sort)
  local version status=0
  for version in $K8S_VERSIONS; do
    # all.yaml holds the PodMonitor, which kubernetes-validate has no schema
    # for: it warns and skips it (the crds check validates it).
    "$bin/kubernetes-validate" --strict --quiet --kubernetes-version "$version" \
      "$work"/rendered/*.yaml "${manifests[@]}" >"$work/validate.out" 2>&1 || status=1
    grep -v "Couldn't find schema for kind PodMonitor" "$work/validate.out" || true
  done
  return $status
}

run_crds() {
  rendered || return 1
  local modules
  modules=$("$repo/scripts/ensure-node-packages.sh" "$repo/deploy/checks/crds") || return 1
  "$bin/python" -c '
import json, sys, yaml
docs = [d for path in sys.argv[1:] for d in yaml.safe_load_all(open(path))
        if d and d.get("apiVersion", "").startswith("monitoring.coreos.com/")]
json.dump(docs, sys.stdout)' "$work/rendered/all.yaml" \
    "$root/deploy/k8s/components/prometheus-operator/podmonitor.yaml" >"$work/crds.json" || return 1
  node "$repo/deploy/checks/crds/validate.mjs" "$modules" "$work/crds.json"
}

run_compose() {
  "$bin/check-jsonschema" --builtin-schema vendor.compose-spec "$root/deploy/compose.yaml"
}

run_policy() {
  rendered || return 1
  "$bin/python" "$root/deploy/checks/policy.py" "$root" "$work/rendered"
}

all=(hadolint kustomize kubernetes crds compose policy)
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
