"""One name for each thing across every artifact that names it, and a manual that matches the template.

The database, table, mapping, queue, topic and namespace names appear in the worker's settings, the
Kusto scripts, the Bicep template and its parameter file, the Kubernetes manifests, the compose file,
the emulator configuration, the workbook and the alert rules; each must agree with the settings'
defaults (the workbook's ``Database`` once defaulted to ``experiments`` while everything else said
``assignments``). And the manual may not promise what the template does not create: every Service Bus
entity, role grant and Bicep parameter or output it names is checked against the template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.kusto.sink import MAPPING_NAME
from tests.deploy_artifacts import (
    DEPLOY,
    K8S,
    K8S_APPCONFIG,
    bicep_outputs,
    bicep_param_default,
    bicep_params,
    bicep_resources,
    documentation,
    manifest_files,
    markdown_sections,
    markdown_table_rows,
    yaml_keys,
)
from tests.unit.test_deploy import bicep_entities, bicep_grants
from worker.service.settings import WorkerSettings

FIELDS = WorkerSettings.model_fields
DATABASE = FIELDS["kusto_database"].default
TABLE = FIELDS["kusto_table"].default
QUEUE = FIELDS["queue_name"].default
TOPIC = FIELDS["topic_name"].default


def _settings_configmap() -> dict[str, str]:
    for _, document in manifest_files(K8S):
        if document["kind"] == "ConfigMap" and document["metadata"]["name"] == "ab-worker-settings":
            data: dict[str, str] = document["data"]
            return data
    raise AssertionError("no ab-worker-settings ConfigMap")


def _workbook_parameter(name: str) -> Any:
    workbook = json.loads((DEPLOY / "dashboards" / "assignment-workbook.json").read_text(encoding="utf-8"))
    for item in workbook["items"]:
        for parameter in item.get("content", {}).get("parameters", []):
            if parameter["name"] == name:
                return parameter.get("value")
    raise AssertionError(f"workbook parameter {name} not found")


def _bicep_parameter_file() -> dict[str, Any]:
    parameters = json.loads((DEPLOY / "azure" / "main.parameters.json").read_text(encoding="utf-8"))
    return {name: spec["value"] for name, spec in parameters["parameters"].items()}


def test_the_kusto_database_has_one_name_everywhere() -> None:
    """Settings, Bicep (default and parameter file), ConfigMap and the workbook's default say the same."""
    assert DATABASE == "assignments"
    assert bicep_param_default("kustoDatabaseName") == DATABASE
    assert _bicep_parameter_file()["kustoDatabaseName"] == DATABASE
    assert _settings_configmap()["AB_WORKER_KUSTO_DATABASE"] == DATABASE
    assert _workbook_parameter("Database") == DATABASE


def test_the_kusto_table_and_mapping_have_one_name_everywhere() -> None:
    """The table every script and query names, and the mapping the sink ingests with, are the settings'."""
    assert bicep_param_default("kustoTableName") == TABLE
    assert _bicep_parameter_file()["kustoTableName"] == TABLE
    assert _settings_configmap()["AB_WORKER_KUSTO_TABLE"] == TABLE
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    assert compose["services"]["worker"]["environment"]["AB_WORKER_KUSTO_TABLE"] == TABLE
    scripts = {path.name: path.read_text(encoding="utf-8") for path in (DEPLOY / "kusto").glob("*.kql")}
    assert re.search(rf"^\.create-merge table {TABLE} \(", scripts["table.kql"], re.M)
    assert f'ingestion json mapping "{MAPPING_NAME}"' in scripts["mapping.kql"]
    for name, text in scripts.items():
        tables = set(re.findall(r"^\.(?:create-merge|alter|alter-merge|create-or-alter) table (\w+)", text, re.M))
        assert tables <= {TABLE}, (name, tables)
    # Every KQL query of the dashboards reads the table by this name, or through the functions
    # functions.kql defines (each of which names the table or another of them).
    defined = set(re.findall(r"^(Assignment\w+)\(", scripts["functions.kql"], re.M))
    assert {f"{TABLE}Dedup", f"{TABLE}InExperiment", "AssignmentSrm"} <= defined
    dashboards = (DEPLOY / "dashboards" / "assignment-workbook.json").read_text(encoding="utf-8")
    dashboards += (DEPLOY / "dashboards" / "alerts.json").read_text(encoding="utf-8")
    assert set(re.findall(r"\b(Assignment[A-Z]\w*)\b", dashboards)) <= {TABLE} | defined
    assert set(re.findall(r"\b(Assignment[A-Z]\w*)\(", dashboards)) <= defined


