"""Where the health server listens: loopback unless told otherwise; all interfaces in a pod."""

from __future__ import annotations

import urllib.request

import pytest
import yaml

from adapters.health import HealthServer
from tests.unit.test_deploy import DEPLOY, dockerfile_stages
from worker.service.settings import WorkerSettings


def _ok() -> tuple[bool, bool, str]:
    return True, True, "ok"


def test_health_server_binds_loopback_by_default() -> None:
    """A worker on a laptop or shared host does not publish its probes to the network."""
    server = HealthServer(_ok, port=0).start()
    try:
        assert server.address == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as response:
            assert response.status == 200
    finally:
        server.stop()


def test_health_host_is_a_setting_that_reaches_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """AB_WORKER_HEALTH_HOST changes the bound address (0.0.0.0 in a pod)."""
    assert WorkerSettings().health_host == "127.0.0.1"
    monkeypatch.setenv("AB_WORKER_HEALTH_HOST", "0.0.0.0")
    settings = WorkerSettings()
    assert settings.health_host == "0.0.0.0"
    server = HealthServer(_ok, host=settings.health_host, port=0).start()
    try:
        assert server.address == "0.0.0.0"
    finally:
        server.stop()


def test_the_pod_and_the_image_listen_on_every_interface() -> None:
    """The kubelet and Container Apps probe the pod IP: the Deployment and the image set 0.0.0.0."""
    deployment = next(
        doc
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / "deployment.yaml").read_text(encoding="utf-8"))
        if doc and doc.get("kind") == "Deployment"
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["AB_WORKER_HEALTH_HOST"] == "0.0.0.0"
    runtime_env = " ".join(arguments for keyword, arguments in dockerfile_stages()[-1] if keyword == "ENV")
    assert "AB_WORKER_HEALTH_HOST=0.0.0.0" in runtime_env
