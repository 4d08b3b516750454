"""deploy/: the Kubernetes manifests against the Kubernetes schemas (kubernetes-validate, which
bundles them and works offline), the Dockerfile's build context and command, and the
consistency between manifests, server flags, Grafana dashboard and exported metrics."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

from jaxinfer.config import load_preset

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").rglob("*.yaml"))
# CRDs of the Prometheus Operator: no schema in the bundle; checked for consistency below.
CRD_KINDS = {"ServiceMonitor", "PodMonitor"}


def resources(path: Path) -> list[dict]:
    return [r for r in yaml.safe_load_all(path.read_text()) if r]


def all_resources() -> list[dict]:
    return [r for path in MANIFESTS for r in resources(path)]


def deployments() -> list[dict]:
    return [r for r in all_resources() if r["kind"] == "Deployment"]


def test_the_manifests_cover_every_part_of_the_deployment():
    kinds = {r["kind"] for r in all_resources()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap",
            "ServiceMonitor", "PodMonitor"} <= kinds
    assert {d["metadata"]["name"] for d in deployments()} == {
        "jaxinfer", "jaxinfer-gpu", "jaxinfer-tpu"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifests_pass_the_kubernetes_schemas(path):
    version = kubernetes_validate.latest_version()
    for resource in resources(path):
        if resource["kind"] in CRD_KINDS:
            continue
        # strict: a misspelt or misplaced field is an error, not silently ignored
        kubernetes_validate.validate(resource, version, strict=True)


def test_the_validator_rejects_a_broken_manifest():
    deployment = deployments()[0]
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["periodSecond"] = 5  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def _args(container: dict) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in container["args"])


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["metadata"]["name"])
def test_probes_and_grace_period_match_the_servers_drain(deployment):
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = _args(container)
    drain_s = float(args.get("drain_timeout_s", load_preset("serve_smollm2_135m")[
        "drain_timeout_s"]))
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # SIGKILL comes terminationGracePeriodSeconds after preStop starts: the drain must fit.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + drain_s + 5
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
        assert container[probe]["httpGet"]["port"] == container["ports"][0]["name"]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # warm-up compiles
    assert args["host"] == "0.0.0.0"
    assert int(args["port"]) == container["ports"][0]["containerPort"]
    assert "--api_key=$(JAXINFER_API_KEY)" in container["args"]
    assert "JAXINFER_API_KEY" in {e["name"] for e in container["env"]}


def test_gpu_and_tpu_variants_request_their_accelerators():
    by_name = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in deployments()}
    gpu, tpu = by_name["jaxinfer-gpu"], by_name["jaxinfer-tpu"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu.present" in gpu["nodeSelector"]
    assert int(tpu["containers"][0]["resources"]["limits"]["google.com/tpu"]) >= 1
    assert "cloud.google.com/gke-tpu-accelerator" in tpu["nodeSelector"]
    selectors = [json.dumps(d["spec"]["selector"], sort_keys=True) for d in deployments()]
    assert len(set(selectors)) == len(selectors)  # no two Deployments claim the same pods


def test_service_and_monitors_point_at_the_pods_port():
    objects = {(r["kind"], r["metadata"]["name"]): r for r in all_resources()}
    service = objects["Service", "jaxinfer"]
    pod_labels = objects["Deployment", "jaxinfer"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    for kind, endpoints in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        monitor = objects[kind, "jaxinfer"]
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        (endpoint,) = monitor["spec"][endpoints]
        assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")


def test_the_autoscaler_reads_metrics_the_adapter_serves_from_the_server():
    from jaxinfer.serving.metrics import Metrics

    objects = {(r["kind"], r["metadata"]["name"]): r for r in all_resources()}
    hpa = objects["HorizontalPodAutoscaler", "jaxinfer"]
    rules = yaml.safe_load(objects["ConfigMap", "prometheus-adapter-jaxinfer"]["data"][
        "config.yaml"])["rules"]
    exported = _exported_names(Metrics("m").exposition().decode())
    served = {}  # what the adapter calls each series it exports
    for rule in rules:
        series = re.fullmatch(r'\{__name__=~"(.*?)",.*\}', rule["seriesQuery"]).group(1)
        for name in exported:
            if re.fullmatch(series, name):
                served[re.sub(rule["name"]["matches"],
                              rule["name"]["as"].replace("${1}", r"\1"), name)] = name
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] in served


def _exported_names(exposition: str) -> set[str]:
    return {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE")}


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_the_dockerfiles_copy_sources_exist_in_the_repository():
    copies = [shlex.split(args) for op, args in _dockerfile_instructions() if op == "COPY"]
    assert copies
    for *sources, _target in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
    copied = {source for *sources, _ in copies for source in sources}
    # What the install and the launcher read: the package, its build file, the presets.
    assert {"pyproject.toml", "jaxinfer", "configs"} <= copied


def test_the_dockerfiles_command_is_a_real_launcher():
    instructions = dict(_dockerfile_instructions())
    entrypoint = json.loads(instructions["ENTRYPOINT"]) + json.loads(instructions["CMD"])
    assert entrypoint[:2] == ["python", "-m"]
    spec = importlib.util.find_spec(entrypoint[2])
    assert spec is not None, f"{entrypoint[2]} is not a module"
    launcher = importlib.import_module(entrypoint[2])
    assert callable(launcher.main)
    defined = {f.name for f in launcher.FLAGS.flags_by_module_dict()[launcher.__name__]}
    for flag in entrypoint[3:]:
        assert flag.removeprefix("--").split("=")[0] in defined
    assert f"{instructions['EXPOSE']}" in entrypoint[-1]  # the port it listens on


def test_every_dashboard_query_names_metrics_the_server_exports():
    from jaxinfer.serving.metrics import Metrics

    dashboard = json.loads((DEPLOY / "grafana" / "jaxinfer.json").read_text())
    exprs = dashboard_expressions(dashboard)
    assert len(exprs) >= 15
    exported = _exported_names(Metrics("m").exposition().decode())
    for expr in exprs:
        for name in re.findall(r"jaxinfer:\w+", expr):
            family = re.sub(r"_(bucket|total|sum|count)$", "", name)
            assert name in exported or family in exported, f"{name} in {expr!r}"
    text = json.dumps(dashboard)
    for needed in ("time_to_first_token", "inter_token_latency", "e2e_request_latency",
                   "generation_tokens", "num_requests_running", "num_requests_waiting",
                   "kv_cache_usage_perc", "prefix_cache_hits", "request_errors", "model_version"):
        assert needed in text


def dashboard_expressions(dashboard: dict) -> list[str]:
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def test_the_prometheus_config_scrapes_metrics():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"]
