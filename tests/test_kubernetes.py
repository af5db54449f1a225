"""deploy/kubernetes/, validated offline: every object against the Kubernetes API schemas
bundled in kubernetes-validate (strict: no unknown fields), and the parts that must agree
with vlserve itself checked against it (probe paths, ports, labels, router flags, the three
gauges the endpoint picker reads). There is no live cluster in CI."""

from __future__ import annotations

import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from test_auth import make_app, request

from server.cluster.router import DEFAULT_POLICY, HEALTH_ARGS
from server.demo_model import DemoModelPaths

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # the oldest still supported when this was written


def objects() -> list[dict]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def find(kind: str, name: str) -> dict:
    return next(o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name)


@pytest.mark.parametrize("obj", objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_each_object_is_valid(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_validation_catches_a_broken_object() -> None:
    """The check above is not a no-op: a misspelt field fails it."""
    broken = find("Deployment", "vlserve")
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_file() -> None:
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in DEPLOY.glob("*.yaml")
                                    if p.name != "kustomization.yaml")


def container(deployment: str) -> dict:
    return find("Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def test_replica_probes_and_resources(demo_model: DemoModelPaths) -> None:
    vlserve = container("vlserve")
    env = {e["name"]: e.get("value") for e in vlserve["env"]}
    port = vlserve["ports"][0]["containerPort"]
    assert env["VLSERVE_PORT"] == str(port) and env["VLSERVE_HOST"] == "0.0.0.0"
    assert vlserve["startupProbe"]["httpGet"]["path"] == "/health"
    startup = vlserve["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model load
    assert vlserve["readinessProbe"]["httpGet"]["path"] == "/health"
    assert vlserve["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert vlserve["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = find("Deployment", "vlserve")["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False  # VLSERVE_SERVICE_HOST & co. are no settings
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= float(env["VLSERVE_DRAIN_TIMEOUT"]) + 5
    # The probes answer as the manifests expect, without a key, keys on or not.
    app = make_app(demo_model, api_keys=["sk-k8s-test"])
    assert request(app, "GET", "/livez").status_code == 200
    assert request(app, "GET", "/health").status_code == 503  # loading: not yet ready
    # The shared store's placeholder is where the replicas look for it.
    redis = find("Service", "vlserve-redis")["spec"]["ports"][0]["port"]
    assert env["VLSERVE_STATE_URL"] == f"redis://vlserve-redis:{redis}/0"


def test_router_discovers_the_replicas_with_the_cluster_flags() -> None:
    router = container("vllm-router")
    args = router["args"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in args if "=" in a)
    assert "--service-discovery" in args
    at = args.index("--selector") + 1
    selector = dict(a.split("=") for a in args[at:at + 2])
    pod_labels = find("Deployment", "vlserve")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert int(flags["service-discovery-port"]) == container("vlserve")["ports"][0][
        "containerPort"]
    assert flags["policy"] == DEFAULT_POLICY
    pairs = shlex.join(f"--{k}={v}" for k, v in flags.items())
    for name, value in zip(HEALTH_ARGS[::2], HEALTH_ARGS[1::2], strict=True):
        assert f"{name}={value}" in pairs  # the same fast checks as `vlserve cluster`
    assert flags["prometheus-port"] != "29000"
    # Discovery needs to read pods, and nothing more.
    role = find("Role", "vllm-router-discovery")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["get", "list", "watch"]}]
    binding = find("RoleBinding", "vllm-router-discovery")
    assert binding["subjects"][0]["name"] == find("Deployment", "vllm-router")["spec"][
        "template"]["spec"]["serviceAccountName"]


def test_endpoint_picker_reads_gauges_that_metrics_exports(demo_model: DemoModelPaths
                                                           ) -> None:
    epp = yaml.safe_load(find("ConfigMap", "vlserve-epp-config")["data"]["epp-config.yaml"])
    extractor = next(p for p in epp["plugins"] if p.get("type") == "core-metrics-extractor")
    engine = extractor["parameters"]["engineConfigs"][0]
    pod_labels = find("Deployment", "vlserve")["spec"]["template"]["metadata"]["labels"]
    assert pod_labels[extractor["parameters"]["engineLabelKey"]] == engine["name"]
    exported = request(make_app(demo_model), "GET", "/metrics").text
    for spec in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"):
        name = engine[spec]
        samples = [line for line in exported.splitlines() if line.split(" ")[0] == name]
        assert len(samples) == 1, (name, samples)  # one unlabelled series
        assert f"# TYPE {name} gauge" in exported


def test_the_ingress_sends_uploads_to_the_replicas_and_the_rest_to_the_router() -> None:
    """vllm-router refuses multipart bodies: /files must bypass it (the shared store lets
    any replica answer), and every other path must reach it (session affinity) except
    the router's own administration, which must not be reachable from outside: those
    paths go to the replicas, which do not have them (404)."""
    import re

    from server.cluster.front import ROUTER_ADMIN_PATHS

    rules = find("Ingress", "vlserve")["spec"]["rules"][0]["http"]["paths"]
    backend = {r["path"]: r["backend"]["service"]["name"] for r in rules}
    admin = {path for path in backend if re.match(ROUTER_ADMIN_PATHS, path)}
    assert admin == {"/add_worker", "/remove_worker", "/workers", "/list_workers",
                     "/flush_cache", "/start_profile", "/stop_profile"}
    assert {path: backend.pop(path) for path in admin} == dict.fromkeys(admin, "vlserve")
    assert backend == {"/v1/files": "vlserve", "/api/v1/files": "vlserve", "/": "vllm-router"}
    services = {find("Service", name)["metadata"]["name"] for name in set(backend.values())}
    assert services == {"vlserve", "vllm-router"}
