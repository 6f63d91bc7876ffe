"""Checks rendered Tandem manifests against the rules a platform team
expects (schema validation is kubernetes-validate's job; this is the rest).

Usage: check.py OVERLAY.yaml [--certificates CERT-MANAGER.yaml] [--extract DIR]

Prints one line per broken rule and exits 1 if any; prints the objects
checked and exits 0 otherwise. With --extract, also writes what Tandem's
processes will read, for the test to load with their own settings code:
DIR/coordinator.toml (the coordinator's file) and DIR/env.json (each
Tandem container's environment: the shared ConfigMap's keys and its own
literal values, by container).
"""

import json
import os
import sys

import yaml

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
# Tandem's own processes take the shared settings from this ConfigMap.
SHARED = "tandem"


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name_of(obj):
    return f"{obj['kind']}/{obj['metadata']['name']}"


def check_identities(objects, certificates, bad, problems):
    """Each service's name, ServiceAccount, certificate and the coordinator's
    expectations agree (a mismatch is PERMISSION_DENIED at every call)."""
    import tomllib

    if not certificates:
        return
    by_secret = {c["spec"]["secretName"]: c for c in certificates}
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    shared = config_maps.get(SHARED, {})
    prefix = None
    coordinator_toml = config_maps.get("tandem-coordinator", {}).get("coordinator.toml")
    if coordinator_toml is not None:
        prefix = tomllib.loads(coordinator_toml).get("authorization", {}).get("identity_prefix")
    for obj in objects:
        if obj["kind"] not in WORKLOADS:
            continue
        pod = obj["spec"]["template"]["spec"]
        sa = pod.get("serviceAccountName")
        secrets = [v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v]
        ids = [u for s in secrets if s in by_secret for u in by_secret[s]["spec"].get("uris", [])]
        if not ids:
            bad(obj, "mounts no certificate with a SPIFFE id")
            continue
        for uri in ids:
            if not uri.endswith(f"/sa/{sa}"):
                bad(obj, f"its certificate names {uri}, not its ServiceAccount {sa}")
            if prefix and not uri.startswith(prefix):
                bad(obj, f"its certificate {uri} is outside the coordinator's identity_prefix {prefix}")
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            service = env.get("TANDEM_SIDECAR_SERVICE")
            if service is not None and not all(u.endswith(f"/sa/{service}") for u in ids):
                bad(obj, f"its sidecar acts for {service!r} but its certificate names {ids}")
        if obj["metadata"]["name"] == "tandem-coordinator":
            for key in ("TANDEM_SIDECAR_COORDINATOR_IDENTITY", "TANDEM_CLI_COORDINATOR_IDENTITY"):
                if shared.get(key) not in ids:
                    problems.append(f"ConfigMap/{SHARED}: {key} is {shared.get(key)!r}, but the coordinator's certificate names {ids}")


