#!/usr/bin/env bash
# Proves that deploy/check.sh can fail: for each mutation below, a fresh copy
# of the deployment files gets one plausible mistake, and the named check must
# fail on it with the expected message. A mutation whose text is no longer in
# the file fails the self-test too (it would otherwise test nothing).
#
#   deploy/checks/selftest.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=$("$repo/scripts/ensure-deploy-tools.sh")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# check | file | text | replacement | expected in the check's output
mutations=$(cat <<'EOF'
hadolint|deploy/Dockerfile|apt-get install -y --no-install-recommends python3-venv|apt-get install -y python3-venv|DL3015
hadolint|deploy/Dockerfile.cuda|USER 10001:10001|USER 10001:10001\nRUN cd /tmp|DL3003
kustomize|deploy/k8s/overlays/embedded/kustomization.yaml|  - pdb.yaml|  - pdbs.yaml|pdbs.yaml
kustomize|deploy/k8s/overlays/redis/kustomization.yaml|  - hpa.yaml|  - hpas.yaml|hpas.yaml
kubernetes|deploy/k8s/overlays/redis/deployment.yaml|          timeoutSeconds: 3|          timeoutSecond: 3|timeoutSecond
kubernetes|deploy/k8s/overlays/redis/pdb.yaml|  maxUnavailable: 1|  maxUnavailable: [1]|maxUnavailable
kubernetes|deploy/k8s/overlays/redis/hpa.yaml|  minReplicas: 2|  minReplica: 2|minReplica
kubernetes|deploy/k8s/overlays/redis/networkpolicy.yaml|  policyTypes:|  policyType:|policyType
crds|deploy/k8s/components/prometheus-operator/podmonitor.yaml|      interval: 15s|      interval: 15 seconds|must match pattern
crds|deploy/k8s/components/prometheus-operator/podmonitor.yaml|    - port: metrics|    - port: 9464|port must be string
compose|deploy/compose.yaml|  stop_grace_period: 20s|  stop_grace_period: 20s\n  restart_policy: always|restart_policy
compose|deploy/compose.yaml|      condition: service_healthy|      condition: healthy|healthy
policy|deploy/k8s/overlays/embedded/statefulset.yaml|            readOnlyRootFilesystem: true|            readOnlyRootFilesystem: false|readOnlyRootFilesystem must be true
policy|deploy/k8s/overlays/redis/redis.yaml|        runAsUser: 999|        runAsUser: 0|runAsUser must be a non-zero uid
policy|deploy/k8s/overlays/redis/deployment.yaml|      terminationGracePeriodSeconds: 30|      terminationGracePeriodSeconds: 12|must exceed preStop sleep 5 + drain 10
policy|deploy/k8s/base/configmap.yaml|  NORMSERVE_DRAIN_SECONDS: "10"|  NORMSERVE_DRAIN_SECONDS: "40"|must exceed preStop sleep 5 + drain 40
policy|deploy/k8s/overlays/embedded/statefulset.yaml|            limits:\n              cpu: "2"\n|            limits:\n|resources.limits.cpu missing
policy|deploy/k8s/overlays/redis/deployment.yaml|          readinessProbe:\n            grpc:\n              port: 50051|          readinessProbe:\n            tcpSocket:\n              port: 50051|readinessProbe must be a grpc probe
policy|deploy/k8s/overlays/redis/kustomization.yaml|  - pdb.yaml\n||no PodDisruptionBudget selects its pods
policy|deploy/k8s/overlays/embedded/statefulset.yaml|  replicas: 1|  replicas: 2|exactly one replica
policy|deploy/k8s/overlays/embedded/statefulset.yaml|  volumeClaimTemplates:\n    - metadata:\n        name: data|  volumeClaimTemplates:\n    - metadata:\n        name: state|must be mounted from a volumeClaimTemplate
policy|deploy/k8s/overlays/redis/deployment.yaml|              value: redis://:$(REDIS_PASSWORD)@normserve-redis:6379/0|              value: embedded|must share a Redis store
policy|deploy/k8s/base/configmap.yaml|  NORMSERVE_METRICS_ADDR:|  NORMSERVE_METRIC_ADDR:|unknown variable NORMSERVE_METRIC_ADDR
policy|deploy/k8s/overlays/redis/deployment.yaml|      enableServiceLinks: false|      enableServiceLinks: true|enableServiceLinks must be false
policy|deploy/k8s/overlays/redis/service.yaml|      targetPort: metrics|      targetPort: metric|targetPort metric not declared
policy|deploy/k8s/components/gpu/gpu.patch.yaml|  value: "1"|  value: "0"|nvidia.com/gpu: 1
policy|deploy/k8s/overlays/gpu/kustomization.yaml|  - ../embedded|  - ../redis|expected one normserve StatefulSet
policy|deploy/k8s/overlays/redis/deployment.yaml|redis://:$(REDIS_PASSWORD)@|redis://:hunter2@|the Redis password must come from a Secret
policy|deploy/k8s/overlays/redis/redis.yaml|,\n                 "--requirepass", "$(REDIS_PASSWORD)"]|]|Redis must require the password
policy|deploy/k8s/overlays/redis/redis.yaml|            - name: REDISCLI_AUTH|            - name: REDISCLI_PASSWORD|REDISCLI_AUTH must come from the same Secret key
policy|deploy/k8s/overlays/redis/kustomization.yaml|resources:|secretGenerator:\n  - name: normserve-redis\n    literals: [password=hunter2]\nresources:|a Secret with data
policy|deploy/k8s/overlays/redis/kustomization.yaml|  - networkpolicy.yaml\n||no NetworkPolicy selects the Redis pods
policy|deploy/k8s/overlays/redis/networkpolicy.yaml|        - podSelector:|        - namespaceSelector: {}\n          podSelector:|admits more than normserve pods
policy|deploy/k8s/overlays/redis/networkpolicy.yaml|          port: 6379|          port: 6380|must name Redis's port only
policy|deploy/k8s/overlays/redis/hpa.yaml|  minReplicas: 2|  minReplicas: 1|minReplicas must be at least 2
policy|deploy/k8s/overlays/redis/kustomization.yaml|  - hpa.yaml\n||no HorizontalPodAutoscaler scales
policy|deploy/k8s/overlays/redis/deployment.yaml|spec:\n  revisionHistoryLimit|spec:\n  replicas: 2\n  revisionHistoryLimit|managed by the HorizontalPodAutoscaler
policy|deploy/k8s/components/prometheus-operator/podmonitor.yaml|    - port: metrics|    - port: metric|port metric not declared
policy|deploy/k8s/components/prometheus-operator/podmonitor.yaml|      app.kubernetes.io/name: normserve\n  podMetricsEndpoints|      app.kubernetes.io/name: normserve-server\n  podMetricsEndpoints|misses
policy|deploy/compose.yaml|  stop_grace_period: 20s|  stop_grace_period: 5s|must exceed the drain
policy|deploy/compose.yaml|  user: "10001:10001"|  user: "0:0"|user must be a non-root uid
policy|deploy/compose.yaml|"--appendfsync", "always"|"--appendfsync", "everysec"|--appendfsync always
policy|deploy/compose.yaml|prom/prometheus:v3.5.0|prom/prometheus:v3.6.0|not pinned by digest
policy|deploy/checks/unpinned-images.txt|docker.io/grafana/grafana:12.1.1|docker.io/grafana/grafana:12.1.1\ndocker.io/library/busybox:1.37|which nothing uses
policy|deploy/Dockerfile|ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim|ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim@sha256:0000000000000000000000000000000000000000000000000000000000000000|is pinned: remove it from
policy|deploy/prometheus/prometheus.yml|          - normserve-2:9464\n||scrapes
policy|deploy/Dockerfile|USER 10001:10001|USER root|numeric non-root uid
policy|deploy/Dockerfile.cuda|ARG TORCH_VERSION=2.11.0|ARG TORCH_VERSION=2.10.0|differs from scripts/requirements.txt
policy|deploy/Dockerfile|COPY --from=build --chown=0:0 /staging/opt/ /opt/|COPY --from=build --chown=0:0 /staging/opt/ /usr/lib/|the binary's RUNPATH
policy|deploy/Dockerfile.cuda|strip --strip-debug /staging/usr/local/bin/normserve|ls -l /staging/usr/local/bin/normserve|must strip debug info
policy|deploy/Dockerfile|"health", "--addr", "127.0.0.1:50051"]|"--version"]|HEALTHCHECK must run
policy|.dockerignore|\ntarget\n|\n|must exclude target
policy|deploy/grafana/normserve-dashboard.json|sum by (rpc) (rate(normserve_requests_total|sum by (rpc) (rate(normserve_request_total|unknown metric normserve_request_total
policy|deploy/grafana/normserve-dashboard.json|sum by (op) (rate(normserve_store_errors_total|sum by (rpc) (rate(normserve_store_errors_total|groups by rpc
policy|deploy/grafana/normserve-dashboard.json|"expr": "sum by (instance, device) (normserve_cuda_memory_bytes{job=~\"$job\", instance=~\"$instance\"})"|"expr": "sum(up)"|no panel shows normserve_cuda_memory_bytes
policy|deploy/checks/metrics.txt|normserve_sessions gauge|normserve_sessions_total gauge|unknown metric normserve_sessions
EOF
)

copy_tree() {
  rm -rf "$work/root"
  mkdir -p "$work/root/scripts"
  cp -a "$repo/deploy" "$repo/src" "$repo/Cargo.toml" "$repo/.dockerignore" "$work/root/"
  cp -a "$repo/scripts/requirements.txt" "$work/root/scripts/"
}

passed=0
failed=0
while IFS='|' read -r check file text replacement expected; do
  [ -n "$check" ] || continue
  copy_tree
  if ! "$bin/python" - "$work/root/$file" "$text" "$replacement" <<'PY'
import sys
path, old, new = sys.argv[1], sys.argv[2].replace("\\n", "\n"), sys.argv[3].replace("\\n", "\n")
text = open(path).read()
if old not in text:
    sys.exit(f"mutation text not found in {path}: {old!r}")
open(path, "w").write(text.replace(old, new, 1))
PY
  then
    echo "selftest: FAIL stale mutation for $check in $file"
    failed=$((failed + 1))
    continue
  fi
  if output=$(NORMSERVE_DEPLOY_ROOT="$work/root" "$repo/deploy/check.sh" "$check" 2>&1); then
    echo "selftest: FAIL $check accepted a broken $file ($expected)"
    failed=$((failed + 1))
  elif ! grep -qF -- "$expected" <<<"$output"; then
    echo "selftest: FAIL $check failed on $file without saying '$expected':"
    tail -n 5 <<<"$output" | sed 's/^/    /'
    failed=$((failed + 1))
  else
    passed=$((passed + 1))
  fi
done <<<"$mutations"
echo "selftest: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
