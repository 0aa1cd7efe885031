"""What ``kubectl apply -k`` would send, checked offline as a stand-in for the cluster.

The kustomizations are rendered by the real kustomize (kubectl's, from the test dependencies). From
the rendered objects the tests build what the kubelet would give the worker's pod: the image's
environment, the ConfigMap's variables, the container's own, and what the Azure Workload Identity
webhook injects, with nothing else (the deployment manual tells the reader to create no Secret). The
worker then starts with exactly that environment, inside a network jail that refuses every address
but the loopback, as a cluster without Azure would: it must run, answer its liveness probe, and drain
on SIGTERM. The NetworkPolicy is evaluated by a small model of the NetworkPolicy rules, and the App
Configuration overlay by the provider's documented transformation of a key-value into the ConfigMap.
"""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_artifacts import DEPLOY, K8S, K8S_APPCONFIG, render
from tests.unit.test_deploy import dockerfile_stages, validate_manifest
from tests.waiting import wait_for
from worker.domain.registry import ExperimentRegistry

NAMESPACE = "ab-worker"


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render(K8S)


@pytest.fixture(scope="module")
def rendered_appconfig() -> list[dict[str, Any]]:
    return render(K8S_APPCONFIG)


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


# --- the rendered kustomization ---------------------------------------------------------------------


def test_every_rendered_object_is_valid_and_in_the_namespace(rendered: list[dict[str, Any]]) -> None:
    """kustomize's output passes the Kubernetes, KEDA and App Configuration schemas, all in ab-worker."""
    kinds = sorted(o["kind"] for o in rendered)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "TriggerAuthentication",
            "ScaledObject",
        ]
    )
    for obj in rendered:
        assert not validate_manifest(obj), (obj["kind"], validate_manifest(obj))
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]
    assert only(rendered, "Namespace")["metadata"]["name"] == NAMESPACE


def test_rendered_image_has_the_registry_and_tag(rendered: list[dict[str, Any]]) -> None:
    """The Deployment names only ``ab-worker``; kustomize writes the registry and tag (checkov's CKV_K8S_14)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    (image,) = kustomization["images"]
    (container,) = only(rendered, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"{image['newName']}:{image['newTag']}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", image["newTag"])
    assert container["imagePullPolicy"] == "Always"


def test_the_pod_needs_no_secret(rendered: list[dict[str, Any]]) -> None:
    """Nothing the pod reads comes from a Secret: the manual tells the reader to create none."""
    assert not [o for o in rendered if o["kind"] == "Secret"]
    text = json.dumps(only(rendered, "Deployment"))
    assert "secretKeyRef" not in text
    assert '"secret":' not in text
    assert "secretRef" not in text


# --- the pod's environment, and the worker started with it -------------------------------------------


def image_environment() -> dict[str, str]:
    """The ENV of the Dockerfile's runtime stage (``$PATH`` references left for the caller)."""
    env: dict[str, str] = {}
    for keyword, arguments in dockerfile_stages()[-1]:
        if keyword == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", arguments))
    return env


#: What the Azure Workload Identity webhook adds to a pod labelled azure.workload.identity/use=true.
#: The tenant and token are stand-ins; the authority is the public cloud's, refused by the jail below.
def webhook_environment(client_id: str, token_file: Path) -> dict[str, str]:
    return {
        "AZURE_CLIENT_ID": client_id,
        "AZURE_TENANT_ID": "11111111-1111-1111-1111-111111111111",
        "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
        "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
    }


@dataclass
class Pod:
    """What the kubelet would start: the command, its environment, and its mounted files."""

    args: list[str]
    env: dict[str, str]
    health_port: int


def pod_from(rendered: list[dict[str, Any]], root: Path) -> Pod:
    """The worker container of the rendered Deployment as the kubelet would start it, with volumes under ``root``.

    Two things differ from a cluster, both for the test machine's sake: mount paths are moved under
    ``root``, and the health server listens on a free loopback port instead of 0.0.0.0:8080.
    """
    deployment = only(rendered, "Deployment")
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    (container,) = pod["spec"]["containers"]
    configmaps = {o["metadata"]["name"]: o for o in rendered if o["kind"] == "ConfigMap"}
    secrets = {o["metadata"]["name"]: o for o in rendered if o["kind"] == "Secret"}

    env = image_environment()
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        reference = variable["valueFrom"]["secretKeyRef"]
        secret = secrets.get(reference["name"])
        if secret is not None:
            env[variable["name"]] = secret["stringData"][reference["key"]]
        else:
            assert reference.get("optional"), f"{variable['name']} needs Secret {reference['name']}"

    mounts: dict[str, Path] = {}
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        directory = root / mount["mountPath"].strip("/")
        directory.mkdir(parents=True, exist_ok=True)
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            for key, text in configmaps[volume["configMap"]["name"]]["data"].items():
                (directory / key).write_text(text, encoding="utf-8")
        mounts[mount["mountPath"]] = directory
    for name, value in env.items():
        for path, directory in mounts.items():
            if value.startswith(path + "/"):
                env[name] = str(directory) + value[len(path) :]

    account = only(rendered, "ServiceAccount", pod["spec"]["serviceAccountName"])
    token = root / "var/run/secrets/azure/tokens/azure-identity-token"
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text("eyJhbGciOiJub25lIn0.e30.", encoding="utf-8")
    env.update(webhook_environment(account["metadata"]["annotations"]["azure.workload.identity/client-id"], token))

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    env["AB_WORKER_HEALTH_PORT"], env["AB_WORKER_HEALTH_HOST"] = str(port), "127.0.0.1"
    env["PATH"] = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    env["HOME"] = str(root)
    return Pod(list(container.get("args", [])), env, port)


