"""deploy/kubernetes, offline: every kustomization renders (``kubectl kustomize`` where installed,
and the Python fallback always, which must agree with it), every core resource validates against
the Kubernetes schemas (kubernetes-validate, strict), the custom resources have what their
operators need, and ports, env vars, probes, volume paths and flags agree with the code, as
tests/test_deploy.py checks docker-compose."""

from __future__ import annotations

import functools
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from exporter.config import parse_config
from server.config import ENV_PREFIX, ServerConfig
from server.scaleout.supervisor import STOP_MARGIN_S
from tests import kustomize
from trainer.__main__ import build_parser as trainer_parser
from trainer.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy/kubernetes"
OVERLAYS = sorted(p.parent.name for p in KUBE.glob("*/kustomization.yaml"))
K8S_VERSION = "1.30.0"  # the oldest with the preStop sleep action on by default (gRPC probes: 1.27)
CUSTOM = {"ServiceMonitor", "PyTorchJob", "ServingRuntime", "InferenceService"}
SERVER = "cnnstack-server"
HTTP_PORT = 8000  # the HTTP listener's default (KServe v2 over HTTP), probed by the manifests
HTTP_ENV = ENV_PREFIX + "HTTP_PORT"


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize.render(KUBE / overlay))


def one(overlay: str, kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [
        d for d in rendered(overlay) if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    return doc


def container(pod: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    cs = pod["containers"]
    return cs[0] if name is None else next(c for c in cs if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in c.get("env", [])}


def server_config(c: dict[str, Any]) -> ServerConfig:
    """The config the server container's environment gives cnn-serve (every variable a real flag)."""
    env = env_of(c)
    fields = set(ServerConfig.__dataclass_fields__)
    pending = set() if "http_port" in fields else {HTTP_ENV}  # the HTTP listener is not in this code yet
    for key in env:
        if key.startswith(ENV_PREFIX) and key not in pending:
            assert key[len(ENV_PREFIX) :].lower() in fields, f"{key} is no cnn-serve flag"
    return ServerConfig.from_args([], environ=env)


def http_port(c: dict[str, Any]) -> int:
    cfg = server_config(c)
    return int(getattr(cfg, "http_port", env_of(c).get(HTTP_ENV, HTTP_PORT)))


def ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def mount_of(pod: dict[str, Any], c: dict[str, Any], path: object) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volumeMount, volume) holding ``path`` in container ``c``: the longest mount path above it."""
    p = PurePosixPath(str(path))
    mounts = [m for m in c.get("volumeMounts", []) if p.is_relative_to(m["mountPath"])]
    assert mounts, f"{path} lies on no volume of container {c['name']}"
    m = max(mounts, key=lambda m: len(m["mountPath"]))
    return m, next(v for v in pod["volumes"] if v["name"] == m["name"])


# ---------------------------------------------------------------- rendering and schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders_and_the_python_fallback_agrees(overlay: str) -> None:
    mine = kustomize.build(KUBE / overlay)
    assert mine
    if kustomize.kubectl() is None:
        pytest.skip("kubectl is not installed: the Python rendering stands alone")
    theirs = kustomize.render(KUBE / overlay, use_kubectl=True)
    assert unordered(theirs) == unordered(mine)


def unordered(node: Any) -> Any:
    """Lists of named items (containers, env, ports, volumes) and of resources compared as sets:
    kustomize puts a list item its patch merged wherever it likes."""
    if isinstance(node, dict):
        return {k: unordered(v) for k, v in node.items()}
    if isinstance(node, list):
        items = [unordered(v) for v in node]
        if all(isinstance(i, dict) and ("name" in i or "metadata" in i) for i in items):
            return sorted(items, key=lambda i: (i.get("kind", ""), str(i.get("name", i.get("metadata")))))
        return items
    return node


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_resources_validate_against_the_kubernetes_schemas(overlay: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for doc in rendered(overlay):
        if doc["kind"] in CUSTOM:
            continue
        kv.validate(doc, K8S_VERSION, strict=True)  # raises on an unknown field or a wrong type


def test_every_manifest_file_is_rendered_by_some_kustomization() -> None:
    files = {p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml"}
    used = set()
    for k in KUBE.glob("*/kustomization.yaml"):
        import yaml

        spec = yaml.safe_load(k.read_text())
        used |= {(k.parent / r).resolve() for r in spec.get("resources", []) if (k.parent / r).is_file()}
        used |= {(k.parent / p["path"]).resolve() for p in spec.get("patches", [])}
    assert {f.resolve() for f in files} <= used


def test_custom_resources_have_what_their_operators_read() -> None:
    sm = one("monitoring", "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["spec"]["endpoints"]
    pj = one("kubeflow", "PyTorchJob")
    assert pj["apiVersion"] == "kubeflow.org/v1"
    for role, spec in pj["spec"]["pytorchReplicaSpecs"].items():
        assert role in ("Master", "Worker") and spec["replicas"] >= 1
        assert [c["name"] for c in spec["template"]["spec"]["containers"]] == [
            "pytorch"
        ]  # the operator's name
    rt, isvc = one("kserve", "ServingRuntime"), one("kserve", "InferenceService")
    assert (
        rt["apiVersion"] == "serving.kserve.io/v1alpha1" and isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    )
    assert [c["name"] for c in rt["spec"]["containers"]] == ["kserve-container"]


# ---------------------------------------------------------------- the server agrees with the code


@pytest.mark.parametrize("overlay", ["base", "gpu", "models-from-image"])
def test_server_ports_env_and_probes_agree_with_the_code(overlay: str) -> None:
    dep = one(overlay, "Deployment", SERVER)
    pod = dep["spec"]["template"]["spec"]
    c = container(pod, "server")
    cfg = server_config(c)
    assert cfg.host == "0.0.0.0" and cfg.worker_count >= 1
    assert ports(c) == {"grpc": cfg.port, "http": http_port(c), "metrics": cfg.metrics_port}
    startup, ready, live = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
    assert startup["grpc"]["port"] == cfg.port and startup["grpc"].get("service", "") == ""
    assert ready["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert live["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert (
        annotations["prometheus.io/port"] == str(cfg.metrics_port)
        and annotations["prometheus.io/path"] == "/metrics"
    )
    if overlay == "gpu":
        assert cfg.device == "cuda" and int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    else:
        assert cfg.device == "cpu" and "nvidia.com/gpu" not in c["resources"].get("limits", {})


@pytest.mark.parametrize("overlay", ["base", "gpu", "models-from-image"])
def test_server_drains_before_it_is_killed_and_runs_locked_down(overlay: str) -> None:
    pod = one(overlay, "Deployment", SERVER)["spec"]["template"]["spec"]
    c = container(pod, "server")
    cfg = server_config(c)
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    # SIGKILL comes terminationGracePeriodSeconds after the preStop hook started.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + cfg.grace_s + STOP_MARGIN_S
    sec, pod_sec = c["securityContext"], pod["securityContext"]
    assert pod_sec["runAsNonRoot"] and pod_sec["runAsUser"] != 0
    assert sec["readOnlyRootFilesystem"] and not sec["allowPrivilegeEscalation"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    # The supervisor's metrics folder (under $TMPDIR=/tmp) needs the one writable volume.
    assert "emptyDir" in mount_of(pod, c, "/tmp/cnn-serve-metrics-x")[1]


def test_the_model_repository_comes_from_the_pvc_or_an_init_container() -> None:
    pod = one("base", "Deployment", SERVER)["spec"]["template"]["spec"]
    c = container(pod, "server")
    mount, volume = mount_of(pod, c, server_config(c).repository)
    assert (
        mount["readOnly"]
        and volume["persistentVolumeClaim"]["claimName"]
        == one("base", "PersistentVolumeClaim")["metadata"]["name"]
    )
    pod = one("models-from-image", "Deployment", SERVER)["spec"]["template"]["spec"]
    c = container(pod, "server")
    mount, volume = mount_of(pod, c, server_config(c).repository)
    assert "emptyDir" in volume and "persistentVolumeClaim" not in volume
    (init,) = pod["initContainers"]
    filled = next(m for m in init["volumeMounts"] if m["name"] == volume["name"])
    assert init["command"][:2] == ["cp", "-R"] and init["command"][-1].rstrip("/") == filled["mountPath"]
    assert not [d for d in rendered("models-from-image") if d["kind"] == "PersistentVolumeClaim"]


def test_services_expose_grpc_http_and_metrics_of_the_server_pods() -> None:
    dep = one("base", "Deployment", SERVER)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    named = ports(container(dep["spec"]["template"]["spec"], "server"))
    services = [d for d in rendered("base") if d["kind"] == "Service"]
    assert services
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items()
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in named and p["port"] == named[p["targetPort"]]
    main = one("base", "Service", SERVER)
    assert {p["name"] for p in main["spec"]["ports"]} == {"grpc", "http", "metrics"}
    sm = one("monitoring", "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= main["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in sm["spec"]["endpoints"]] == [("metrics", "/metrics")]


def test_autoscaler_and_disruption_budget_target_the_server() -> None:
    dep = one("base", "Deployment", SERVER)
    hpa, pdb = one("base", "HorizontalPodAutoscaler"), one("base", "PodDisruptionBudget")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", SERVER)
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= dep["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # a node drain can always proceed


# ---------------------------------------------------------------- jobs and KServe agree with the code


def trainer_args(c: dict[str, Any]) -> Any:
    cmd = [*c["command"], *c.get("args", [])]
    assert cmd[0] == "torchrun" and cmd[cmd.index("-m") + 1] == "trainer"
    args = trainer_parser().parse_args(cmd[cmd.index("-m") + 2 :])
    get_preset(args.preset)
    return args


def test_train_and_export_jobs_hand_the_run_to_the_servers_repository() -> None:
    train_pod = one("jobs", "Job", "cnnstack-train")["spec"]["template"]["spec"]
    export_pod = one("jobs", "Job", "cnnstack-export")["spec"]["template"]["spec"]
    t, e = container(train_pod), container(export_pod)
    train = trainer_args(t)
    assert (
        t["resources"]["limits"]["nvidia.com/gpu"] == t["command"][t["command"].index("--nproc-per-node") + 1]
    )
    assert e["command"] == ["cnn-export"]
    export = parse_config(e["args"])
    claim = lambda pod, c, p: mount_of(pod, c, p)[1]["persistentVolumeClaim"]["claimName"]  # noqa: E731
    rel = lambda pod, c, p: PurePosixPath(str(p)).relative_to(mount_of(pod, c, p)[0]["mountPath"])  # noqa: E731
    (source,) = export.sources
    assert (claim(export_pod, e, source), rel(export_pod, e, source)) == (
        claim(train_pod, t, train.out),
        rel(train_pod, t, train.out),
    )
    assert claim(export_pod, e, export.data_dir) == claim(train_pod, t, train.data_dir)
    assert not mount_of(export_pod, e, export.repository)[0].get("readOnly")
    server_pod = one("base", "Deployment", SERVER)["spec"]["template"]["spec"]
    s = container(server_pod, "server")
    assert claim(export_pod, e, export.repository) == claim(server_pod, s, server_config(s).repository)
    assert rel(export_pod, e, export.repository) == rel(server_pod, s, server_config(s).repository)


def test_the_pytorchjob_trains_like_the_job_on_every_node() -> None:
    job = trainer_args(container(one("jobs", "Job", "cnnstack-train")["spec"]["template"]["spec"]))
    for spec in one("kubeflow", "PyTorchJob")["spec"]["pytorchReplicaSpecs"].values():
        pod = spec["template"]["spec"]
        c = container(pod)
        args = trainer_args(c)
        assert not getattr(args, "download", False), "every rank would download into the same volume"
        assert {k: v for k, v in vars(args).items() if k != "download"} == {
            k: v for k, v in vars(job).items() if k != "download"
        }
        assert (
            c["image"] == container(one("jobs", "Job", "cnnstack-train")["spec"]["template"]["spec"])["image"]
        )
        assert mount_of(pod, c, args.out)[1]["persistentVolumeClaim"]["claimName"] == "cnnstack-runs"


def test_kserve_runtime_serves_the_repository_on_the_port_the_inferenceservice_names() -> None:
    rt, isvc = one("kserve", "ServingRuntime"), one("kserve", "InferenceService")
    c = container(rt["spec"], "kserve-container")
    cfg = server_config(c)
    assert cfg.repository == Path("/mnt/models")  # where KServe mounts the storageUri
    assert {"v2", "grpc-v2"} <= set(rt["spec"]["protocolVersions"])
    assert http_port(c) == 8080  # KServe's HTTP port; gRPC below
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == rt["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in rt["spec"]["supportedModelFormats"]}
    assert [(p["name"], p["containerPort"]) for p in model["ports"]] == [("h2c", cfg.port)]
    claim = one("base", "PersistentVolumeClaim")["metadata"]["name"]
    assert model["storageUri"] == f"pvc://{claim}/"
    assert rt["spec"]["annotations"]["prometheus.kserve.io/port"] == str(cfg.metrics_port)
    assert (
        c["securityContext"]["readOnlyRootFilesystem"] and "emptyDir" in mount_of(rt["spec"], c, "/tmp/x")[1]
    )


def test_the_http_port_the_manifests_probe_is_a_flag_of_the_server() -> None:
    assert ServerConfig(repository=Path(".")).http_port == HTTP_PORT
    # The probed paths are routes of the HTTP app (routes only: nothing is served).
    from server.api.http import build_app
    from server.api.kserve.rest import KServeRest

    app = build_app([KServeRest.__new__(KServeRest)], 1 << 20)
    routes = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    assert {"/v2/health/ready", "/v2/health/live"} <= routes


def test_the_auth_overlay_gives_the_server_its_tokens_from_a_secret_and_keeps_the_probes_open() -> None:
    pod = one("auth", "Deployment", SERVER)["spec"]["template"]["spec"]
    c = container(pod, "server")
    token_file = env_of(c)[ENV_PREFIX + "AUTH_TOKEN_FILE"]
    mount, volume = mount_of(pod, c, token_file)
    assert mount["readOnly"] and volume["secret"]["secretName"] == "cnnstack-tokens"
    assert Path(token_file).parent == Path(mount["mountPath"]) and Path(token_file).name == "tokens"
    assert volume["secret"]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == 65534
    # The probes stay on the open paths: a pod with tokens needs none to be ready or alive.
    from server.tokens import OPEN, Tokens

    assert Tokens().http_need(c["readinessProbe"]["httpGet"]["path"]) == OPEN
    assert Tokens().http_need(c["livenessProbe"]["httpGet"]["path"]) == OPEN
    assert c["startupProbe"]["grpc"].get("service", "") == ""  # grpc.health.v1: open
