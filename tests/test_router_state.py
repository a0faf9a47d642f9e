"""The router's saved policy state (restored when this version wrote it, else ignored) and the launcher's Serve
environment."""

import os
import pickle
from pathlib import Path

import pytest

from deployments.router import STATE_VERSION, _restore
from helios_core.policy import HeliosPolicy, Limits, Registry

REGISTRY = Path(__file__).resolve().parents[1] / "models" / "registry.yaml"


def _policy() -> HeliosPolicy:
    return HeliosPolicy(Registry.load(REGISTRY, "float32"), Limits(96 << 20, 1024))


def test_state_of_this_version_is_restored():
    policy = _policy()
    restored = _restore(pickle.dumps((STATE_VERSION, policy)))
    assert isinstance(restored, HeliosPolicy)
    assert restored.snapshot() == policy.snapshot()


def test_state_of_another_version_or_shape_is_ignored():
    assert _restore(None) is None
    assert _restore(pickle.dumps(_policy())) is None  # the pre-versioned format: a bare policy
    assert _restore(pickle.dumps((STATE_VERSION - 1, _policy()))) is None
    assert _restore(b"not a pickle") is None


@pytest.mark.parametrize("name", ["RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"])
def test_serve_environment_is_set_only_while_ray_starts(monkeypatch, name):
    from deployments.launch import SERVE_ENV, serve_environment

    value = SERVE_ENV[name]
    monkeypatch.delenv(name, raising=False)
    with serve_environment():
        assert os.environ[name] == value  # what ray.init's processes inherit
    assert name not in os.environ  # this process and its children keep Serve's defaults
    monkeypatch.setenv(name, "7")
    with serve_environment():
        assert os.environ[name] == "7"  # the user's choice wins
    assert os.environ[name] == "7"
