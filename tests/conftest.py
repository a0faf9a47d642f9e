"""Shared pytest fixtures: tiny random Hugging Face checkpoints (see tests/tiny_models.py)."""

from __future__ import annotations

import os
import pathlib
import socket
import sys
from dataclasses import dataclass

import pytest
import torch

_TESTS_DIR = pathlib.Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:  # so test modules can `import tiny_models`
    sys.path.insert(0, str(_TESTS_DIR))

import tiny_models  # noqa: E402
from tiny_models import TEST_CRASH_PROMPT  # noqa: E402

# Two intra-op threads at most. On a machine with <= 2 cores, one: tiny matmuls gain nothing from
# a second thread, and when another process holds a core, OpenMP spin-waiting made generate()
# ~10x slower with 2 threads. HELIOS_TEST_THREADS overrides.
_threads = int(os.environ.get("HELIOS_TEST_THREADS", "0")) or (2 if (os.cpu_count() or 1) > 2 else 1)
torch.set_num_threads(_threads)

# Keep test logs free of "Loading weights" / "Writing model shards" bars.
from transformers.utils import logging as _hf_logging  # noqa: E402

_hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """family -> directory of a tiny checkpoint (4 layers, hidden 64, float32, seed 0)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {fam: tiny_models.make_tiny_checkpoint(fam, root / fam) for fam in tiny_models.FAMILIES}


@pytest.fixture(scope="session")
def exit_corpus(tmp_path_factory) -> str:
    """A text file of the tiny models' corpus, for training exit heads on them."""
    path = tmp_path_factory.mktemp("exit_corpus") / "text.txt"
    path.write_text("\n\n".join(tiny_models._CORPUS) * 6)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> pathlib.Path:
    """Directory of a 6-layer "llama_gqa" checkpoint (GQA, untied embeddings)."""
    root = tmp_path_factory.mktemp("tiny_llama")
    return tiny_models.make_tiny_checkpoint("llama_gqa", root / "llama_gqa_6l", num_layers=6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServeCluster:
    url: str  # Serve's HTTP proxy, e.g. http://127.0.0.1:PORT (apps add their route prefix)
    metrics_port: int  # Ray's Prometheus endpoint on this node


@pytest.fixture(scope="session")
def serve_cluster() -> ServeCluster:
    """One local Ray cluster with Serve started, shared by every Ray test module (starting Ray costs
    ~10 s on 2 cores). Each module deploys its own app under its own name and route prefix, and
    deletes it when done, so a module that kills replicas cannot disturb another's."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from deployments.launch import serve_environment
    from helios_core.engine_process import CRASH_PROMPT_ENV

    metrics_port, http_port = free_port(), free_port()
    # Ray's processes started now (the engine processes' ancestors) keep this: a prompt holding
    # TEST_CRASH_PROMPT kills its engine (tests/test_hostile_input.py); no other test prompt holds it.
    # And Ray's workers run at nice 1, not Ray's 15: next to other busy processes (nice 0) a nice-15
    # worker gets a thirtieth of their CPU share, and the suite's Serve processes then starved.
    suite_env = {CRASH_PROMPT_ENV: TEST_CRASH_PROMPT, "RAY_worker_niceness": "1"}
    saved = {name: os.environ.get(name) for name in suite_env}
    os.environ.update(suite_env)
    try:
        with serve_environment():  # as `helios serve` runs it
            ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    yield ServeCluster(f"http://127.0.0.1:{http_port}", metrics_port)
    serve.shutdown()
    ray.shutdown()