def check(objects, certificates):
    problems = []

    def bad(obj, what):
        problems.append(f"{name_of(obj)}: {what}")

    kinds = {o["kind"] for o in objects}
    for need in ("ConfigMap", "NetworkPolicy", "ServiceAccount", "Service"):
        if need not in kinds:
            problems.append(f"no {need} rendered")
    secrets_issued = {c["spec"]["secretName"] for c in certificates}
    for c in certificates:
        spec = c["spec"]
        if spec.get("isCA"):
            continue
        if not any(u.startswith("spiffe://") for u in spec.get("uris", [])):
            bad(c, "names no SPIFFE id (spec.uris)")
        for usage in ("server auth", "client auth"):
            if usage not in spec.get("usages", []):
                bad(c, f"lacks the usage {usage!r}")
    service_accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    coordinator_policy = [
        o for o in objects
        if o["kind"] == "NetworkPolicy"
        and o["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "tandem-coordinator"
    ]
    if not coordinator_policy:
        problems.append("no NetworkPolicy selects the coordinator's pods")
    for policy in coordinator_policy:
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            # (No ports: every port, the gRPC one included.)
            if not ports or ports & {7400, "grpc"}:
                if not rule.get("from"):
                    bad(policy, "lets every pod reach the gRPC port: only sidecars and replicas may")
                for peer in rule.get("from", []):
                    labels = peer.get("podSelector", {}).get("matchLabels", {})
                    if "namespaceSelector" in peer or not (
                        labels.get("tandem.dev/sidecar") == "true"
                        or labels.get("app.kubernetes.io/name") == "tandem-coordinator"
                    ):
                        bad(policy, f"lets {peer} reach the gRPC port: only sidecars and replicas may")

    check_identities(objects, certificates, bad, problems)
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        for key in ("app.kubernetes.io/part-of",):
            if key not in labels:
                bad(obj, f"has no {key} label")
        if obj["kind"] not in WORKLOADS:
            continue
        if "app.kubernetes.io/name" not in labels:
            bad(obj, "has no app.kubernetes.io/name label")
        template = obj["spec"]["template"]
        pod = template["spec"]
        pod_labels = template["metadata"].get("labels", {})
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/part-of", "app.kubernetes.io/component"):
            if key not in pod_labels:
                bad(obj, f"pod template has no {key} label")
        ctx = pod.get("securityContext", {})
        if ctx.get("runAsNonRoot") is not True:
            bad(obj, "pod securityContext.runAsNonRoot is not true")
        if not ctx.get("runAsUser"):
            bad(obj, "pod securityContext.runAsUser is not a non-root uid")
        if not ctx.get("fsGroup"):
            bad(obj, "pod securityContext.fsGroup is not set (volumes would not be writable)")
        if ctx.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            bad(obj, "pod seccompProfile is not RuntimeDefault")
        if pod.get("enableServiceLinks") is not False:
            bad(obj, "enableServiceLinks is not false (TANDEM_* service links would be taken for settings)")
        sa = pod.get("serviceAccountName")
        if not sa or sa == "default":
            bad(obj, "runs as the default ServiceAccount")
        elif sa not in service_accounts:
            bad(obj, f"ServiceAccount {sa} is not rendered")
        if pod.get("automountServiceAccountToken") is not False:
            bad(obj, "mounts a ServiceAccount token it does not use")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        # (A StatefulSet's claim templates are volumes of its pods.)
        for t in obj["spec"].get("volumeClaimTemplates", []):
            volumes[t["metadata"]["name"]] = {"name": t["metadata"]["name"], "claimTemplate": t}
        read_write_once = [
            v for v in volumes.values()
            if "persistentVolumeClaim" in v
            and "ReadWriteOnce" in claims.get(v["persistentVolumeClaim"]["claimName"], {}).get("spec", {}).get("accessModes", [])
        ]
        if obj["kind"] == "Deployment" and read_write_once:
            if obj["spec"].get("strategy", {}).get("type") != "Recreate":
                bad(obj, "mounts a ReadWriteOnce volume but its strategy is not Recreate")
        for v in volumes.values():
            secret = v.get("secret", {}).get("secretName")
            if secret and certificates and secret not in secrets_issued:
                bad(obj, f"mounts Secret {secret}, which no Certificate issues")
        sidecars = [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
        plain_init = [c for c in pod.get("initContainers", []) if c.get("restartPolicy") != "Always"]
        for c in plain_init:
            if c["name"] == "sidecar":
                bad(obj, "its sidecar is an init container that does not keep running (restartPolicy: Always)")
        for c in pod.get("containers", []):
            if c["name"] == "sidecar":
                bad(obj, "its sidecar is a plain container: make it a native sidecar (an init container with restartPolicy: Always)")
        if sidecars and pod_labels.get("tandem.dev/sidecar") != "true":
            bad(obj, "carries a sidecar but not the label tandem.dev/sidecar: \"true\" (the NetworkPolicy would cut it off)")
        for c in pod.get("containers", []) + sidecars:
            where = f"container {c['name']}"
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe not in c:
                    bad(obj, f"{where} has no {probe}")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for what in ("cpu", "memory"):
                    if what not in res.get(kind, {}):
                        bad(obj, f"{where} has no {kind}.{what}")
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                bad(obj, f"{where} allows privilege escalation")
            if sc.get("readOnlyRootFilesystem") is not True:
                bad(obj, f"{where} has a writable root filesystem")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                bad(obj, f"{where} keeps capabilities (drop: [ALL])")
            image = c.get("image", "")
            if ":" not in image or image.endswith(":latest"):
                bad(obj, f"{where} image {image!r} is not pinned to a tag")
            args = c.get("args", [])
            tandem_process = args[:1] in (["coordinator"], ["sidecar"])
            if tandem_process and not any(
                e.get("configMapRef", {}).get("name") == SHARED for e in c.get("envFrom", [])
            ):
                bad(obj, f"{where} does not take the shared settings (envFrom the {SHARED} ConfigMap)")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    bad(obj, f"{where} mounts volume {m['name']}, which the pod does not have")
    return problems


def extract(objects, out):
    """Writes the coordinator's file and each Tandem container's environment."""
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    os.makedirs(out, exist_ok=True)
    coordinator = config_maps.get("tandem-coordinator", {}).get("coordinator.toml")
    if coordinator is not None:
        with open(os.path.join(out, "coordinator.toml"), "w") as f:
            f.write(coordinator)
    envs = {}
    for obj in objects:
        if obj["kind"] not in WORKLOADS:
            continue
        pod = obj["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            env = {}
            for e in c.get("envFrom", []):
                env.update(config_maps.get(e.get("configMapRef", {}).get("name"), {}))
            for e in c.get("env", []):
                # (Values from the downward API or Secrets get a stand-in.)
                env[e["name"]] = e.get("value", "postgres://from-a-secret/x" if "secretKeyRef" in e.get("valueFrom", {}) else "from-the-pod")
            if c.get("args", [])[:1] in (["coordinator"], ["sidecar"]):
                envs[f"{obj['metadata']['name']}/{c['name']}"] = {"args": c["args"], "env": env}
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(envs, f, indent=1, sort_keys=True)


def main(argv):
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    objects = load(argv[0])
    certificates = []
    rest = argv[1:]
    out = None
    while rest:
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag == "--certificates":
            certificates = [o for o in load(value) if o["kind"] == "Certificate"]
        elif flag == "--extract":
            out = value
        else:
            print(f"unknown flag {flag}", file=sys.stderr)
            return 2
    if out:
        extract(objects, out)
    problems = check(objects, certificates)
    for p in problems:
        print(p)
    if problems:
        return 1
    print(f"{len(objects)} objects follow the rules ({', '.join(sorted(name_of(o) for o in objects))})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
