"""Checks what a schema cannot: the deployment files agree with the services and with each other.

Called by scripts/check-deploy.sh after the schema validation, with the resolved compose file
(`docker-compose config` output) as its one argument. Checks:
- every key of every service TOML (deploy/config, deploy/compose, the ConfigMap yidi-config) is
  documented for that service in deploy/config/README.md, and every key documented as required is
  set, in the file or by a YIDI__SECTION__KEY variable of the container that reads it;
- compose and Kubernetes: every bureau serves over mutual TLS (tls.ca/cert/key, never
  tls.plaintext); health checks and probes use its health port (server.health_listen, else listen);
- compose: each bureau reads a TOML mounted from deploy/compose/, it exports to the collector under its own OTEL_SERVICE_NAME
  (replicas of one bureau: the same name, each its own service.instance.id); every component a
  pipeline of deploy/otel-collector.yaml names is defined, and the traces reach Jaeger; every
  directory endpoint `keygen --compose` writes is a compose service running that bureau;
- Kubernetes: every Deployment's and StatefulSet's containers name an image, requests and limits,
  the non-root security context, native gRPC liveness/readiness probes on the port the service
  listens on; every ConfigMap/Secret key it mounts or reads exists; each directory endpoint is
  https:// and a Service's name and port, or a StatefulSet replica's name under its headless
  Service (`<set>-<ordinal>.<service>`), a bureau listed at several endpoints naming every replica
  of its StatefulSet once, and every replicated workload has a PodDisruptionBudget;
  kustomization.yaml lists every manifest but the placeholder secrets.
Prints one line per problem and exits 1 if there is any.
"""

import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
PLACEHOLDERS = "secrets.example.yaml"
SERVICES = ("intake", "verification", "issuance", "registry")

problems: list[str] = []


def problem(where: str, message: str) -> None:
    problems.append(f"{where}: {message}")