def test_the_queue_and_topic_have_one_name_everywhere() -> None:
    """Settings, Bicep, ConfigMap, KEDA, compose, the emulator configuration and the alert rules."""
    assert bicep_param_default("queueName") == QUEUE
    assert bicep_param_default("topicName") == TOPIC
    assert _bicep_parameter_file()["queueName"] == QUEUE
    assert _bicep_parameter_file()["topicName"] == TOPIC
    settings = _settings_configmap()
    assert (settings["AB_WORKER_QUEUE_NAME"], settings["AB_WORKER_TOPIC_NAME"]) == (QUEUE, TOPIC)
    scaled = next(d for _, d in manifest_files(K8S) if d["kind"] == "ScaledObject")
    assert scaled["spec"]["triggers"][0]["metadata"]["queueName"] == QUEUE
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))["services"]["worker"]["environment"]
    assert (compose["AB_WORKER_QUEUE_NAME"], compose["AB_WORKER_TOPIC_NAME"]) == (QUEUE, TOPIC)
    emulator = json.loads((DEPLOY / "servicebus-emulator" / "Config.json").read_text(encoding="utf-8"))
    (namespace,) = emulator["UserConfig"]["Namespaces"]
    assert QUEUE in {queue["Name"] for queue in namespace["Queues"]}
    assert TOPIC in {topic["Name"] for topic in namespace["Topics"]}
    alerts = json.loads((DEPLOY / "dashboards" / "alerts.json").read_text(encoding="utf-8"))
    assert alerts["parameters"]["queueName"]["defaultValue"] == QUEUE


def test_names_shared_by_the_manifests_agree() -> None:
    """The namespace, service account, experiments ConfigMap and labels the manifests refer to each other by."""
    documents = [d for _, d in manifest_files(K8S)] + [d for _, d in manifest_files(K8S_APPCONFIG)]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    namespaces = {d["metadata"].get("namespace") for d in documents if d["kind"] != "Namespace"}
    assert namespaces == {kustomization["namespace"]}
    (namespace,) = [d for d in documents if d["kind"] == "Namespace"]
    assert namespace["metadata"]["name"] == kustomization["namespace"]
    # The workload identity subject the manual tells the reader to federate.
    account = next(d for d in documents if d["kind"] == "ServiceAccount")["metadata"]["name"]
    subject = f"system:serviceaccount:{kustomization['namespace']}:{account}"
    assert subject in (K8S / "serviceaccount.yaml").read_text(encoding="utf-8")
    assert any(subject in page for page in documentation().values()), f"the manual never names {subject}"


# --- the manual against the template ----------------------------------------------------------------