#: Starts ``python -m worker`` with an audit hook that refuses to resolve or connect to anything but
#: the loopback: the worker meets Azure as unreachable, and the test sends nothing off this machine.
NETWORK_JAIL = textwrap.dedent(
    """
    import ipaddress, runpy, socket, sys

    def loopback(host):
        if host is None:
            return True
        host = host.decode() if isinstance(host, bytes) else str(host)
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"

    def jail(event, args):
        if event in ("socket.getaddrinfo", "socket.gethostbyname") and not loopback(args[0]):
            raise socket.gaierror(socket.EAI_NONAME, f"no network in this test: {args[0]}")
        if event == "socket.connect" and isinstance(args[1], tuple) and not loopback(args[1][0]):
            raise ConnectionRefusedError(f"no network in this test: {args[1][0]}")

    sys.addaudithook(jail)
    sys.argv = ["ab-worker", *sys.argv[1:]]
    runpy.run_module("worker", run_name="__main__", alter_sys=True)
    """
)


def probe(port: int, path: str) -> int | None:
    try:
        # The status is the verdict, not how fast a busy machine answers: a generous timeout.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


@pytest.fixture
def started_pod(rendered: list[dict[str, Any]], tmp_path: Path) -> Iterator[tuple[Pod, subprocess.Popen[str]]]:
    pod = pod_from(rendered, tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-c", NETWORK_JAIL, *pod.args],
        env=pod.env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield pod, process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_the_worker_runs_with_the_environment_the_manifests_give_its_pod(
    started_pod: tuple[Pod, subprocess.Popen[str]],
) -> None:
    """The pod does not crash-loop: the worker starts with App Insights on (Entra ID, no Secret), stays
    live while Azure is unreachable (readiness says so), and drains and exits 0 on SIGTERM.

    Before: AB_WORKER_TELEMETRY=appinsights with the connection string in an optional Secret nobody
    was told to create, so the worker exited 2 at start ("needs a connection string") in every pod.
    """
    pod, process = started_pod
    assert pod.env["AB_WORKER_TELEMETRY"] == "appinsights"

    def live() -> bool:
        assert process.poll() is None, f"the worker exited {process.returncode}:\n{process.communicate()[0]}"
        return probe(pod.health_port, "/healthz") == 200

    wait_for(live, timeout=90, what="the worker's liveness probe")
    # Service Bus is unreachable here: the worker holds off and says so on /readyz, it does not exit.
    wait_for(lambda: probe(pod.health_port, "/readyz") == 503, timeout=90, what="/readyz to report the outage")
    assert live()

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=90)
    assert process.returncode == 0, output
    assert "needs a connection string" not in output
    assert "Traceback" not in output
    # The Azure Monitor exporter tried an Entra ID token for the workload identity, so the
    # authentication string took effect (the token endpoint itself is behind the jail).
    assert "ManagedIdentityCredential" in output, output
    assert "no network in this test: replace-me.servicebus.windows.net" in output.lower()