def documented_keys() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Per service: the keys deploy/config/README.md documents, and those it marks required."""
    keys = {s: set() for s in SERVICES}
    required = {s: set() for s in SERVICES}
    section = None
    for line in (ROOT / "deploy" / "config" / "README.md").read_text().splitlines():
        if line.startswith("## "):
            title = line[3:].strip().lower()
            section = "all" if title.startswith("every service") else next(
                (s for s in SERVICES if title.startswith(s)), None)
            continue
        row = re.match(r"\|\s*`([a-z_]+\.[a-z_]+)`\s*\|\s*([^|]*)\|", line)
        if row and section:
            for service in SERVICES if section == "all" else (section,):
                keys[service].add(row.group(1))
                if row.group(2).strip() == "required":
                    required[service].add(row.group(1))
    if not keys["intake"] or not required["intake"]:
        problem("deploy/config/README.md", "found no key tables")
    return keys, required


KEYS, REQUIRED = documented_keys()


def service_of(file_name: str) -> str | None:
    return next((s for s in SERVICES if file_name.startswith(s)), None)


def check_toml(where: str, text: str, service: str | None, env: dict[str, str]) -> dict:
    """Checks one service TOML; returns it parsed."""
    if service is None:
        problem(where, "belongs to no yidi service (intake, verification, issuance, registry)")
        return {}
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        problem(where, f"not TOML: {error}")
        return {}
    present = set()
    for section, table in config.items():
        if not isinstance(table, dict):
            problem(where, f"top-level key `{section}` is not a section")
            continue
        for key in table:
            present.add(f"{section}.{key}")
    for key in sorted(present - KEYS[service]):
        problem(where, f"key `{key}` is not documented for {service} in deploy/config/README.md")
    from_env = {k[len("YIDI__"):].lower().replace("__", ".") for k in env if k.startswith("YIDI__")}
    for key in sorted(REQUIRED[service] - present - from_env):
        problem(where, f"required key `{key}` is set neither in the file nor by YIDI__{key.upper().replace('.', '__')}")
    return config


def listen_port(config: dict) -> int | None:
    listen = config.get("server", {}).get("listen", "")
    return int(listen.rsplit(":", 1)[1]) if ":" in listen else None


def health_port(config: dict) -> int | None:
    """The port health answers on: server.health_listen if set, else the service port."""
    health = config.get("server", {}).get("health_listen", "")
    return int(health.rsplit(":", 1)[1]) if ":" in health else listen_port(config)


def check_mutual_tls(where: str, config: dict) -> None:
    """Deployed bureaus serve and call over mutual TLS only (issue 4): never tls.plaintext."""
    tls = config.get("tls", {})
    if tls.get("plaintext") or not all(tls.get(key) for key in ("ca", "cert", "key")):
        problem(where, "must set tls.ca, tls.cert and tls.key (mutual TLS), never tls.plaintext")


def check_compose(resolved: Path) -> None:
    compose = yaml.safe_load(resolved.read_text())
    services = compose.get("services", {})
    for name in ("postgres", "setup", "otel-collector", "jaeger"):
        if name not in services:
            problem("docker-compose.yml", f"service `{name}` missing")
    names = set()
    instances = set()
    bureau_hosts: dict[str, set[str]] = {}
    for name, service in services.items():
        command = service.get("command") or []
        if not (isinstance(command, list) and command and command[0].startswith("yidi-") and "--config" in command):
            continue
        where = f"docker-compose.yml {name}"
        target = command[command.index("--config") + 1]
        source = next((v.split(":")[0] for v in service.get("volumes", []) if isinstance(v, str)
                       and v.split(":")[1] == target), None)
        if source is None or not source.startswith(str(ROOT / "deploy" / "compose")):
            problem(where, f"--config {target} is not mounted from deploy/compose/")
            continue
        env = service.get("environment") or {}
        config = check_toml(f"{Path(source).relative_to(ROOT)}", Path(source).read_text(),
                            service_of(command[0].removeprefix("yidi-")), env)
        port = health_port(config)
        probe = " ".join(service.get("healthcheck", {}).get("test", []))
        if port is None or not probe.endswith(f":{port}"):
            problem(where, f"health check `{probe}` does not probe the health port {port}")
        check_mutual_tls(where, config)
        if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") != "http://otel-collector:4317":
            problem(where, "OTEL_EXPORTER_OTLP_ENDPOINT is not http://otel-collector:4317")
        otel_name = env.get("OTEL_SERVICE_NAME")
        instance = (otel_name, env.get("OTEL_RESOURCE_ATTRIBUTES", ""))
        if not otel_name or instance in instances:
            problem(where, f"OTEL_SERVICE_NAME missing, or shared without its own service.instance.id: {otel_name!r}")
        names.add(otel_name)
        instances.add(instance)
        bureau_id = config.get("server", {}).get("bureau_id")
        bureau_hosts.setdefault(bureau_id, set()).add(name)
        if "service_healthy" != service.get("depends_on", {}).get("postgres", {}).get("condition"):
            problem(where, "does not wait for a healthy postgres")
    if len(names) != 5:
        problem("docker-compose.yml", f"expected 5 bureaus, found {len(names)}")
    check_compose_directory(bureau_hosts)


def check_compose_directory(bureau_hosts: dict[str, set[str]]) -> None:
    """The hosts `yidi-demo keygen --compose` lists (crates/demo/src/topology.rs) run their bureau."""
    topology = (ROOT / "crates" / "demo" / "src" / "topology.rs").read_text()
    body = re.search(r"fn compose_hosts\(self\)[^{]*\{(.*?)\n    \}", topology, re.S)
    ids = dict(re.findall(r'pub const ([A-Z_]+): &str = "([a-z-]+)";', topology))
    processes = dict(re.findall(r"Self::(\w+) => ([A-Z_]+),", topology))
    if body is None:
        problem("crates/demo/src/topology.rs", "no compose_hosts")
        return
    for arm, hosts in re.findall(r"Self::(\w+) => &\[([^\]]*)\]", body.group(1)):
        bureau = ids.get(processes.get(arm, ""))
        listed = set(re.findall(r'"([a-z0-9-]+)"', hosts))
        if listed != bureau_hosts.get(bureau, set()):
            problem("docker-compose.yml", f"bureau {bureau}: the directory lists {sorted(listed)}, "
                    f"compose runs it as {sorted(bureau_hosts.get(bureau, set()))}")


def check_collector() -> None:
    where = "deploy/otel-collector.yaml"
    config = yaml.safe_load((ROOT / where).read_text())
    pipelines = config.get("service", {}).get("pipelines", {})
    for signal in ("traces", "metrics"):
        if signal not in pipelines:
            problem(where, f"no {signal} pipeline (the bureaus export {signal})")
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                if component not in (config.get(kind) or {}):
                    problem(where, f"pipeline {name} uses undefined {kind[:-1]} {component}")
    exporters = config.get("exporters") or {}
    if not any(e.get("endpoint") == "jaeger:4317" for e in exporters.values() if isinstance(e, dict)):
        problem(where, "no exporter sends to jaeger:4317")
    grpc = (config.get("receivers") or {}).get("otlp", {}).get("protocols", {}).get("grpc") or {}
    if grpc.get("endpoint") != "0.0.0.0:4317":
        problem(where, "the OTLP gRPC receiver does not listen on 0.0.0.0:4317")


def load_manifests() -> dict[str, list[dict]]:
    manifests = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        for doc in docs:
            for field in ("apiVersion", "kind"):
                if not doc.get(field):
                    problem(path.name, f"a document without {field}")
            if not doc.get("metadata", {}).get("name"):
                problem(path.name, f"a {doc.get('kind')} without metadata.name")
        manifests[path.name] = docs
    return manifests


def check_container(where: str, container: dict, main: bool) -> None:
    if not container.get("image"):
        problem(where, "no image")
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(kind, {}):
                problem(where, f"no resources.{kind}.{resource}")
    security = container.get("securityContext", {})
    expected = {"runAsNonRoot": True, "runAsUser": 10001, "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False}
    for key, value in expected.items():
        if security.get(key) != value:
            problem(where, f"securityContext.{key} must be {yaml.safe_dump(value).split()[0]}")
    if "ALL" not in security.get("capabilities", {}).get("drop", []):
        problem(where, "securityContext.capabilities.drop must hold ALL")
    if main:
        ports = {p.get("containerPort") for p in container.get("ports", [])}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            port = container.get(probe, {}).get("grpc", {}).get("port")
            if port is None or port not in ports:
                problem(where, f"{probe} is not a native gRPC probe on a container port")


def check_kubernetes() -> None:
    manifests = load_manifests()
    objects = {(d["kind"], d["metadata"]["name"]): d for docs in manifests.values() for d in docs
               if d.get("kind") and d.get("metadata", {}).get("name")}
    data = {key: {**obj.get("data", {}), **obj.get("stringData", {})} for key, obj in objects.items()
            if key[0] in ("ConfigMap", "Secret")}
    services = {name: obj for (kind, name), obj in objects.items() if kind == "Service"}

    def require_key(where: str, kind: str, name: str, key: str) -> None:
        if key not in data.get((kind, name), {}):
            problem(where, f"{kind} {name} has no key {key}")

    workloads = [obj for (kind, _), obj in objects.items() if kind in ("Deployment", "StatefulSet")]
    if len(workloads) != 5:
        problem("deploy/k8s", f"expected 5 Deployments and StatefulSets (one per bureau), found {len(workloads)}")
    budgets = [obj["spec"].get("selector", {}).get("matchLabels", {}) for (kind, _), obj in objects.items()
               if kind == "PodDisruptionBudget"]
    for workload in workloads:
        kind, name = workload["kind"], workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        pod_security = pod.get("securityContext", {})
        if pod_security.get("runAsNonRoot") is not True or pod_security.get("runAsUser") != 10001:
            problem(f"{kind} {name}", "pod securityContext must run as non-root user 10001")
        labels = workload["spec"]["template"]["metadata"].get("labels", {})
        if any(labels.get(k) != v for k, v in workload["spec"]["selector"]["matchLabels"].items()):
            problem(f"{kind} {name}", "selector does not match the pod labels")
        if workload["spec"].get("replicas", 1) > 1 and not any(
                budget and all(labels.get(k) == v for k, v in budget.items()) for budget in budgets):
            problem(f"{kind} {name}", "runs several replicas without a PodDisruptionBudget")
        if kind == "StatefulSet":
            headless = services.get(workload["spec"].get("serviceName", ""))
            if headless is None or headless["spec"].get("clusterIP") != "None":
                problem(f"{kind} {name}", "serviceName is not a headless Service (clusterIP: None)")
        for container in pod.get("initContainers", []):
            check_container(f"{kind} {name} init container {container['name']}", container, main=False)
        for container in pod["containers"]:
            where = f"{kind} {name} container {container['name']}"
            check_container(where, container, main=True)
            env = {}
            for variable in container.get("env", []):
                env[variable["name"]] = variable.get("value", "")
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    require_key(where, "Secret", ref["name"], ref["key"])
            for source in container.get("envFrom", []):
                if "configMapRef" in source and ("ConfigMap", source["configMapRef"]["name"]) not in data:
                    problem(where, f"envFrom ConfigMap {source['configMapRef']['name']} does not exist")
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            for mount in mounts.values():
                if mount not in volumes:
                    problem(where, f"mounts undeclared volume {mount}")
            for volume in volumes.values():
                for kind, ref in (("ConfigMap", volume.get("configMap")), ("Secret", volume.get("secret"))):
                    if ref:
                        ref_name = ref.get("name") or ref.get("secretName")
                        for item in ref.get("items", []):
                            require_key(f"{where} volume {volume['name']}", kind, ref_name, item["key"])
            command = container.get("command", [])
            if "--config" not in command:
                problem(where, "no --config in command")
                continue
            config_path = Path(command[command.index("--config") + 1])
            config_volume = volumes.get(mounts.get(str(config_path.parent)), {}).get("configMap", {})
            item = next((i for i in config_volume.get("items", []) if i["path"] == config_path.name), None)
            if item is None:
                problem(where, f"--config {config_path} is not an item of a mounted ConfigMap")
                continue
            text = data.get(("ConfigMap", config_volume["name"]), {}).get(item["key"], "")
            config = check_toml(f"ConfigMap {config_volume['name']} {item['key']}", text,
                                service_of(command[0].removeprefix("yidi-")), env)
            container_ports = {p.get("containerPort") for p in container.get("ports", [])}
            port = listen_port(config)
            if port not in container_ports:
                problem(where, f"listens on {port}, which is not a container port")
            check_mutual_tls(where, config)
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if container.get(probe, {}).get("grpc", {}).get("port") != health_port(config):
                    problem(where, f"{probe} does not probe the health port {health_port(config)}")
            for path_key in (("directory", "path"), ("signing", "key_dir"), ("register", "import_path"),
                             ("import", "path"), ("tls", "ca"), ("tls", "cert"), ("tls", "key")):
                path = config.get(path_key[0], {}).get(path_key[1])
                # A folder (signing.key_dir) may be the mount itself.
                if path and not any(path == mount or path.startswith(mount + "/") for mount in mounts):
                    problem(where, f"{'.'.join(path_key)} {path} is on no mounted volume")
            if not env.get("OTEL_SERVICE_NAME"):
                problem(where, "no OTEL_SERVICE_NAME")

    replicas_of = {(obj["spec"].get("serviceName"), obj["metadata"]["name"]): obj["spec"].get("replicas", 1)
                   for obj in workloads if obj["kind"] == "StatefulSet"}
    directory_text = data.get(("ConfigMap", "yidi-directory"), {}).get("directory.toml", "")
    for bureau in tomllib.loads(directory_text).get("bureaus", []) if directory_text else []:
        endpoints = bureau.get("endpoints") or [bureau.get("endpoint", "")]
        sets = set()
        for endpoint in endpoints:
            match = re.fullmatch(r"https://(?:([a-z0-9-]+)-(\d+)\.)?([a-z0-9-]+):(\d+)", endpoint)
            service = services.get(match.group(3)) if match else None
            if service is None or int(match.group(4)) not in {p["port"] for p in service["spec"]["ports"]}:
                problem("ConfigMap yidi-directory", f"endpoint {endpoint} is no Service's name and port")
                continue
            if match.group(1):
                replicas = replicas_of.get((match.group(3), match.group(1)))
                if replicas is None or int(match.group(2)) >= replicas:
                    problem("ConfigMap yidi-directory", f"endpoint {endpoint} is no replica of a StatefulSet "
                            f"whose headless Service is {match.group(3)}")
                    continue
                sets.add((match.group(3), match.group(1)))
        for key in sets:
            if len(endpoints) != replicas_of[key] or len(set(endpoints)) != len(endpoints):
                problem("ConfigMap yidi-directory", f"bureau {bureau.get('id')} lists {len(endpoints)} endpoints "
                        f"for the {replicas_of[key]} replicas of StatefulSet {key[1]}")
    if not directory_text:
        problem(PLACEHOLDERS, "no ConfigMap yidi-directory with directory.toml")

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization.get("resources", []))
    for name in manifests:
        if name == PLACEHOLDERS and name in listed:
            problem("kustomization.yaml", f"must not list {PLACEHOLDERS}: its placeholders would overwrite real keys")
        elif name != PLACEHOLDERS and name not in listed:
            problem("kustomization.yaml", f"does not list {name}")
    for name in listed - set(manifests):
        problem("kustomization.yaml", f"lists missing {name}")


def main() -> int:
    for path in sorted((ROOT / "deploy" / "config").glob("*.toml")):
        check_toml(str(path.relative_to(ROOT)), path.read_text(), service_of(path.name), {})
    check_compose(Path(sys.argv[1]))
    check_collector()
    check_kubernetes()
    for line in problems:
        print(f"check-deploy: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
