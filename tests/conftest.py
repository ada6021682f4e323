"""Shared fixtures. Every test process runs one torch thread (2-core machines) and keeps the
builtin models in the checkout's cache."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault(
    "RLHF_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "rlhf")
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    import importlib.util

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_vllm = pytest.mark.skip(reason="needs vllm (optional environment: make test-vllm)")
    have_vllm = importlib.util.find_spec("vllm") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "vllm" in item.keywords and not have_vllm:
            item.add_marker(no_vllm)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster on 127.0.0.1 for one test module (shut down after it)."""
    import ray

    ray.init(
        address="local",  # its own, never a `ray start` cluster another test left running
        num_cpus=4,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        configure_logging=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from rlhf.assets import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    from rlhf.config import ModelConfig
    from rlhf.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(tiny_path)))
