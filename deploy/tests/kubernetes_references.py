"""Cross-references in a rendered Kubernetes deployment (one multi-document YAML file), the
part no schema checks: every name an object uses names an object that is there, and every
selector selects what it is meant to.

usage: kubernetes_references.py RENDERED.yaml

Prints one problem per line and exits 1 if there are any; else prints, as JSON, the command
lines of the containers that run Ladder's image (for the caller to check their flags against
the binaries).
"""
import json
import re
import sys

import yaml

WORKLOADS = {"StatefulSet", "Deployment", "DaemonSet"}


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def main(path):
    with open(path) as f:
        objects = [o for o in yaml.safe_load_all(f) if o]
    problems = []
    by_kind = {}
    for o in objects:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    secrets = by_kind.get("Secret", {})
    services = by_kind.get("Service", {})
    claims = by_kind.get("PersistentVolumeClaim", {})

    pods = []  # (workload name, kind, pod template)
    for kind in WORKLOADS:
        for name, w in by_kind.get(kind, {}).items():
            template = w["spec"]["template"]
            labels = template["metadata"].get("labels", {})
            if not selects(w["spec"]["selector"]["matchLabels"], labels):
                problems.append(f"{kind} {name}: its selector does not match its pod labels")
            pods.append((name, kind, w, template))

    commands = {}
    images = set()
    for name, kind, workload, template in pods:
        spec = template["spec"]
        where = f"{kind} {name}"
        claim_templates = workload["spec"].get("volumeClaimTemplates", [])
        if not isinstance(claim_templates, list):
            problems.append(f"{where}: volumeClaimTemplates is not a list")
            claim_templates = []
        templates = {t["metadata"]["name"] for t in claim_templates}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            secret = volume.get("secret")
            if secret:
                target = secrets.get(secret["secretName"])
                if target is None:
                    problems.append(f"{where}: volume {volume['name']} names no Secret {secret['secretName']}")
                else:
                    for item in secret.get("items", []):
                        if item["key"] not in target.get("data", {}):
                            problems.append(f"{where}: Secret {secret['secretName']} has no key {item['key']}")
            claim = volume.get("persistentVolumeClaim")
            if claim and claim["claimName"] not in claims:
                problems.append(f"{where}: volume {volume['name']} names no claim {claim['claimName']}")
        if kind == "StatefulSet":
            governing = services.get(workload["spec"]["serviceName"])
            if governing is None:
                problems.append(f"{where}: serviceName {workload['spec']['serviceName']} names no Service")
        for c in spec["containers"]:
            cwhere = f"{where} container {c['name']}"
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            env = {e["name"] for e in c.get("env", [])}
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and m["name"] not in templates:
                    problems.append(f"{cwhere}: mounts no volume {m['name']}")
            words = c.get("command", []) + c.get("args", [])
            for word in words:
                for var in re.findall(r"\$\((\w+)\)", word):
                    if var not in env:
                        problems.append(f"{cwhere}: $({var}) is not in its env")
            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(probe_name, {})
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    port = probe.get(handler, {}).get("port")
                    if isinstance(port, str) and port not in ports:
                        problems.append(f"{cwhere}: {probe_name} uses no port {port}")
                if "exec" in probe:
                    commands.setdefault(f"{cwhere} {probe_name}", probe["exec"]["command"])
            # A ring host names a headless Service of this workload, published before readiness.
            for word in words:
                m = re.match(r"--ring-host=\$\(POD_NAME\)\.([\w-]+)\.", word)
                if m:
                    ring = services.get(m.group(1))
                    if ring is None or ring["spec"].get("clusterIP") != "None":
                        problems.append(f"{cwhere}: the ring's Service {m.group(1)} is not headless")
                    elif not ring["spec"].get("publishNotReadyAddresses"):
                        problems.append(f"{cwhere}: the ring's Service {m.group(1)} hides pods that are not ready")
                    if workload["spec"].get("serviceName") != m.group(1):
                        problems.append(f"{cwhere}: the ring's Service is not the StatefulSet's")
            if c["image"].split(":")[0].endswith("ladder"):
                commands[cwhere] = words
                images.add(c["image"])
            resources = c.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            if not ("cpu" in requests and "memory" in requests and "memory" in limits):
                problems.append(f"{cwhere}: requests no CPU and memory, or limits no memory")
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False or not sc.get("readOnlyRootFilesystem"):
                problems.append(f"{cwhere}: may escalate privileges or write its root file system")
        if not spec.get("securityContext", {}).get("runAsNonRoot"):
            problems.append(f"{where}: may run as root")

    # One Ladder image for every pod, as the flavour names it (a tag, not the bare name).
    if len(images) != 1 or ":" not in next(iter(images)):
        problems.append(f"Ladder's containers run {sorted(images)}: one tagged image expected")

    # Services select pods and reach named ports they have.
    for name, s in services.items():
        matched = [(n, t) for n, _, _, t in pods if selects(s["spec"].get("selector", {}), t["metadata"].get("labels", {}))]
        if not matched:
            problems.append(f"Service {name}: selects no pods")
        for port in s["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for n, t in matched:
                names = {p.get("name") for c in t["spec"]["containers"] for p in c.get("ports", [])}
                numbers = {p["containerPort"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
                if target not in names and target not in numbers:
                    problems.append(f"Service {name}: {n} has no port {target}")

    # Every pod is behind a network policy, and a policy's pods have the ports it admits.
    policies = by_kind.get("NetworkPolicy", {})
    for n, kind, _, t in pods:
        labels = t["metadata"].get("labels", {})
        if not any(selects(p["spec"]["podSelector"].get("matchLabels", {}), labels) for p in policies.values()):
            problems.append(f"{kind} {n}: no NetworkPolicy selects its pods")
    for n, kind, _, t in pods:
        labels = t["metadata"].get("labels", {})
        if not any("Egress" in p["spec"].get("policyTypes", []) and selects(p["spec"]["podSelector"].get("matchLabels", {}), labels) for p in policies.values()):
            problems.append(f"{kind} {n}: no NetworkPolicy limits where its pods may connect")
    for name, p in policies.items():
        for rule in p["spec"].get("egress", []):
            for peer in rule.get("to", []):
                sel = peer.get("podSelector", {}).get("matchLabels")
                if not sel:
                    continue
                targets = [t for _, _, _, t in pods if selects(sel, t["metadata"].get("labels", {}))]
                if not targets:
                    problems.append(f"NetworkPolicy {name}: lets its pods reach pods {sel} that do not exist")
                for port in rule.get("ports", []):
                    for t in targets:
                        numbers = {q["containerPort"] for c in t["spec"]["containers"] for q in c.get("ports", [])}
                        if isinstance(port["port"], int) and port["port"] not in numbers:
                            problems.append(f"NetworkPolicy {name}: the pods it reaches have no port {port['port']}")
    for name, p in policies.items():
        selected = [t for _, _, _, t in pods if selects(p["spec"]["podSelector"].get("matchLabels", {}), t["metadata"].get("labels", {}))]
        if not selected:
            problems.append(f"NetworkPolicy {name}: selects no pods")
        for rule in p["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                for t in selected:
                    names = {q.get("name") for c in t["spec"]["containers"] for q in c.get("ports", [])}
                    if isinstance(port["port"], str) and port["port"] not in names:
                        problems.append(f"NetworkPolicy {name}: its pods have no port {port['port']}")
            for peer in rule.get("from", []):
                sel = peer.get("podSelector", {}).get("matchLabels")
                if sel and not sel.get("ladder.io/client") and not any(
                        selects(sel, t["metadata"].get("labels", {})) for _, _, _, t in pods):
                    problems.append(f"NetworkPolicy {name}: admits pods {sel} that do not exist")

    if problems:
        print("\n".join(problems))
        sys.exit(1)
    print(json.dumps(commands))


if __name__ == "__main__":
    main(sys.argv[1])
