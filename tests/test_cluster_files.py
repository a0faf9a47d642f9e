"""Files under cluster/: the Grafana dashboard queries only metrics Helios exports."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def declared_metrics() -> set[str]:
    """Names passed to ray.serve.metrics Counter/Gauge/Histogram in deployments/."""
    names = set()
    for path in (ROOT / "deployments").glob("*.py"):
        names |= set(re.findall(r'metrics\.(?:Counter|Gauge|Histogram)\(\s*"(\w+)"', path.read_text()))
    return names


def test_grafana_dashboard_uses_exported_metrics_only():
    dash = json.loads((ROOT / "cluster" / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(total|bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_(helios_\w+)", e)}
    declared = declared_metrics()
    assert used and used <= declared, used - declared
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


# --- KubeRay manifests ----------------------------------------------------------------------------
import copy  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

SHARED = ROOT.parent / "shared" / "schemas"  # the workspace copy; tests/data/kuberay is the vendored one
SCHEMAS = SHARED if SHARED.is_dir() else ROOT / "tests" / "data" / "kuberay"


def crd_schema(kind: str) -> dict:
    doc = yaml.safe_load((SCHEMAS / f"kuberay-{kind}s-crd.yaml").read_text())
    [v1] = [v for v in doc["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def validate(manifest: dict, kind: str) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(crd_schema(kind))
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(manifest)]


def manifest(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


@pytest.mark.parametrize("name,kind", [("rayservice.yaml", "rayservice"), ("raycluster.yaml", "raycluster")])
def test_manifests_follow_kuberays_crd_schemas(name, kind):
    m = manifest(name)
    assert m["apiVersion"] == "ray.io/v1" and m["kind"].lower() == kind
    assert validate(m, kind) == []
    broken = copy.deepcopy(m)
    spec = broken["spec"]["rayClusterConfig"] if kind == "rayservice" else broken["spec"]
    del spec["workerGroupSpecs"][0]["groupName"]  # the validator really checks: a required field
    assert any("groupName" in e for e in validate(broken, kind))


def test_ray_version_is_the_one_we_run():
    import ray

    service, cluster = manifest("rayservice.yaml"), manifest("raycluster.yaml")
    versions = {service["spec"]["rayClusterConfig"]["rayVersion"], cluster["spec"]["rayVersion"]}
    base = re.search(r"^FROM rayproject/ray:([\d.]+)-", (ROOT / "cluster" / "Dockerfile").read_text(), re.M)
    assert versions == {ray.__version__} == {base.group(1)}


def test_serve_config_v2_is_a_valid_serve_config_whose_app_builds():
    from ray.serve.schema import ServeDeploySchema

    service = manifest("rayservice.yaml")["spec"]
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["serveConfigV2"]))
    head = service["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0"  # the head runs no model replica
    [app] = config.applications
    module, attr = app.import_path.split(":")
    build = getattr(__import__(module, fromlist=[attr]), attr)
    import helios_models

    assert helios_models.resolve(app.args["registry"]) == helios_models.REAL_REGISTRY  # the image's pulled models
    args = dict(app.args) | {"registry": "registry.yaml"}  # the demo family: the real one may not be pulled here
    assert build(args) is not None  # every arg is one build_app knows
    assert app.args["num_gpus"] == 1 and app.args["device"] == "cuda"