def _backticked(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def entity_names_in(text: str) -> set[str]:
    """Service Bus entities a page names: ``assignment-*`` names, subscription paths, and ``X`` subscription."""
    names: set[str] = set()
    for token in _backticked(text):
        path = re.fullmatch(r"([\w-]+)/Subscriptions/([\w-]+)", token)
        if path:
            names |= {f"topic:{path.group(1)}", f"subscription:{path.group(2)}"}
        elif re.fullmatch(r"assignment-[a-z-]+", token):
            names.add(f"entity:{token}")
    for match in re.finditer(r"`([\w-]+)` subscription|subscription `([\w-]+)`", text):
        names.add(f"subscription:{match.group(1) or match.group(2)}")
    return names


def test_every_entity_the_manual_names_is_created_by_the_template() -> None:
    """A queue, topic or subscription the manual names exists after the Bicep deployment (`all` included)."""
    entities = bicep_entities()
    created = (
        {f"entity:{name}" for name in entities["queues"] | entities["topics"]}
        | {f"topic:{name}" for name in entities["topics"]}
        | {f"subscription:{name}" for name in entities["subscriptions"]}
    )
    named: dict[str, set[str]] = {page: entity_names_in(text) for page, text in documentation().items()}
    missing = {page: sorted(names - created) for page, names in named.items() if names - created}
    assert not missing, f"named by the manual, not created by deploy/azure/main.bicep: {missing}"


def test_entity_extraction_is_live() -> None:
    """The extraction above finds what a page names (so an empty result is not silently a pass)."""
    text = "Tail `assignment-events/Subscriptions/audit`, reply to `assignment-replies`, the `all` subscription."
    assert entity_names_in(text) == {
        "topic:assignment-events",
        "subscription:audit",
        "entity:assignment-replies",
        "subscription:all",
    }


def role_keys(cell: str) -> list[str]:
    """The template's role id keys a role cell names ("Data Receiver ... + Data Sender ..." names two)."""
    keys = []
    for part in re.split(r"\s*\+\s*", cell.lower()):
        if "ingestor" in part:
            keys.append("ingestor")
        elif "app configuration" in part:
            keys.append("appConfigurationDataOwner" if "owner" in part else "appConfigurationDataReader")
        elif "metrics publisher" in part:
            keys.append("monitoringMetricsPublisher")
        elif "receiver" in part:
            keys.append("serviceBusDataReceiver")
        elif "sender" in part:
            keys.append("serviceBusDataSender")
        elif "owner" in part:
            keys.append("serviceBusDataOwner")
    return keys


#: The manual's identity column -> the template's principal.
IDENTITIES = {"worker": "workerIdentity", "scaler": "scalerIdentity", "operator": "operatorPrincipalId"}
#: The manual's scope column -> the template's resource symbol.
SCOPES = {
    "requests queue": "requestsQueue",
    "events topic": "eventsTopic",
    "reply queues": "replyQueues",
    "application insights": "appInsights",
    "app insights": "appInsights",
    "app configuration": "appConfiguration",
}


def role_rows() -> list[tuple[str, dict[str, str]]]:
    rows = []
    for page, text in documentation().items():
        for row in markdown_table_rows(text, ("identity", "role", "scope")):
            rows.append((page, row))
    return rows


def test_every_role_the_manual_grants_is_assigned_by_the_template() -> None:
    """Each row of the manual's role table (identity, role, scope) is a role assignment in main.bicep,
    except rows that say the grant is made by hand (Data Explorer roles for an alert rule's identity)."""
    rows = role_rows()
    assert rows, "the manual has no role table (| identity | role | scope |)"
    grants = bicep_grants()
    ingestor = bicep_resources()["kustoIngestor"].flat
    checked = 0
    for page, row in rows:
        identity, scope_cell = row["identity"].lower(), row["scope"].lower()
        if "by hand" in scope_cell:
            continue
        principal = next(value for key, value in IDENTITIES.items() if identity.startswith(key))
        keys = role_keys(row["role"])
        assert keys, f"{page}: unknown role {row['role']!r}"
        for key in keys:
            if key == "ingestor":
                assert principal == "workerIdentity", (page, row)
                assert "role: 'Ingestor'" in ingestor, (page, row)
                checked += 1
                continue
            scopes = [value for name, value in SCOPES.items() if name in scope_cell]
            assert scopes, f"{page}: unknown scope {row['scope']!r}"
            for scope in scopes:
                assert (principal, key, scope) in grants, f"{page}: {row} is not assigned by main.bicep"
                checked += 1
    assert checked, "no row of the manual's role tables was checked"
    manual = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text(encoding="utf-8")
    rows_of_manual = markdown_table_rows(manual, ("identity", "role", "scope"))
    listed = set()
    for row in rows_of_manual:
        named = next((v for k, v in IDENTITIES.items() if row["identity"].lower().startswith(k)), None)
        for key in role_keys(row["role"]):
            for name, scope in SCOPES.items():
                if name in row["scope"].lower():
                    listed.add((named, key, scope))
    # And the other way round: every grant the template makes is in the manual's table.
    assert grants <= listed, f"granted by main.bicep, missing from docs/deployment.md: {grants - listed}"


def deployment_identifiers(text: str) -> set[str]:
    """lowerCamelCase names a page uses in backticks or in ``--parameters name=value``."""
    names = {token for token in _backticked(text) if re.fullmatch(r"[a-z]+[A-Z]\w*", token)}
    for line in re.findall(r"--parameters [^\n]*", text):
        names |= set(re.findall(r"\b([a-z]+[A-Z]\w*)=", line))
    return names


def manifest_field_names() -> set[str]:
    fields: set[str] = set()
    for directory in (K8S, K8S_APPCONFIG):
        for path in directory.glob("*.yaml"):
            for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
                fields |= yaml_keys(document)
    return fields


def test_every_bicep_parameter_and_output_the_manual_names_exists() -> None:
    """In the deployment pages, a camelCase name is a Bicep parameter or output, or a manifest field."""
    known = set(bicep_params()) | set(bicep_outputs()) | manifest_field_names()
    pages = {page: text for page, text in documentation().items() if page.endswith("deployment.md")}
    readme = markdown_sections(documentation()["README.md"])
    pages |= {f"README.md#{heading}": text for heading, text in readme.items() if "bicep" in heading.lower()}
    assert pages, "neither docs/deployment.md nor a Bicep section of the README to check"
    unknown = {page: sorted(deployment_identifiers(text) - known) for page, text in pages.items()}
    unknown = {page: names for page, names in unknown.items() if names}
    assert not unknown, f"named in the manual, neither a main.bicep parameter/output nor a manifest field: {unknown}"


def test_identifier_extraction_is_live() -> None:
    text = "Set `appInsightsEntraAuthOnly` and `--parameters containerImage=x operatorPrincipalId=y`; `AB_WORKER_X` no."
    assert deployment_identifiers(text) == {"appInsightsEntraAuthOnly", "containerImage", "operatorPrincipalId"}


@pytest.mark.parametrize("placeholder", ["REPLACE-ME", "00000000-0000-0000-0000-000000000000"])
def test_every_placeholder_in_the_manifests_is_explained_in_the_manual(placeholder: str) -> None:
    """Each manifest value to fill in is listed in docs/deployment.md with the Bicep output it comes from."""
    manual = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text(encoding="utf-8")
    outputs = set(bicep_outputs())
    for directory in (K8S, K8S_APPCONFIG):
        for path in sorted(directory.glob("*.yaml")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if placeholder not in line or line.lstrip().startswith("#"):
                    continue
                key = line.split(":", 1)[0].strip().strip('"-').strip()
                where = f"{path.relative_to(DEPLOY.parent)}:{number} ({key})"
                rows = [row for row in manual.splitlines() if row.startswith("|") and f"`{key}`" in row]
                assert rows, f"{where} is not in docs/deployment.md's table of placeholders"
                named = set(re.findall(r"`(\w+)`", " ".join(rows)))
                assert named & (outputs | {"containerImage", "digest"}), f"{where}: no Bicep output named beside it"


def checkov_skips() -> list[tuple[str, str, str]]:
    """(file, check id, reason) of every checkov skip under deploy/: comments, and annotations in manifests."""
    skips = []
    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file() or path.suffix not in {"", ".bicep", ".yaml", ".json"}:
            continue
        text = path.read_text(encoding="utf-8")
        where = str(path.relative_to(DEPLOY.parent))
        for check, reason in re.findall(r"checkov:skip=(CKV\w+):\s*([^\n]*)", text):
            skips.append((where, check, reason.strip()))
        if path.suffix == ".yaml":
            for document in yaml.safe_load_all(text):
                annotations = ((document or {}).get("metadata") or {}).get("annotations") or {}
                for key, value in annotations.items():
                    if key.startswith("checkov.io/skip"):
                        check, _, reason = str(value).partition("=")
                        skips.append((where, check.strip(), reason.strip()))
    return skips


def test_every_checkov_skip_has_a_reason_and_is_in_the_manual() -> None:
    """A finding accepted instead of fixed says why beside the resource, and the manual's table lists it."""
    skips = checkov_skips()
    assert {check for _, check, _ in skips} >= {"CKV_K8S_14", "CKV_K8S_43", "CKV_DOCKER_7", "CKV_AZURE_75"}
    manual = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text(encoding="utf-8")
    section = markdown_sections(manual)["Security scan (checkov)"]
    table = markdown_table_rows(section, ("check", "finding", "outcome"))
    skipped_in_manual = {row["check"] for row in table if row["outcome"].startswith("skipped")}
    for where, check, reason in skips:
        assert len(reason.split()) >= 6, f"{where}: {check} skipped without a real reason: {reason!r}"
        assert "=" not in reason, f"{where}: checkov splits annotation skips at '=' ({reason!r})"
        assert check in skipped_in_manual, f"{where}: {check} is skipped but not listed in docs/deployment.md"