def test_the_pod_environment_holds_only_settings_the_worker_reads(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Every variable the pod gets is a worker setting, a standard Azure/OpenTelemetry one, or the image's."""
    from tests.unit.test_deploy import _check_variable_name

    pod = pod_from(rendered, tmp_path)
    image = set(image_environment())
    webhook = set(webhook_environment("x", tmp_path))
    for name in pod.env:
        if name in image or name in webhook or name in {"HOME"}:
            continue
        _check_variable_name(name)


# --- NetworkPolicy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """One end of a connection, as NetworkPolicy sees it."""

    ip: str
    namespace_labels: tuple[tuple[str, str], ...] = ()
    pod_labels: tuple[tuple[str, str], ...] = ()


def _selects(selector: dict[str, Any] | None, labels: tuple[tuple[str, str], ...]) -> bool:
    return selector is None or set(selector.get("matchLabels", {}).items()) <= set(labels)


def _peer_matches(peer_rule: dict[str, Any], peer: Peer) -> bool:
    if "ipBlock" in peer_rule:
        block = peer_rule["ipBlock"]
        address = ipaddress.ip_address(peer.ip)
        if address not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(address in ipaddress.ip_network(cidr) for cidr in block.get("except", []))
    if peer.pod_labels == () and peer.namespace_labels == ():
        return False  # a host address matches ipBlock rules only
    return _selects(peer_rule.get("namespaceSelector"), peer.namespace_labels) and _selects(
        peer_rule.get("podSelector"), peer.pod_labels
    )


def _port_matches(port_rule: dict[str, Any], port: int, protocol: str, named: dict[str, int]) -> bool:
    wanted = port_rule.get("port")
    number = named.get(wanted, wanted) if isinstance(wanted, str) else wanted
    return port_rule.get("protocol", "TCP") == protocol and (wanted is None or number == port)


def allowed(
    policy: dict[str, Any], direction: str, peer: Peer, port: int, named: dict[str, int], protocol: str = "TCP"
) -> bool:
    """Whether ``policy`` lets the selected pods talk to (egress) or hear from (ingress) ``peer`` on ``port``."""
    key, peers = ("egress", "to") if direction == "egress" else ("ingress", "from")
    if direction.capitalize() not in policy["spec"]["policyTypes"]:
        return True
    for rule in policy["spec"].get(key, []):
        peer_ok = not rule.get(peers) or any(_peer_matches(p, peer) for p in rule[peers])
        port_ok = not rule.get("ports") or any(_port_matches(p, port, protocol, named) for p in rule["ports"])
        if peer_ok and port_ok:
            return True
    return False


KUBE_DNS = Peer("10.0.0.10", (("kubernetes.io/metadata.name", "kube-system"),), (("k8s-app", "kube-dns"),))
SERVICE_BUS = Peer("20.38.116.40")  # an Azure public address
NODE = Peer("10.224.0.4")  # a node on AKS's default virtual network: where the kubelet probes from
OTHER_POD = Peer("10.244.1.7", (("kubernetes.io/metadata.name", "shop"),), (("app", "web"),))


def test_network_policy_lets_the_worker_reach_azure_and_the_kubelet_reach_health_only(
    rendered: list[dict[str, Any]],
) -> None:
    """Egress: DNS to kube-dns, 443/5671/5672 out, never IMDS; ingress: the health port from the nodes only."""
    policy = only(rendered, "NetworkPolicy")
    deployment = only(rendered, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    named = {port["name"]: port["containerPort"] for port in container["ports"]}
    health = named["health"]

    assert allowed(policy, "egress", KUBE_DNS, 53, named, "UDP")
    assert allowed(policy, "egress", KUBE_DNS, 53, named, "TCP")
    assert not allowed(policy, "egress", Peer("8.8.8.8"), 53, named, "UDP"), "DNS only through the cluster's"
    for port in (443, 5671, 5672):
        assert allowed(policy, "egress", SERVICE_BUS, port, named), port
    for port in (80, 22, 5432, 6379, 9093):
        assert not allowed(policy, "egress", SERVICE_BUS, port, named), port
    assert not allowed(policy, "egress", Peer("169.254.169.254"), 443, named), "IMDS stays closed"
    assert not allowed(policy, "egress", Peer("169.254.169.254"), 80, named)

    assert allowed(policy, "ingress", NODE, health, named)
    assert not allowed(policy, "ingress", NODE, 5671, named)
    assert not allowed(policy, "ingress", OTHER_POD, health, named), "other pods may not reach the worker"
    assert not allowed(policy, "ingress", Peer("203.0.113.9"), health, named)


def test_the_network_policy_model_is_live() -> None:
    """The evaluator above can say no: a policy allowing everything, and one allowing nothing, are told apart."""
    open_policy = {"spec": {"policyTypes": ["Ingress", "Egress"], "ingress": [{}], "egress": [{}]}}
    closed_policy = {"spec": {"policyTypes": ["Ingress", "Egress"]}}
    assert allowed(open_policy, "egress", SERVICE_BUS, 22, {})
    assert not allowed(closed_policy, "egress", SERVICE_BUS, 443, {})
    assert not allowed(closed_policy, "ingress", NODE, 8080, {})


# --- Azure App Configuration ------------------------------------------------------------------------


def provider_configmap_data(key_values: dict[str, tuple[str, str | None]], data: dict[str, Any]) -> dict[str, str]:
    """The ConfigMap data the App Configuration Kubernetes Provider writes for ``configMapData`` type yaml.

    Its documented rule (and internal/loader/typed_setting.go): with no separator each selected key
    becomes a top-level key of one YAML document stored under ``data["key"]``, and a value whose content
    type is JSON (``application/json`` or ``application/<x>+json``) is parsed, not quoted.
    """
    assert data["type"] == "yaml"
    assert "separator" not in data
    document: dict[str, Any] = {}
    for key, (value, content_type) in key_values.items():
        is_json = bool(content_type and re.fullmatch(r"application/(?:[^/]+\+)?json(;.*)?", content_type.lower()))
        document[key] = json.loads(value) if is_json else value
    return {data["key"]: yaml.safe_dump(document, sort_keys=False)}


#: The key-values docs/deployment.md tells the operator to store: the experiments file's top-level lists.
APPCONFIG_KEYS = ("layers", "holdouts", "experiments")


def experiments_key_value(key: str = "experiments") -> str:
    """The value docs/deployment.md tells the operator to store under ``key``."""
    return json.dumps(yaml.safe_load((DEPLOY / "experiments.yaml").read_text(encoding="utf-8")).get(key, []))


def test_app_configuration_overlay_feeds_the_configmap_the_worker_reloads(
    rendered: list[dict[str, Any]], rendered_appconfig: list[dict[str, Any]]
) -> None:
    """deploy/k8s-appconfig: the provider writes the very ConfigMap and file the Deployment mounts, with
    the worker's identity, refreshing on changes; the static ConfigMap is gone so the provider owns it."""
    provider = only(rendered_appconfig, "AzureAppConfigurationProvider")
    assert not validate_manifest(provider)
    deployment = only(rendered_appconfig, "Deployment")
    assert deployment == only(rendered, "Deployment"), "the overlay must not change the worker"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = only(rendered_appconfig, "ConfigMap", "ab-worker-settings")["data"]
    experiments_file = settings.get("AB_WORKER_EXPERIMENTS_FILE") or image_environment()["AB_WORKER_EXPERIMENTS_FILE"]
    directory, filename = experiments_file.rsplit("/", 1)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == directory)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])

    target = provider["spec"]["target"]
    assert target["configMapName"] == volume["configMap"]["name"]
    assert target["configMapData"] == {"type": "yaml", "key": filename}
    assert not [
        o for o in rendered_appconfig if o["kind"] == "ConfigMap" and o["metadata"]["name"] == target["configMapName"]
    ]
    assert provider["metadata"]["namespace"] == NAMESPACE
    assert provider["spec"]["auth"]["workloadIdentity"]["serviceAccountName"] == pod["serviceAccountName"]
    refresh = provider["spec"]["configuration"]["refresh"]
    assert refresh["enabled"] is True
    selected = {selector["keyFilter"] for selector in provider["spec"]["configuration"]["selectors"]}
    assert selected == set(APPCONFIG_KEYS)
    assert {watched["key"] for watched in refresh["monitoring"]["keyValues"]} == selected
    assert set(yaml.safe_load((DEPLOY / "experiments.yaml").read_text(encoding="utf-8"))) <= selected
    assert provider["spec"]["endpoint"].endswith(".azconfig.io")

    # What the provider will write from the key-value the manual seeds is the worker's experiments file.
    data = provider_configmap_data(
        {key: (experiments_key_value(key), "application/json") for key in APPCONFIG_KEYS}, target["configMapData"]
    )
    content = yaml.safe_load(data[filename])
    assert content == yaml.safe_load((DEPLOY / "experiments.yaml").read_text(encoding="utf-8"))
    assert len(ExperimentRegistry.from_dict(content, source="App Configuration key experiments")) > 0
    # Stored without the JSON content type, the value would arrive as one string, not experiments.
    quoted = yaml.safe_load(
        provider_configmap_data({"experiments": (experiments_key_value(), None)}, target["configMapData"])[filename]
    )
    assert isinstance(quoted["experiments"], str)


def test_the_manual_seeds_app_configuration_with_the_json_content_type() -> None:
    """docs/deployment.md's command stores the key the provider selects, as JSON."""
    manual = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text(encoding="utf-8")
    commands = [line for line in manual.splitlines() if "az appconfig kv set" in line]
    assert commands, "docs/deployment.md does not show how to seed App Configuration"
    block = manual[manual.index(commands[0]) : manual.index(commands[0]) + 600]
    start = manual.index(commands[0])
    assert f"for key in {' '.join(APPCONFIG_KEYS)}; do" in manual[start - 200 : start]
    assert '--key "$key"' in block
    assert "--content-type application/json" in block
