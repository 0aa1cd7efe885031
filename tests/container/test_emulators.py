"""The same end-to-end scenarios against Microsoft's official emulators, through testcontainers.

Needs a Docker daemon; without one every test here is skipped with the reason. The emulator images
are the ones deploy/compose.yaml uses: the Service Bus emulator (with SQL Server), and Azurite.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.container

REPO = Path(__file__).parents[2]
SERVICEBUS_IMAGE = "mcr.microsoft.com/azure-messaging/servicebus-emulator:latest"
SQL_IMAGE = "mcr.microsoft.com/mssql/server:2022-latest"
AZURITE_IMAGE = "mcr.microsoft.com/azure-storage/azurite:latest"


def docker_problem(host: str) -> str | None:
    """Why the Docker daemon at ``host`` (a ``DOCKER_HOST`` value) cannot be used, or None when it answers."""
    if host.startswith("unix://"):
        path = host.removeprefix("unix://")
        if not os.path.exists(path):
            return f"no Docker daemon reachable: {path} does not exist (container tests need one)"
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
            except OSError as exc:
                return f"no Docker daemon reachable at {path}: {exc.strerror} (container tests need one)"
    import docker

    try:
        client = docker.from_env(environment={**os.environ, "DOCKER_HOST": host})
    except Exception as exc:
        return f"no Docker daemon reachable ({type(exc).__name__}); container tests need one"
    try:
        client.ping()
    except Exception as exc:
        return f"Docker daemon did not answer ({type(exc).__name__}); container tests need one"
    finally:
        client.close()
    return None


@functools.cache
def docker_unavailable() -> str | None:
    """:func:`docker_problem` for this environment's ``DOCKER_HOST`` (checked once)."""
    return docker_problem(os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))


@pytest.fixture(scope="module")
def docker_reason() -> None:
    reason = docker_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def servicebus_emulator(docker_reason: None) -> Iterator[str]:
    """The official emulator with deploy/servicebus-emulator/Config.json; yields its connection string."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network
    from testcontainers.core.waiting_utils import wait_for_logs

    password = "Str0ng!Passw0rd-for-tests"  # a throwaway container credential
    with Network() as network:
        sql = (
            DockerContainer(SQL_IMAGE)
            .with_network(network)
            .with_network_aliases("sqledge")
            .with_env("ACCEPT_EULA", "Y")
            .with_env("MSSQL_SA_PASSWORD", password)
        )
        with sql:
            emulator = (
                DockerContainer(SERVICEBUS_IMAGE)
                .with_network(network)
                .with_env("ACCEPT_EULA", "Y")
                .with_env("SQL_SERVER", "sqledge")
                .with_env("MSSQL_SA_PASSWORD", password)
                .with_volume_mapping(
                    str(REPO / "deploy" / "servicebus-emulator" / "Config.json"),
                    "/ServiceBus_Emulator/ConfigFiles/Config.json",
                    "ro",
                )
                .with_exposed_ports(5672)
            )
            with emulator:
                wait_for_logs(emulator, "Emulator Service is Successfully Up", timeout=180)
                host, port = emulator.get_container_host_ip(), emulator.get_exposed_port(5672)
                yield (
                    f"Endpoint=sb://{host}:{port};SharedAccessKeyName=RootManageSharedAccessKey;"
                    "SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;"
                )


def test_skip_reason_names_a_missing_docker_socket(tmp_path: Path) -> None:
    """A DOCKER_HOST socket that does not exist is named in the skip reason."""
    missing = tmp_path / "docker.sock"
    reason = docker_problem(f"unix://{missing}")
    assert reason is not None
    assert f"{missing} does not exist" in reason


def test_skip_reason_names_a_socket_nobody_listens_on(tmp_path: Path) -> None:
    """A socket file with no daemon behind it is named, with the connect error, in the skip reason."""
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as bound:  # bound but never listening: connect is refused
        bound.bind(str(path))
        reason = docker_problem(f"unix://{path}")
    assert reason is not None
    assert f"reachable at {path}: Connection refused" in reason


def test_happy_path_and_dead_letters_on_the_official_emulator(servicebus_emulator: str) -> None:
    """Publish with the SDK → worker → event on the topic; poison is dead-lettered with its reason."""
    from azure.servicebus import ServiceBusClient, ServiceBusSubQueue

    from adapters.memory import MemorySink
    from adapters.servicebus import ServiceBusAuth, create_client, send_requests
    from tests.waiting import collect
    from worker import ExperimentRegistry
    from worker.bootstrap import bootstrap
    from worker.service.handling import event_id_for
    from worker.service.pump import PumpConfig, settled
    from worker.service.settings import WorkerSettings

    registry = ExperimentRegistry.load(REPO / "deploy" / "experiments.yaml")
    ids = [f"c-{i}" for i in range(20)]
    with ServiceBusClient.from_connection_string(servicebus_emulator) as client:
        bodies = [json.dumps({"user_id": f"U{i}", "experiment_id": "exp_001"}).encode() for i in range(20)]
        send_requests(client, "assignment-requests", bodies, message_ids=ids)
        send_requests(client, "assignment-requests", [b"not json"])
        sb = create_client(ServiceBusAuth(connection_string=servicebus_emulator))
        pump = bootstrap(
            WorkerSettings.model_construct(),
            client=sb,
            sink=MemorySink(),
            registry=lambda: registry,
            config=PumpConfig(max_wait=2),
        )
        stats = pump.run(until=settled(21))
        sb.close()
        with client.get_subscription_receiver("assignment-events", "all") as receiver:
            events = collect(
                lambda: receiver.receive_messages(max_message_count=50, max_wait_time=5), 20, 60, "the 20 events"
            )
            for message in events:
                receiver.complete_message(message)
        got = {str(message.message_id) for message in events}
        with client.get_queue_receiver("assignment-requests", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as receiver:
            dead = collect(
                lambda: receiver.receive_messages(max_message_count=5, max_wait_time=5), 1, 60, "the dead letter"
            )
    assert stats.completed == 20
    assert got == {event_id_for(i) for i in ids}
    assert [m.dead_letter_reason for m in dead] == ["InvalidJson"]


def test_azurite_image_starts(docker_reason: None) -> None:
    """Azurite's official image serves blob and queue endpoints (queued Kusto ingestion uses both)."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    with DockerContainer(AZURITE_IMAGE).with_exposed_ports(10000, 10001) as azurite:
        wait_for_logs(azurite, "Azurite Queue service is successfully listening", timeout=60)
        from azure.storage.blob import BlobServiceClient
        from azure.storage.queue import QueueServiceClient

        host = azurite.get_container_host_ip()
        account = (
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
            f"BlobEndpoint=http://{host}:{azurite.get_exposed_port(10000)}/devstoreaccount1;"
            f"QueueEndpoint=http://{host}:{azurite.get_exposed_port(10001)}/devstoreaccount1;"
        )
        blobs = BlobServiceClient.from_connection_string(account).create_container("ingest")
        blobs.upload_blob("rows.json", b'{"EventId": "e1"}')
        assert blobs.download_blob("rows.json").readall() == b'{"EventId": "e1"}'
        queue = QueueServiceClient.from_connection_string(account).create_queue("ingestions")
        queue.send_message("rows.json")
        assert [m.content for m in queue.receive_messages()] == ["rows.json"]
