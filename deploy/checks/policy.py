"""Rules for normserve's deployment files that schemas cannot express.

Run by deploy/check.sh with the deploy-tools Python (PyYAML):

    policy.py ROOT RENDERED_DIR

ROOT is the repository (or a copy of it, for the self-test); RENDERED_DIR holds
`kubectl kustomize deploy/k8s/overlays/<mode>` as <mode>.yaml for every
overlay, and all.yaml: the redis overlay with every component added.
Every rule that fails prints one line `FAIL <area>: <what>`; the exit status
is 1 when any failed. Each rule is exercised by deploy/checks/selftest.sh,
which breaks it on purpose and expects this script to say so.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

# NORMSERVE_* variables whose flags are being added (issue 8) and are not yet
# in src/config.rs. Remove a name from here once config.rs has it; a typo in a
# manifest then fails instead of being silently ignored by the server.
PENDING_ENV: set[str] = set()
# Labels Prometheus adds to every series, and the histogram bucket label.
STANDARD_LABELS = {"instance", "job", "le"}
GRPC_PORT = 50051
# deploy/k8s/overlays: one `kubectl apply -k` per mode.
OVERLAYS = ("embedded", "gpu", "redis")

failures: list[str] = []


def fail(area: str, message: str) -> None:
    failures.append(f"FAIL {area}: {message}")


def check(condition: bool, area: str, message: str) -> bool:
    if not condition:
        fail(area, message)
    return condition


# ----------------------------------------------------------------- inputs


def known_env(root: Path) -> tuple[set[str], int]:
    """NORMSERVE_* names of src/config.rs (plus PENDING_ENV) and the default
    of --drain-seconds."""
    text = (root / "src/config.rs").read_text()
    names = set(re.findall(r'env\s*=\s*"(NORMSERVE_[A-Z0-9_]+)"', text))
    drain = re.search(
        r'env\s*=\s*"NORMSERVE_DRAIN_SECONDS"\s*,\s*default_value_t\s*=\s*(\d+)', text
    )
    if not check(bool(names), "config", "no NORMSERVE_* variables found in src/config.rs"):
        return PENDING_ENV, 10
    if not check(drain is not None, "config", "default of NORMSERVE_DRAIN_SECONDS not found in src/config.rs"):
        return names | PENDING_ENV, 10
    return names | PENDING_ENV, int(drain.group(1))


def load_metrics(root: Path) -> dict[str, tuple[str, set[str]]]:
    metrics = {}
    for line in (root / "deploy/checks/metrics.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        labels = set(parts[2].split(",")) if len(parts) > 2 else set()
        metrics[parts[0]] = (parts[1], labels)
    return metrics


def series_names(metrics: dict[str, tuple[str, set[str]]]) -> dict[str, str]:
    """Every series name a query may use -> its metric (histograms expose
    _bucket, _sum and _count)."""
    names = {}
    for name, (kind, _) in metrics.items():
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[name + suffix] = name
        else:
            names[name] = name
    return names


# ------------------------------------------------------------- Kubernetes


def pod_spec(doc: dict) -> dict | None:
    if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return doc["spec"]["template"]["spec"]
    if doc.get("kind") == "Pod":
        return doc["spec"]
    return None


def is_normserve(container: dict) -> bool:
    image = container.get("image", "")
    return image.split("/")[-1].split(":")[0] == "normserve"


def env_of(container: dict, config_maps: dict[str, dict]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first,
    then env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            env.update(config_maps.get(ref["name"], {}).get("data", {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def selector_matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_kubernetes(docs: list[dict], env_names: set[str], default_drain: int, area: str) -> None:
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    config_maps = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}
    services = {d["metadata"]["name"]: d for d in by_kind.get("Service", [])}
    pdbs = by_kind.get("PodDisruptionBudget", [])

    for cm in config_maps.values():
        for key in cm.get("data", {}):
            if key.startswith("NORMSERVE_"):
                check(key in env_names, area, f"ConfigMap {cm['metadata']['name']}: unknown variable {key}")

    workloads = [d for d in docs if pod_spec(d) is not None]
    check(not any(d["kind"] == "Secret" and (d.get("data") or d.get("stringData")) for d in docs), area,
          "a Secret with data is part of the manifests: secrets are created apart (deploy/README.md), never committed")
    for doc in workloads:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        spec = pod_spec(doc)
        pod_labels = doc["spec"]["template"]["metadata"].get("labels", {})
        pod_sc = spec.get("securityContext", {})
        check(spec.get("automountServiceAccountToken") is False, area, f"{name}: automountServiceAccountToken must be false")
        check(spec.get("enableServiceLinks") is False, area,
              f"{name}: enableServiceLinks must be false (Service env vars would share the NORMSERVE_ prefix)")
        check(pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", area, f"{name}: pod seccompProfile must be RuntimeDefault")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in doc["spec"].get("volumeClaimTemplates", [])}
        for container in spec.get("initContainers", []) + spec["containers"]:
            cname = f"{name} container {container['name']}"
            sc = container.get("securityContext", {})
            non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            check(non_root is True, area, f"{cname}: runAsNonRoot must be true")
            check(isinstance(uid, int) and uid > 0, area, f"{cname}: runAsUser must be a non-zero uid, got {uid!r}")
            check(sc.get("readOnlyRootFilesystem") is True, area, f"{cname}: readOnlyRootFilesystem must be true")
            check(sc.get("allowPrivilegeEscalation") is False, area, f"{cname}: allowPrivilegeEscalation must be false")
            check("ALL" in sc.get("capabilities", {}).get("drop", []), area, f"{cname}: capabilities must drop ALL")
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    check(res in resources.get(kind, {}), area, f"{cname}: resources.{kind}.{res} missing")
            image = container.get("image", "")
            tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
            check(tag not in ("", "latest"), area, f"{cname}: image {image!r} needs a pinned tag")
            for mount in container.get("volumeMounts", []):
                check(mount["name"] in volumes or mount["name"] in claims, area,
                      f"{cname}: volumeMount {mount['name']} has no volume or claim template")
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef")
                if ref:
                    check(ref["name"] in config_maps, area, f"{cname}: envFrom ConfigMap {ref['name']} is not defined")
            check(container.get("livenessProbe") is not None, area, f"{cname}: no livenessProbe")
            check(container.get("readinessProbe") is not None, area, f"{cname}: no readinessProbe")
            if not is_normserve(container):
                continue
            check_normserve_container(doc, container, cname, env_of(container, config_maps), env_names,
                                      default_drain, volumes, claims, services, area)
        # A PodDisruptionBudget must cover every normserve pod.
        if any(is_normserve(c) for c in spec["containers"]):
            covered = [p for p in pdbs if selector_matches(p["spec"]["selector"].get("matchLabels", {}), pod_labels)]
            check(bool(covered), area, f"{name}: no PodDisruptionBudget selects its pods")

    # Every Service reaches pods, on ports those pods declare.
    for svc in services.values():
        sname = f"Service/{svc['metadata']['name']}"
        selector = svc["spec"].get("selector", {})
        targets = [d for d in workloads
                   if selector_matches(selector, d["spec"]["template"]["metadata"].get("labels", {}))]
        if not check(bool(targets), area, f"{sname}: selector {selector} matches no workload"):
            continue
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in targets:
                declared = {(p.get("name"), p["containerPort"]) for c in pod_spec(workload)["containers"] for p in c.get("ports", [])}
                ok = any(target in (n, n_port) for n, n_port in declared)
                check(ok, area, f"{sname}: targetPort {target} not declared by {workload['kind']}/{workload['metadata']['name']}")


def check_normserve_container(doc, container, cname, env, env_names, default_drain, volumes, claims, services, area):
    spec = pod_spec(doc)
    for item in container.get("env", []):
        if item["name"].startswith("NORMSERVE_"):
            check(item["name"] in env_names, area, f"{cname}: unknown variable {item['name']}")
    listen = env.get("NORMSERVE_LISTEN", "127.0.0.1:50051")
    check(listen == f"0.0.0.0:{GRPC_PORT}", area, f"{cname}: NORMSERVE_LISTEN must be 0.0.0.0:{GRPC_PORT}, got {listen}")
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    check(ports.get("grpc") == GRPC_PORT, area, f"{cname}: needs a container port named grpc = {GRPC_PORT}")
    metrics_addr = env.get("NORMSERVE_METRICS_ADDR", "")
    if check(metrics_addr.startswith("0.0.0.0:"), area, f"{cname}: NORMSERVE_METRICS_ADDR must listen on 0.0.0.0, got {metrics_addr!r}"):
        metrics_port = int(metrics_addr.rsplit(":", 1)[1])
        check(ports.get("metrics") == metrics_port, area, f"{cname}: container port 'metrics' must be {metrics_port}")
        annotations = doc["spec"]["template"]["metadata"].get("annotations", {})
        check(annotations.get("prometheus.io/port") == str(metrics_port), area,
              f"{cname}: prometheus.io/port annotation must be {metrics_port}")
    # Native gRPC probes on the serving port.
    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(probe_name) or {}
        check(probe.get("grpc", {}).get("port") == GRPC_PORT, area, f"{cname}: {probe_name} must be a grpc probe on port {GRPC_PORT}")
    # The kubelet's SIGKILL must come after the preStop sleep and the drain.
    drain = int(env.get("NORMSERVE_DRAIN_SECONDS", default_drain))
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    check(grace > drain + pre_stop, area,
          f"{cname}: terminationGracePeriodSeconds {grace} must exceed preStop sleep {pre_stop} + drain {drain}")
    store = env.get("NORMSERVE_STORE", "embedded")
    data_dir = env.get("NORMSERVE_DATA_DIR", "data")
    if doc["kind"] == "Deployment":
        if check(store.startswith(("redis://", "rediss://")), area, f"{cname}: a Deployment's replicas must share a Redis store, got {store}"):
            host = re.sub(r"^rediss?://(?:[^@/]*@)?", "", store).split("/")[0].split(":")[0]
            check(host in services or "." in host, area, f"{cname}: Redis host {host} is no Service of these manifests")
    if doc["kind"] == "StatefulSet" and store == "embedded":
        check(doc["spec"].get("replicas", 1) == 1, area, f"{cname}: the embedded store allows exactly one replica")
        mounts = {m["mountPath"].rstrip("/"): m["name"] for m in container.get("volumeMounts", [])}
        check(mounts.get(data_dir.rstrip("/")) in claims, area,
              f"{cname}: NORMSERVE_DATA_DIR {data_dir} must be mounted from a volumeClaimTemplate")
    if store == "embedded" and doc["kind"] != "StatefulSet":
        fail(area, f"{cname}: the embedded store needs a StatefulSet with a PersistentVolumeClaim")


def check_gpu(docs: list[dict], area: str, expected: int) -> None:
    seen = 0
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        for container in spec["containers"]:
            if not is_normserve(container):
                continue
            seen += 1
            cname = f"{doc['kind']}/{doc['metadata']['name']} container {container['name']}"
            limits = container.get("resources", {}).get("limits", {})
            check(str(limits.get("nvidia.com/gpu")) == "1", area, f"{cname}: needs limits nvidia.com/gpu: 1")
            check(container["image"].endswith(":cuda"), area, f"{cname}: must run the CUDA image, got {container['image']}")
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            check(env.get("NORMSERVE_DEVICE", "").startswith("cuda"), area, f"{cname}: NORMSERVE_DEVICE must be cuda")
    check(seen == expected, area, f"expected {expected} normserve workload(s) on GPUs, found {seen}")


# ------------------------------------------------------------------ modes


def normserve_workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if pod_spec(d) is not None and any(is_normserve(c) for c in pod_spec(d)["containers"])]


def template_labels(doc: dict) -> dict:
    return doc["spec"]["template"]["metadata"].get("labels", {})


def secret_env(container: dict) -> dict[str, tuple[str, str]]:
    """Variables of the container taken from a Secret: name -> (secret, key)."""
    found = {}
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            found[item["name"]] = (ref.get("name"), ref.get("key"))
    return found


def check_embedded_mode(docs: list[dict], area: str) -> None:
    """One normserve, a StatefulSet on the embedded store; nothing of Redis."""
    workloads = normserve_workloads(docs)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in workloads)
    if check(len(workloads) == 1 and workloads[0]["kind"] == "StatefulSet", area,
             f"expected one normserve StatefulSet, found {kinds}"):
        container = next(c for c in pod_spec(workloads[0])["containers"] if is_normserve(c))
        store = {e["name"]: e.get("value") for e in container.get("env", [])}.get("NORMSERVE_STORE", "embedded")
        check(store == "embedded", area, f"the embedded overlay must use the embedded store, got {store}")
    others = [f"{d['kind']}/{d['metadata']['name']}" for d in docs
              if d["kind"] in ("HorizontalPodAutoscaler", "Deployment") or "redis" in d["metadata"]["name"]]
    check(not others, area, f"the embedded overlay must not deploy {others}")


def check_redis_mode(docs: list[dict], area: str) -> None:
    """Replicas on Redis: the password comes from a Secret on both sides, only
    normserve pods reach Redis, and an HPA owns the replica count."""
    workloads = normserve_workloads(docs)
    deployments = [d for d in workloads if d["kind"] == "Deployment"]
    check(len(deployments) == 1 and len(workloads) == 1, area,
          f"expected one normserve Deployment, found {sorted(d['kind'] + '/' + d['metadata']['name'] for d in workloads)}")
    redis_pods = [d for d in docs if pod_spec(d) is not None
                  and any(c.get("image", "").split("/")[-1].startswith("redis:") or "/redis@" in c.get("image", "")
                          for c in pod_spec(d)["containers"])]
    if not check(len(redis_pods) == 1, area, f"expected one Redis workload, found {len(redis_pods)}"):
        return
    redis = redis_pods[0]
    redis_container = next(c for c in pod_spec(redis)["containers"] if "redis" in c.get("image", ""))
    redis_name = f"{redis['kind']}/{redis['metadata']['name']}"
    args = [str(a) for a in redis_container.get("args", []) + redis_container.get("command", [])]
    password_source = None
    if "--requirepass" in args and args.index("--requirepass") + 1 < len(args):
        value = args[args.index("--requirepass") + 1]
        ref = re.fullmatch(r"\$\((\w+)\)", value)
        password_source = secret_env(redis_container).get(ref.group(1)) if ref else None
    check(password_source is not None, area,
          f"{redis_name}: Redis must require the password (--requirepass $(VAR), VAR from a Secret)")
    check(secret_env(redis_container).get("REDISCLI_AUTH") == password_source, area,
          f"{redis_name}: REDISCLI_AUTH must come from the same Secret key, or its redis-cli probes fail")

    for doc in deployments:
        container = next(c for c in pod_spec(doc)["containers"] if is_normserve(c))
        cname = f"{doc['kind']}/{doc['metadata']['name']} container {container['name']}"
        store = {e["name"]: e.get("value") for e in container.get("env", [])}.get("NORMSERVE_STORE", "")
        userinfo = re.match(r"^rediss?://([^@/]*)@", store)
        ref = re.fullmatch(r":\$\((\w+)\)", userinfo.group(1)) if userinfo else None
        check(ref is not None and secret_env(container).get(ref.group(1)) is not None, area,
              f"{cname}: the Redis password must come from a Secret: NORMSERVE_STORE redis://:$(VAR)@host..., got {store!r}")
        if ref is not None and password_source is not None:
            check(secret_env(container).get(ref.group(1)) == password_source, area,
                  f"{cname}: the store URL's password and Redis's --requirepass come from different Secret keys")
        check("replicas" not in doc["spec"], area,
              f"{cname}: spec.replicas is managed by the HorizontalPodAutoscaler; a fixed count resets it on every apply")
        hpas = [h for h in docs if h["kind"] == "HorizontalPodAutoscaler"
                and h["spec"]["scaleTargetRef"].get("kind") == "Deployment"
                and h["spec"]["scaleTargetRef"].get("name") == doc["metadata"]["name"]]
        if check(len(hpas) == 1, area, f"{cname}: no HorizontalPodAutoscaler scales Deployment/{doc['metadata']['name']}"):
            spec = hpas[0]["spec"]
            check(spec.get("minReplicas", 1) >= 2, area,
                  f"HorizontalPodAutoscaler/{hpas[0]['metadata']['name']}: minReplicas must be at least 2 (one serves while the PDB lets one go)")
            check(spec.get("maxReplicas", 0) >= spec.get("minReplicas", 1), area, "HorizontalPodAutoscaler: maxReplicas below minReplicas")
            check(bool(spec.get("metrics")), area, "HorizontalPodAutoscaler: no metrics")

    # NetworkPolicy: Redis's pods admit normserve pods only, on Redis's port.
    labels = template_labels(redis)
    ports = {p["containerPort"] for p in redis_container.get("ports", [])} | {p.get("name") for p in redis_container.get("ports", [])}
    policies = [n for n in docs if n["kind"] == "NetworkPolicy"
                and selector_matches(n["spec"].get("podSelector", {}).get("matchLabels", {}), labels)]
    if not check(bool(policies), area, f"no NetworkPolicy selects the Redis pods ({labels})"):
        return
    normserve_labels = [template_labels(d) for d in workloads]
    for policy in policies:
        pname = f"NetworkPolicy/{policy['metadata']['name']}"
        check("Ingress" in policy["spec"].get("policyTypes", []), area, f"{pname}: policyTypes must include Ingress")
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from", [])
            ok = bool(peers) and all(set(peer) == {"podSelector"} for peer in peers)
            ok = ok and all(
                any(selector_matches(peer["podSelector"].get("matchLabels", {}), l) for l in normserve_labels)
                and not selector_matches(peer["podSelector"].get("matchLabels", {}), labels)
                for peer in peers)
            check(ok, area, f"{pname}: an ingress rule admits more than normserve pods: {peers}")
            rule_ports = rule.get("ports", [])
            check(bool(rule_ports) and all(p.get("port") in ports for p in rule_ports), area,
                  f"{pname}: an ingress rule must name Redis's port only, got {rule_ports}")


def check_pod_monitors(docs: list[dict], area: str) -> None:
    monitors = [d for d in docs if d["kind"] == "PodMonitor"]
    if not check(bool(monitors), area, "no PodMonitor (components/prometheus-operator)"):
        return
    workloads = normserve_workloads(docs)
    for monitor in monitors:
        mname = f"PodMonitor/{monitor['metadata']['name']}"
        selector = monitor["spec"].get("selector", {}).get("matchLabels", {})
        for doc in workloads:
            name = f"{doc['kind']}/{doc['metadata']['name']}"
            check(selector_matches(selector, template_labels(doc)), area, f"{mname}: selector {selector} misses {name}")
            declared = {p.get("name") for c in pod_spec(doc)["containers"] if is_normserve(c) for p in c.get("ports", [])}
            for endpoint in monitor["spec"].get("podMetricsEndpoints", []):
                check(endpoint.get("port") in declared, area, f"{mname}: port {endpoint.get('port')} not declared by {name}")
                check(endpoint.get("path", "/metrics") == "/metrics", area, f"{mname}: path must be /metrics")


# ------------------------------------------------------------------ images

DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def image_references(root: Path, docs: list[dict]) -> dict[str, str]:
    """Every third-party image reference -> where it is used."""
    found: dict[str, str] = {}
    for name in ("Dockerfile", "Dockerfile.cuda"):
        for arg, value in re.findall(r"^ARG (\w+_IMAGE)=(\S+)", (root / "deploy" / name).read_text(), re.M):
            found[value] = f"deploy/{name} ARG {arg}"
    for doc in docs:
        spec = pod_spec(doc)
        for container in (spec or {}).get("containers", []) + (spec or {}).get("initContainers", []):
            if not is_normserve(container):
                found[container["image"]] = f"deploy/k8s {doc['kind']}/{doc['metadata']['name']}"
    compose = yaml.safe_load((root / "deploy/compose.yaml").read_text())
    for name, svc in compose.get("services", {}).items():
        image = svc.get("image", "")
        if image and image.split("/")[-1].split(":")[0] != "normserve" and "${" not in image:
            found[image] = f"deploy/compose.yaml service {name}"
    return found


def check_images(root: Path, docs: list[dict]) -> None:
    """Base and third-party images are pinned by digest, or named in
    checks/unpinned-images.txt (with the reason a digest could not be had)."""
    area = "images"
    listed = set()
    for line in (root / "deploy/checks/unpinned-images.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            listed.add(line)
    used = image_references(root, docs)
    for image, where in sorted(used.items()):
        if DIGEST.search(image):
            check(image.split("@")[0] not in listed, area, f"{image} is pinned: remove it from checks/unpinned-images.txt")
            continue
        check(":" in image.split("/")[-1] and not image.endswith(":latest"), area, f"{where}: {image} needs a version tag")
        check(image in listed, area,
              f"{where}: {image} is not pinned by digest (image@sha256:...; scripts/pin-image-digests.sh) "
              "nor listed in deploy/checks/unpinned-images.txt")
    for image in sorted(listed - {u.split("@")[0] for u in used}):
        fail(area, f"checks/unpinned-images.txt lists {image}, which nothing uses")


# ------------------------------------------------------------------ compose


def parse_duration(value: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(value)):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def check_compose(root: Path, env_names: set[str], default_drain: int) -> set[str]:
    """Returns the host:port targets Prometheus must scrape."""
    area = "compose"
    deploy = root / "deploy"
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())
    services = compose.get("services", {})
    volumes = set((compose.get("volumes") or {}).keys())
    targets = set()
    stores = set()
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            check(dep in services, area, f"{name}: depends_on unknown service {dep}")
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0] if isinstance(mount, str) else mount.get("source", "")
            if source.startswith((".", "/")):
                check((deploy / source).exists(), area, f"{name}: bind mount source {source} does not exist")
            elif source:
                check(source in volumes, area, f"{name}: named volume {source} is not declared")
        check(svc.get("read_only") is True or "grafana" in svc.get("profiles", []), area, f"{name}: read_only must be true")
        check("ALL" in svc.get("cap_drop", []), area, f"{name}: cap_drop must include ALL")
        check("no-new-privileges:true" in svc.get("security_opt", []), area, f"{name}: needs security_opt no-new-privileges:true")
        image = svc.get("image", "")
        if image.split("/")[-1].split(":")[0] != "normserve":
            continue
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        for key in env:
            if key.startswith("NORMSERVE_"):
                check(key in env_names, area, f"{name}: unknown variable {key}")
        user = str(svc.get("user", "0")).split(":")[0]
        check(user.isdigit() and int(user) > 0, area, f"{name}: user must be a non-root uid, got {svc.get('user')!r}")
        check(env.get("NORMSERVE_LISTEN", "").startswith("0.0.0.0:"), area, f"{name}: NORMSERVE_LISTEN must be 0.0.0.0:PORT")
        store = env.get("NORMSERVE_STORE", "embedded")
        stores.add(store)
        host = re.sub(r"^rediss?://(?:[^@/]*@)?", "", store).split("/")[0].split(":")[0]
        check(store.startswith("redis://") and host in services, area, f"{name}: NORMSERVE_STORE must be a redis:// URL of a compose service, got {store}")
        check(host in svc.get("depends_on", {}), area, f"{name}: must depend on its Redis service {host}")
        test = " ".join(svc.get("healthcheck", {}).get("test", []))
        # normserve-ctl: the health probe without libtorch (milliseconds and a
        # few MiB per check, not the server binary's half second and ~460 MiB).
        check(re.search(r"/normserve-ctl health --addr 127\.0\.0\.1:\d+", test) is not None, area,
              f"{name}: healthcheck must run `normserve-ctl health --addr 127.0.0.1:PORT`, got {test!r}")
        drain = int(env.get("NORMSERVE_DRAIN_SECONDS", default_drain))
        grace = parse_duration(svc.get("stop_grace_period", "10s"))
        check(grace > drain, area, f"{name}: stop_grace_period {grace:g}s must exceed the drain ({drain}s)")
        metrics = env.get("NORMSERVE_METRICS_ADDR", "")
        if check(metrics.startswith("0.0.0.0:"), area, f"{name}: NORMSERVE_METRICS_ADDR must be 0.0.0.0:PORT"):
            targets.add(f"{name}:{metrics.rsplit(':', 1)[1]}")
    check(len(targets) >= 2, area, f"expected two normserve replicas, found {len(targets)}")
    check(len(stores) == 1, area, f"the replicas must share one store, found {sorted(stores)}")
    for store in stores:
        host = re.sub(r"^rediss?://", "", store).split("/")[0].split(":")[0]
        command = " ".join(str(c) for c in services.get(host, {}).get("command", []))
        check("--appendonly yes" in command and "--appendfsync always" in command, area,
              f"{host}: Redis must run with --appendonly yes --appendfsync always, got {command!r}")
    return targets


def check_prometheus(root: Path, targets: set[str]) -> None:
    area = "prometheus"
    config = yaml.safe_load((root / "deploy/prometheus/prometheus.yml").read_text())
    jobs = [j for j in config.get("scrape_configs", []) if j.get("job_name") == "normserve"]
    if not check(len(jobs) == 1, area, "needs exactly one scrape job named normserve"):
        return
    job = jobs[0]
    check(job.get("metrics_path", "/metrics") == "/metrics", area, "metrics_path must be /metrics")
    scraped = {t for sc in job.get("static_configs", []) for t in sc.get("targets", [])}
    check(scraped == targets, area, f"scrapes {sorted(scraped)}, compose runs {sorted(targets)}")


# --------------------------------------------------------------- Dockerfiles


def dockerfile_stages(text: str) -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped) per stage."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    stages: list[list[str]] = [[]]
    for line in text.splitlines():
        line = " ".join(line.split())
        if not line:
            continue
        if line.upper().startswith("FROM ") and stages[-1] and any(l.upper().startswith("FROM ") for l in stages[-1]):
            stages.append([])
        stages[-1].append(line)
    return stages


def check_dockerfile(root: Path, name: str, torch_pin: str, rust_version: tuple[int, ...]) -> None:
    area = f"deploy/{name}"
    text = (root / "deploy" / name).read_text()
    stages = dockerfile_stages(text)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(l for s in stages for l in s), re.M))
    if not check(len(stages) >= 2, area, "needs a build stage and a runtime stage"):
        return
    build, runtime = stages[0], stages[-1]
    check(args.get("TORCH_VERSION") == torch_pin, area,
          f"TORCH_VERSION {args.get('TORCH_VERSION')} differs from scripts/requirements.txt (torch=={torch_pin})")
    rust_tag = re.search(r"rust:(\d+(?:\.\d+)*)", args.get("RUST_IMAGE", ""))
    if check(rust_tag is not None, area, "RUST_IMAGE must be a versioned rust image"):
        tag = tuple(int(x) for x in rust_tag.group(1).split("."))
        check(tag >= rust_version[: len(tag)], area, f"rust {rust_tag.group(1)} is older than Cargo.toml's rust-version")
    index = args.get("TORCH_INDEX_URL", "")
    if name.endswith(".cuda"):
        check(index == "https://pypi.org/simple", area, "the CUDA image takes the default (CUDA) wheel from PyPI")
        check(any("NVIDIA_VISIBLE_DEVICES" in l for l in runtime), area, "runtime stage must set NVIDIA_VISIBLE_DEVICES")
    else:
        check(index.endswith("/whl/cpu"), area, "the CPU image takes the CPU-only wheel")
    libtorch = next((l.split("=", 1)[1] for l in build if l.startswith("ENV LIBTORCH=")), None)
    if check(libtorch is not None, area, "build stage must set ENV LIBTORCH"):
        # The binary's RUNPATH is $LIBTORCH/lib: the runtime stage must have
        # the libraries at exactly that path.
        check(any(f"cp -a {libtorch}/lib /staging{libtorch}/lib" in l for l in build), area,
              f"build stage must stage {libtorch}/lib at /staging{libtorch}/lib")
        copied = [m.groups() for l in runtime for m in [re.match(r"COPY --from=build(?: --chown=\S+)? (\S+) (\S+)$", l)] if m]
        covered = any(src.rstrip("/") == "/staging" + dst.rstrip("/") and (libtorch + "/lib").startswith(dst.rstrip("/") + "/")
                      for src, dst in copied)
        check(covered, area, f"runtime stage must copy /staging{libtorch}/lib to {libtorch}/lib (the binary's RUNPATH)")
    # The release profile keeps line tables (~117 MB) for local profiling and
    # backtraces; images ship the binary without them.
    for binary in ("normserve", "normserve-ctl"):
        staged = f"/staging/usr/local/bin/{binary}"
        check(any(re.search(rf"\b(strip|objcopy) --strip-debug\b[^&]*{re.escape(staged)}(?![-\w])", l) for l in build), area,
              f"build stage must strip debug info from the staged binary (strip --strip-debug {staged})")
    from_line = runtime[0]
    check("rust" not in from_line.lower() and "RUNTIME_IMAGE" in from_line, area, f"runtime stage must start from RUNTIME_IMAGE: {from_line}")
    check(args.get("RUNTIME_IMAGE", "").split("@")[0].endswith("-slim"), area, "RUNTIME_IMAGE must be a slim image")
    compilers = re.compile(r"\b(gcc|g\+\+|clang|cc|cargo|rustc|rustup|build-essential|python3?|pip3?)\b")
    for line in runtime:
        if line.startswith("RUN ") and "apt-get install" in line:
            check(compilers.search(line.split("apt-get install", 1)[1]) is None, area, f"runtime stage installs a toolchain: {line}")
    users = [l.split()[1] for l in runtime if l.startswith("USER ")]
    if check(bool(users), area, "runtime stage has no USER"):
        uid = users[-1].split(":")[0]
        check(uid.isdigit() and int(uid) > 0, area, f"runtime USER must be a numeric non-root uid, got {users[-1]}")
    health = " ".join(l for l in runtime if l.startswith("HEALTHCHECK"))
    # The probe without libtorch, copied into the image from the build stage.
    check(re.search(r'/normserve-ctl", "health", "--addr", "127\.0\.0\.1:50051"', health) is not None,
          area, "HEALTHCHECK must run `normserve-ctl health --addr 127.0.0.1:50051` (the probe without libtorch)")
    check(any(re.match(r"COPY --from=build(?: --chown=\S+)? /staging/usr/local/bin/normserve-ctl /usr/local/bin/normserve-ctl$", l)
              for l in runtime), area, "runtime stage must copy the health probe /usr/local/bin/normserve-ctl")
    env_line = " ".join(l for l in runtime if l.startswith("ENV "))
    check(f"NORMSERVE_LISTEN=0.0.0.0:{GRPC_PORT}" in env_line, area, f"runtime must set NORMSERVE_LISTEN=0.0.0.0:{GRPC_PORT}")
    check(any(l.startswith("EXPOSE ") and str(GRPC_PORT) in l.split() for l in runtime), area, f"runtime must EXPOSE {GRPC_PORT}")
    check(any(l.startswith('RUN ["/usr/local/bin/normserve", "--version"]') for l in runtime), area,
          "runtime stage must run the binary once (proves its libraries are all there)")


def check_dockerignore(root: Path) -> None:
    entries = {l.strip().rstrip("/").lstrip("/") for l in (root / ".dockerignore").read_text().splitlines()}
    for needed in ("target", "data", ".git"):
        check(needed in entries, ".dockerignore", f"must exclude {needed}")


# ----------------------------------------------------------------- Grafana


def check_dashboard(root: Path, metrics: dict[str, tuple[str, set[str]]]) -> None:
    area = "grafana"
    path = root / "deploy/grafana/normserve-dashboard.json"
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        fail(area, f"{path.name} is not JSON: {error}")
        return
    names = series_names(metrics)
    check(bool(dash.get("uid")) and bool(dash.get("title")), area, "dashboard needs a uid and a title")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds_var = variables.get("datasource", {})
    check(ds_var.get("type") == "datasource" and ds_var.get("query") == "prometheus", area,
          "needs a datasource variable of type prometheus (importable into any Grafana)")
    panels = []
    for panel in dash.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    ids = [p.get("id") for p in panels]
    check(len(ids) == len(set(ids)) and None not in ids, area, "panel ids must be unique")
    used: set[str] = set()
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        title = panel.get("title", "?")
        pos = panel.get("gridPos", {})
        if check(all(k in pos for k in "hwxy"), area, f"panel {title!r}: gridPos incomplete"):
            check(pos["x"] + pos["w"] <= 24, area, f"panel {title!r}: wider than the grid")
            for dx in range(pos["w"]):
                for dy in range(pos["h"]):
                    cell = (pos["x"] + dx, pos["y"] + dy)
                    if cell in cells:
                        fail(area, f"panel {title!r} overlaps {cells[cell]!r}")
                        break
                    cells[cell] = title
                else:
                    continue
                break
        if panel.get("type") == "row":
            continue
        check(panel.get("datasource", {}).get("uid") == "${datasource}", area, f"panel {title!r}: datasource must be ${{datasource}}")
        targets = panel.get("targets", [])
        check(bool(targets), area, f"panel {title!r}: no queries")
        for target in targets:
            expr = target.get("expr", "")
            found = set(re.findall(r"\bnormserve_[a-z0-9_]+", expr))
            check(bool(found), area, f"panel {title!r}: query uses no normserve metric: {expr}")
            labels: set[str] = set(STANDARD_LABELS)
            for series in found:
                if check(series in names, area, f"panel {title!r}: unknown metric {series}"):
                    used.add(names[series])
                    labels |= metrics[names[series]][1]
            for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
                for label in filter(None, (l.strip() for l in group.split(","))):
                    check(label in labels, area, f"panel {title!r}: groups by {label}, which {sorted(found)} do not have")
            for label in re.findall(r"[{,]\s*([a-z_]+)\s*(?:=|!=|=~|!~)", expr):
                check(label in labels, area, f"panel {title!r}: filters on {label}, which {sorted(found)} do not have")
    for metric in metrics:
        check(metric in used, area, f"no panel shows {metric}")


def check_metrics_in_source(root: Path, metrics: dict[str, tuple[str, set[str]]]) -> None:
    """Once src/ defines the metrics, it must define every listed one."""
    source = "\n".join(p.read_text() for p in (root / "src").rglob("*.rs"))
    defined = [m for m in metrics if m in source]
    if not defined:
        print("policy: note: src/ defines no normserve_* metric yet; metrics.txt is not compared with src/")
        return
    for metric in metrics:
        check(metric in source, "metrics", f"{metric} is listed in deploy/checks/metrics.txt but not in src/")


# --------------------------------------------------------------------- main


def main() -> int:
    root, rendered = Path(sys.argv[1]), Path(sys.argv[2])
    env_names, default_drain = known_env(root)
    torch_pin = re.search(r"^torch==(\S+)", (root / "scripts/requirements.txt").read_text(), re.M)
    rust_version = re.search(r'^rust-version\s*=\s*"([\d.]+)"', (root / "Cargo.toml").read_text(), re.M)
    metrics = load_metrics(root)

    overlays = sorted(p.name for p in (root / "deploy/k8s/overlays").iterdir() if p.is_dir())
    check(overlays == list(OVERLAYS), "k8s", f"expected the overlays {list(OVERLAYS)}, found {overlays}")
    check(not (root / "deploy/k8s/kustomization.yaml").exists(), "k8s",
          "deploy/k8s/kustomization.yaml would deploy several modes at once: one overlay per mode")
    rendered_docs = {}
    for name in OVERLAYS + ("all",):
        rendered_docs[name] = [d for d in yaml.safe_load_all((rendered / f"{name}.yaml").read_text()) if d]
        check_kubernetes(rendered_docs[name], env_names, default_drain, f"k8s/{name}")
    check_embedded_mode(rendered_docs["embedded"], "k8s/embedded")
    check_embedded_mode(rendered_docs["gpu"], "k8s/gpu")
    check_gpu(rendered_docs["gpu"], "k8s/gpu", 1)
    check_redis_mode(rendered_docs["redis"], "k8s/redis")
    check_redis_mode(rendered_docs["all"], "k8s/all")
    check_gpu(rendered_docs["all"], "k8s/all", 1)
    check_pod_monitors(rendered_docs["all"], "k8s/all")
    check_images(root, [d for docs in rendered_docs.values() for d in docs])
    targets = check_compose(root, env_names, default_drain)
    check_prometheus(root, targets)
    if check(torch_pin is not None and rust_version is not None, "versions", "torch pin or rust-version not found"):
        version = tuple(int(x) for x in rust_version.group(1).split("."))
        for name in ("Dockerfile", "Dockerfile.cuda"):
            check_dockerfile(root, name, torch_pin.group(1), version)
    check_dockerignore(root)
    check_dashboard(root, metrics)
    check_metrics_in_source(root, metrics)

    pending = sorted(n for n in PENDING_ENV if n not in (root / "src/config.rs").read_text())
    if pending:
        print(f"policy: note: accepted before src/config.rs has them: {', '.join(pending)}")
    for line in failures:
        print(line)
    print(f"policy: {len(failures)} rule(s) failed" if failures else "policy: all rules hold")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
