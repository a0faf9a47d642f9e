"""What a plain install holds: every package, the model zoo as helios_models (registries, demo
weights), the deployments' page and Serve configs; and that it finds them without the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ("helios-demo-code-6l", "helios-demo-prose-12l", "helios-demo-mixed-16l")


def setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_package_list_names_every_package_directory():
    config = setuptools_config()
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for top in ("helios_core", "deployments") for init in (ROOT / top).rglob("__init__.py")}
    missing = found - set(config["packages"])
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
    assert "helios_models" in config["packages"] and config["package-dir"] == {"helios_models": "models"}
    assert (ROOT / "models" / "__init__.py").is_file()


def test_the_top_level_serve_configs_are_the_packaged_ones():
    for name in ("serve_config.yaml", "serve_config_demo.yaml"):  # `serve run` in the checkout; helios serve anywhere
        assert (ROOT / name).read_text() == (ROOT / "deployments" / name).read_text(), name


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of what it is built from (so no build/ is left in the checkout)."""
    pytest.importorskip("setuptools")
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("helios_core", "deployments", "models"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.log", "train_state.*"))
    # The venv's setuptools builds it: no download of the build backend.
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(src), "-w", str(out)], capture_output=True, text=True, timeout=600)
    if build.returncode != 0:
        pytest.skip(f"the wheel could not be built here: {build.stderr.strip()[-500:]}")
    [path] = out.glob("helios_serve-*.whl")
    return path


def test_the_wheel_holds_the_model_zoo_and_the_deployments_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "helios_core", "deployments", "helios_models"}
    expected = {"helios_models/__init__.py", "helios_models/registry.yaml", "helios_models/registry-real.yaml",
                "deployments/dashboard.html", "deployments/serve_config.yaml", "deployments/serve_config_demo.yaml",
                "helios_core/policy/registry.py", "helios_core/benchmark/cli.py"}
    for model in DEMO:
        expected |= {f"helios_models/{model}/{f}" for f in (
            "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "exit_probes.safetensors", "README.md")}
    assert expected <= names, sorted(expected - names)


def test_an_unpacked_wheel_serves_from_anywhere(wheel, tmp_path):
    """Unpacked (what pip installs of a pure wheel) on its own path, run outside the checkout: the
    default config's registry is the installed package's, and the demo registry loads its weights."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = ("import helios_models; from deployments.launch import DEMO_CONFIG, REAL_CONFIG, load_config, registry_of;"
              "from helios_core.policy import Registry;"
              "print(helios_models.ROOT); print(registry_of(load_config(REAL_CONFIG)));"
              "print(len(Registry.load(registry_of(load_config(DEMO_CONFIG)))))")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    root, real, demo_models = run.stdout.split()
    assert Path(root) == site / "helios_models" and Path(real) == site / "helios_models" / "registry-real.yaml"
    assert demo_models == "3"
