"""The invariants of deploy/ that a schema cannot see: callout runs as a native sidecar with
gRPC health probes, locked-down containers, a grace period above its drain, scrape annotations
that match its config, and a config that parses, names only documented keys and keeps private
networks denied. Prints one "ok - ..." or "FAIL - ..." line per check, then "RESULT passed failed".

Usage: python check_manifests.py EXAMPLE_TOML MANIFEST.yaml...
"""
import ipaddress
import re
import sys
import tomllib

import yaml

results = []


def check(name, ok, why=""):
    results.append(bool(ok))
    print(f"ok - {name}" if ok else f"FAIL - {name}: {why}")
    return bool(ok)


def duration_seconds(text):
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)\b", text)
    if not parts or re.sub(r"[\d.\s]|ms|s|m|h", "", text):
        raise ValueError(f"{text!r} is not a duration this check reads")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, u in parts)


def documented_keys(example_text):
    """SECTION.KEY for every active or "# key = " line of callout.example.toml."""
    keys, section = set(), None
    for line in example_text.splitlines():
        line = line.strip()
        header = re.fullmatch(r"\[([a-z_.]+)\]", line)
        if header:
            section = header.group(1)
            continue
        key = re.match(r"^(?:# )?([a-z0-9_]+) = ", line)
        if key and section:
            keys.add(f"{section}.{key.group(1)}")
    return keys


