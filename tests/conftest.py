"""Shared fixtures: a real local Ray, a real S3 API server on loopback (moto), and tiny
synthetic datasets. Fixtures specific to one area live in that area's test module."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest

# Before anything imports ray: no token auth for the test cluster, and Ray's session files
# inside a temporary directory of ours (never /tmp/ray, never `ray stop`).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="hs-ray-"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """An embedded local Ray for the whole session (2 CPUs, like CI).

    Started after the loopback S3 server so that its workers inherit the AWS variables.
    """
    import ray

    from jobs.runtime import init_ray

    init_ray(num_cpus=2, object_store_memory=512 * 1024 * 1024)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback; the standard AWS variables point at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = {
        k: os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_REGION",
        )
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret-key",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the loopback S3 server; returns its `s3://` URI."""
    import boto3

    name = "hs-" + request.node.name.lower().replace("_", "-")[:40].strip("-[]") + f"-{free_port()}"
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)[:60]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def tiny_dataset(tmp_path):
    """A committed 12-episode dataset (obs 3, action 2, noise levels) in 3 parts."""
    from tests.synthetic import make_episodes, write_synthetic_dataset

    steps, episodes = make_episodes(num_episodes=12, obs_dim=3, action_dim=2, seed=0)
    uri = str(tmp_path / "tiny")
    write_synthetic_dataset(uri, steps, episodes, part_steps=40)
    return uri


# The OpenAI-compatible server on loopback (tests/llm_server.py) and a process with no LLM
# endpoint configured: the language, keyframes and credentials tests share them.
@pytest.fixture
def server():
    from tests.llm_server import LLMServer

    server = LLMServer().start()
    yield server
    server.stop()


@pytest.fixture
def no_endpoint(monkeypatch):
    from relabelers import endpoint

    for name in (endpoint.API_KEY_VARIABLE, endpoint.BASE_URL_VARIABLE):
        monkeypatch.delenv(name, raising=False)
