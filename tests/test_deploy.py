"""The deployment files: docker-compose.yml is valid and wires the services the README describes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose_config() -> str:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose)")
    command = [tool, "-f", str(ROOT / "docker-compose.yml"), "config"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    unset = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert unset.returncode != 0 and "RAY_AUTH_TOKEN" in unset.stderr  # the Ray secret is required
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env={**env, "RAY_AUTH_TOKEN": "test-secret"}
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_compose_has_every_service(compose_config: str):
    for service in ("redis:", "ray-head:", "encoder:", "llm-worker:", "ingest:"):
        assert f"  {service}" in compose_config


def test_redis_persists_and_encoders_reserve_gpus(compose_config: str):
    assert "--appendonly" in compose_config and "redis-data:/data" in compose_config
    assert compose_config.count("driver: nvidia") >= 2  # encoders and the llm worker
    assert "published: 50051" in compose_config


def test_dockerfile_pins_the_cpu_torch_by_default():
    text = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    # faiss-gpu replaces faiss-cpu where asked, never beside it
    assert "ARG FAISS=faiss-cpu" in text and "pip uninstall -y faiss-cpu" in text


def test_compose_builds_for_gpus_and_its_drivers_join_ray_with_a_node_of_their_own():
    """The gRPC worker and ingest are Ray drivers: in a container without a Ray node they could not join
    the cluster (Ray fails after ~70 s), so their entrypoint starts a node that joins the head and offers
    nothing to schedule, and they connect to it; the image has CUDA torch and faiss-gpu."""
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    build = compose["x-onetoken"]["build"]["args"]
    assert "cu12" in build["TORCH_INDEX"] and "faiss-gpu-cu12" in build["FAISS"]
    services = compose["services"]
    for name in ("llm-worker", "ingest"):
        entrypoint = services[name]["entrypoint"]
        script = entrypoint[2]
        assert entrypoint[:2] == ["sh", "-c"] and script.startswith("ray start --address=ray-head:6380 ")
        assert "--num-cpus=0 --num-gpus=0" in script and script.endswith('&& exec onetoken "$$@"'), name
        assert services[name]["environment"]["ONETOKEN_RAY_ADDRESS"] == "auto", name
    head = services["ray-head"]["command"]
    assert "--port=6380" in head and not any("dashboard-host" in a for a in head)


def test_the_worker_serves_metrics_inside_the_compose_network_only():
    import yaml

    worker = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["llm-worker"]
    command = worker["command"]
    assert command[command.index("--metrics-port") + 1] == "9464"
    assert worker["expose"] == ["9464"] and not any("9464" in str(p) for p in worker["ports"])


def test_compose_is_secured_by_default():
    """The worker on 0.0.0.0 would refuse to start without TLS and tokens; Ray needs its token; the
    dashboard (arbitrary code by design) is not published. Read from the file itself, no Docker needed."""
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    worker_env = services["llm-worker"]["environment"]
    for name in ("ONETOKEN_TLS_CERT", "ONETOKEN_TLS_KEY", "ONETOKEN_TOKENS_FILE"):
        assert worker_env[name].startswith("/run/secrets/onetoken/"), name
    assert "./secrets:/run/secrets/onetoken:ro" in services["llm-worker"]["volumes"]
    assert "secure_channel" in " ".join(services["llm-worker"]["healthcheck"]["test"])
    for name, service in services.items():
        published = " ".join(str(p) for p in service.get("ports", []))
        assert "8265" not in published, name
        if name != "redis":
            assert service["environment"]["RAY_AUTH_MODE"] == "token", name
            assert service["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name


def test_compose_waits_for_redis_scales_encoders_and_keeps_the_venv_out():
    import yaml

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("llm-worker", "ingest"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
        command = services[name]["command"]
        assert command[command.index("--encoders") + 1] == "0", name  # one actor per cluster GPU
    # ingest's file reads are Ray tasks, which run where the CPUs are: on the encoder nodes
    assert "./corpus:/corpus:ro" in services["encoder"]["volumes"]
    assert "./corpus:/corpus:ro" in services["ingest"]["volumes"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv/" in ignored and ".git/" in ignored and "secrets/" in ignored