def quantity_bytes(text):
    """A Kubernetes memory quantity ("256Mi", "1G", "1048576") in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+)([KMGT]i|[kMGT])?", str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a memory quantity this check reads")
    return int(match.group(1)) * units.get(match.group(2), 1)


def pod_specs(doc):
    kind = doc.get("kind")
    if kind == "Pod":
        return [(doc, doc.get("spec") or {})]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        template = (doc.get("spec") or {}).get("template") or {}
        return [(template, template.get("spec") or {})]
    return []


def main():
    example_path, files = sys.argv[1], sys.argv[2:]
    with open(example_path) as f:
        documented = documented_keys(f.read())
    docs = []
    for path in files:
        try:
            with open(path) as f:
                loaded = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            check(f"{path} parses as YAML", False, e)
            continue
        for doc in loaded:
            name = (doc.get("metadata") or {}).get("name") if isinstance(doc, dict) else None
            label = f"{path}: {doc.get('kind') if isinstance(doc, dict) else '?'}/{name}"
            check(f"{label} has apiVersion, kind, metadata.name",
                  isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind") and name,
                  "a Kubernetes object needs all three")
            if isinstance(doc, dict):
                docs.append((path, doc))

    # The config, from the ConfigMap that holds callout.toml.
    config = None
    config_maps = [d for _, d in docs if d.get("kind") == "ConfigMap" and "callout.toml" in (d.get("data") or {})]
    if check("a ConfigMap holds callout.toml", config_maps, "none found"):
        cm = config_maps[0]
        try:
            config = tomllib.loads(cm["data"]["callout.toml"])
            check("callout.toml parses as TOML", True)
        except tomllib.TOMLDecodeError as e:
            check("callout.toml parses as TOML", False, e)
    if config is not None:
        # Keys by their dotted path: [tenants.default] max_queued is tenants.default.max_queued.
        def flat(table, prefix):
            for k, v in table.items():
                yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
        used = {key for s, table in config.items() if isinstance(table, dict) for key in flat(table, f"{s}.")}
        sections = {s for s, v in config.items() if not isinstance(v, dict)}
        unknown = sorted((used - documented) | sections)
        check("callout.toml names only keys documented in callout.example.toml", not unknown, unknown)
        egress = config.get("egress", {})
        check("callout.toml sets egress.allow_private_networks = false",
              egress.get("allow_private_networks") is False, egress.get("allow_private_networks"))
    config = config or {}
    server, metrics = config.get("server", {}), config.get("metrics", {})
    listen = server.get("listen", "127.0.0.1:50051")
    metrics_listen = metrics.get("listen", "127.0.0.1:9464")

    pods = [(path, meta, spec) for path, d in docs for meta, spec in pod_specs(d)]
    sidecars = [(path, meta, spec, c) for path, meta, spec in pods for c in spec.get("initContainers") or []
                if c.get("name") == "callout"]
    if not check("a pod runs callout as an init container", sidecars, "no initContainer named callout"):
        return
    for path, meta, spec, callout in sidecars:
        where = f"{path}: callout"
        check(f"{where} is a native sidecar (restartPolicy: Always)", callout.get("restartPolicy") == "Always",
              callout.get("restartPolicy"))

        # Probes: gRPC health on the listen port, which the kubelet dials at the pod IP.
        port = None
        if listen.startswith("unix:"):
            check(f"{where} listens on TCP for the kubelet's gRPC probes", False, listen)
        else:
            host, _, port_text = listen.rpartition(":")
            port = int(port_text)
            host = host.strip("[]")
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
            check(f"{where} listens beyond loopback, where the kubelet's gRPC probes connect (pod IP)",
                  not loopback, listen)
            check(f"{where} requires a bearer token since it listens beyond loopback",
                  loopback or server.get("auth_token_file"), "server.auth_token_file is not set")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc = (callout.get(probe) or {}).get("grpc") or {}
            check(f"{where} {probe} is a gRPC health probe on the listen port {port}",
                  grpc and grpc.get("port") == port, callout.get(probe))
        ports = {p.get("containerPort") for p in callout.get("ports") or []}
        check(f"{where} declares its gRPC and metrics ports", {port, int(metrics_listen.rsplit(":", 1)[1])} <= ports,
              sorted(p for p in ports if p))

        # Locked down, with resources, every container of the pod.
        pod_nonroot = (spec.get("securityContext") or {}).get("runAsNonRoot") is True
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            sc = c.get("securityContext") or {}
            name = f"{path}: {c.get('name')}"
            check(f"{name} runs as non-root", sc.get("runAsNonRoot", pod_nonroot) is True, sc)
            check(f"{name} has a read-only root filesystem", sc.get("readOnlyRootFilesystem") is True, sc)
            check(f"{name} cannot escalate privileges", sc.get("allowPrivilegeEscalation") is False, sc)
            check(f"{name} drops ALL capabilities", "ALL" in ((sc.get("capabilities") or {}).get("drop") or []), sc)
            res = c.get("resources") or {}
            check(f"{name} sets cpu and memory requests and limits",
                  all(k in (res.get(kind) or {}) for kind in ("requests", "limits") for k in ("cpu", "memory")), res)

        # Memory: the budget for buffered bodies fits the container's limit (a budgeted byte
        # costs ~3.5 at the peak, so an eighth leaves half the limit for everything else).
        limit = ((callout.get("resources") or {}).get("limits") or {}).get("memory")
        budget = (config.get("limits") or {}).get("max_buffered_bytes")
        check(f"{where} sets limits.max_buffered_bytes to at most 1/8 of its memory limit {limit}",
              isinstance(budget, int) and limit and budget <= quantity_bytes(limit) // 8,
              f"limits.max_buffered_bytes = {budget}")

        # Shutdown: the grace period outlasts the drain.
        drain = duration_seconds(server.get("drain_timeout", "25s"))
        grace = spec.get("terminationGracePeriodSeconds", 30)
        check(f"{path}: terminationGracePeriodSeconds {grace} is above server.drain_timeout ({drain:g} s)",
              grace > drain, "the kubelet would kill callout mid-drain")

        # Mounts: config, secrets dir and token file come from the right volumes.
        volumes = {v.get("name"): v for v in spec.get("volumes") or []}
        mounts = {m.get("mountPath"): volumes.get(m.get("name"), {}) for m in callout.get("volumeMounts") or []}
        check(f"{where} mounts the ConfigMap at /etc/callout",
              (mounts.get("/etc/callout", {}).get("configMap") or {}).get("name") == config_maps[0]["metadata"]["name"],
              mounts.get("/etc/callout"))
        secrets_dir = (config.get("secrets") or {}).get("dir")
        check(f"{where} mounts a Secret at secrets.dir {secrets_dir}",
              secrets_dir and "secret" in mounts.get(secrets_dir.rstrip("/"), {}), sorted(mounts))
        token = server.get("auth_token_file")
        if token:
            check(f"{where} mounts a Secret holding auth_token_file {token}",
                  "secret" in mounts.get(token.rsplit("/", 1)[0], {}), sorted(mounts))

        store = (config.get("store") or {}).get("url", "sqlite:callout-data/actions.db")
        if store.startswith("sqlite:"):
            store_dir = store[len("sqlite:"):].rsplit("/", 1)[0]
            volume = mounts.get(store_dir, {})
            check(f"{where} keeps store.url {store} on a writable volume (the root filesystem is read-only)",
                  store_dir.startswith("/") and ("emptyDir" in volume or "persistentVolumeClaim" in volume),
                  sorted(mounts))

        # Scraping: the annotations match the metrics listener.
        notes = (meta.get("metadata") or {}).get("annotations") or {}
        want = {"prometheus.io/scrape": "true", "prometheus.io/port": metrics_listen.rsplit(":", 1)[1],
                "prometheus.io/path": "/metrics"}
        check(f"{path}: prometheus.io annotations match metrics.listen",
              all(notes.get(k) == v for k, v in want.items()), {k: notes.get(k) for k in want})
        check(f"{path}: metrics listen beyond loopback so Prometheus can scrape", metrics.get("enabled", True)
              and not metrics_listen.startswith(("127.", "[::1]", "localhost")), metrics_listen)

    # The recommended labels, on every object.
    for path, d in docs:
        labels = (d.get("metadata") or {}).get("labels") or {}
        missing = [k for k in ("app.kubernetes.io/name", "app.kubernetes.io/part-of") if k not in labels]
        check(f"{path}: {d.get('kind')}/{d['metadata'].get('name')} has the app.kubernetes.io labels",
              not missing, f"missing {missing}")

    # A PodMonitor selects the callout pods and scrapes a port the callout container names.
    for path, d in docs:
        if d.get("kind") != "PodMonitor":
            continue
        spec = d.get("spec") or {}
        wanted = (spec.get("selector") or {}).get("matchLabels") or {}
        selected = [(p, meta, pod, c) for p, meta, pod, c in sidecars
                    if wanted and all(((meta.get("metadata") or {}).get("labels") or {}).get(k) == v
                                      for k, v in wanted.items())]
        check(f"{path}: PodMonitor/{d['metadata'].get('name')} selects the pods running callout", selected, wanted)
        names = {p.get("name"): p.get("containerPort") for _, _, _, c in selected for p in c.get("ports") or []}
        for endpoint in spec.get("podMetricsEndpoints") or [{}]:
            port = endpoint.get("port")
            check(f"{path}: PodMonitor scrapes callout's metrics port ({port}, {endpoint.get('path')})",
                  port in names and names[port] == int(metrics_listen.rsplit(":", 1)[1])
                  and endpoint.get("path", "/metrics") == "/metrics", sorted(n for n in names if n))

    # No real secret in git: every Secret value is a marked placeholder.
    for path, d in docs:
        if d.get("kind") == "Secret":
            values = list((d.get("stringData") or {}).values()) + list((d.get("data") or {}).values())
            check(f"{path}: Secret/{d['metadata'].get('name')} holds placeholders only",
                  values and all("PLACEHOLDER" in str(v) for v in values), "values must contain PLACEHOLDER")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # a broken manifest must fail the run, not crash it silently
        check("the checks ran to the end", False, f"{type(e).__name__}: {e}")
    print(f"RESULT {results.count(True)} {results.count(False)}")
