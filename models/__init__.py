"""helios_models: the model zoo, installed under this name from the repository's models/ directory.

It holds the registries (`registry-real.yaml`: the real family `helios serve` pulls and serves;
`registry.yaml`: the bundled demo family) and the demo models themselves, so that an installed
Helios finds them wherever it runs, never through the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).parent
REAL_REGISTRY = ROOT / "registry-real.yaml"
DEMO_REGISTRY = ROOT / "registry.yaml"


def resolve(path: str | os.PathLike) -> Path:
    """A registry (or other file) argument: the path itself when it exists (relative to the working
    directory, or absolute); else `NAME` or `models/NAME` is this package's file NAME (`models/` is
    the package's directory in the checkout, so configs written for the checkout work anywhere)."""
    given = Path(path).expanduser()
    if given.exists():
        return given.resolve()
    parts = given.parts[1:] if given.parts[:1] == ("models",) else given.parts
    shipped = ROOT.joinpath(*parts) if parts and not given.is_absolute() else None
    if shipped is None or not shipped.exists():
        names = ", ".join(sorted(p.name for p in ROOT.glob("registry*.yaml")))
        raise FileNotFoundError(f"{path} does not exist here, nor in helios_models ({ROOT}; its registries: {names})")
    return shipped
