"""infra/rules/ (checkov custom checks): each rule fails on a copy of the templates broken the way it guards.

One checkov run over every mutated copy (and the real templates, which must pass every rule): checkov's
start-up costs seconds, so it runs once for all of them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.infra.conftest import ROOT

Template = dict[str, Any]


def resource(template: Template, name: str) -> dict[str, Any]:
    return template["Resources"][name]["Properties"]  # type: ignore[no-any-return]


def data_volume_deleted_with_instance(t: Template) -> None:  # the review's first finding, as it was
    devices = resource(t, "CassandraLaunchTemplate")["LaunchTemplateData"]["BlockDeviceMappings"]
    devices.append(
        {"DeviceName": "/dev/xvdb", "Ebs": {"VolumeType": "gp3", "Encrypted": True, "DeleteOnTermination": True}}
    )


def node_slot_over_three_zones(t: Template) -> None:
    resource(t, "CassandraAutoScalingGroup1")["VPCZoneIdentifier"] = {"Ref": "PrivateSubnetIds"}


def readyz_health_check(t: Template) -> None:
    resource(t, "ApiTargetGroup")["HealthCheckPath"] = "/readyz"


def service_without_circuit_breaker(t: Template) -> None:
    del resource(t, "CassandraService2")["DeploymentConfiguration"]["DeploymentCircuitBreaker"]


def binpack_with_rebalancing(t: Template) -> None:
    resource(t, "WorkerService")["PlacementStrategies"][1] = {"Type": "binpack", "Field": "memory"}


def imds_v1(t: Template) -> None:
    resource(t, "AppLaunchTemplate")["LaunchTemplateData"]["MetadataOptions"]["HttpTokens"] = "optional"


def redis_without_tls(t: Template) -> None:
    resource(t, "Redis")["TransitEncryptionEnabled"] = False


def unencrypted_data_volume(t: Template) -> None:
    resource(t, "CassandraVolume3")["Encrypted"] = False


def deletion_protection_on_create(t: Template) -> None:
    for attribute in resource(t, "LoadBalancer")["LoadBalancerAttributes"]:
        if attribute["Key"] == "deletion_protection.enabled":
            attribute["Value"] = "true"


def every_route_public(t: Template) -> None:
    resource(t, "HttpsListener")["DefaultActions"] = [{"Type": "forward", "TargetGroupArn": {"Ref": "ApiTargetGroup"}}]


def worker_without_health_check(t: Template) -> None:
    del resource(t, "WorkerTaskDefinition")["ContainerDefinitions"][0]["HealthCheck"]


def broker_without_failover(t: Template) -> None:  # a replica that is never promoted keeps no 202
    resource(t, "Redis")["AutomaticFailoverEnabled"] = False


def broker_of_one_node(t: Template) -> None:
    resource(t, "Redis")["NumCacheClusters"] = 1


def primary_writes_without_a_replica(t: Template) -> None:  # an isolated old primary takes events a failover drops
    del resource(t, "RedisParameters")["Properties"]["min-slaves-to-write"]


def api_acknowledges_on_the_primary_alone(t: Template) -> None:
    environment = resource(t, "ApiTaskDefinition")["ContainerDefinitions"][0]["Environment"]
    environment[:] = [e for e in environment if e["Name"] != "SLUICE_REDIS_MIN_REPLICAS"]


def api_waits_for_no_replica_by_default(t: Template) -> None:  # checkov renders a Ref as the parameter's default
    t["Parameters"]["RedisMinReplicas"].update(Default=0, MinValue=0)


#: rule id -> (template, how to break it)
MUTATIONS: list[tuple[str, str, Callable[[Template], None]]] = [
    ("CKV_SLUICE_1", "cluster", data_volume_deleted_with_instance),
    ("CKV_SLUICE_2", "cluster", node_slot_over_three_zones),
    ("CKV_SLUICE_3", "services", readyz_health_check),
    ("CKV_SLUICE_4", "data", service_without_circuit_breaker),
    ("CKV_SLUICE_5", "services", binpack_with_rebalancing),
    ("CKV_SLUICE_6", "cluster", imds_v1),
    ("CKV_SLUICE_7", "data", redis_without_tls),
    ("CKV_SLUICE_7", "cluster", unencrypted_data_volume),
    ("CKV_SLUICE_8", "services", deletion_protection_on_create),
    ("CKV_SLUICE_9", "services", every_route_public),
    ("CKV_SLUICE_10", "services", worker_without_health_check),
    ("CKV_SLUICE_11", "data", broker_without_failover),
    ("CKV_SLUICE_11", "data", broker_of_one_node),
    ("CKV_SLUICE_11", "data", primary_writes_without_a_replica),
    ("CKV_SLUICE_12", "services", api_acknowledges_on_the_primary_alone),
    ("CKV_SLUICE_12", "services", api_waits_for_no_replica_by_default),
]


def rule_ids() -> list[str]:
    text = (ROOT / "infra" / "rules" / "sluice_checks.py").read_text()
    return sorted(set(re.findall(r'"(CKV_SLUICE_\d+)"', text)))


def run_checkov(files: list[Path]) -> list[dict[str, Any]]:
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false", "LOG_LEVEL": "WARNING"}
    command = [str(Path(sys.executable).parent / "checkov"), "--skip-download", "--quiet", "--output", "json"]
    command += ["--framework", "cloudformation", "--external-checks-dir", str(ROOT / "infra" / "rules")]
    command += ["--check", ",".join(rule_ids())]
    for file in files:
        command += ["--file", str(file)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert completed.returncode in (0, 1), completed.stderr[-2000:]
    report = json.loads(completed.stdout)
    reports = report if isinstance(report, list) else [report]
    return [failed for r in reports for failed in r.get("results", {}).get("failed_checks", [])]


@pytest.mark.timeout(300)
def test_every_rule_fails_on_the_template_it_guards_broken(templates: dict[str, Template], tmp_path: Path) -> None:
    # Every rule has at least one mutation that must trip it.
    assert set(rule_ids()) == {rule for rule, _, _ in MUTATIONS}
    files: list[Path] = []
    for index, (rule, name, mutate) in enumerate(MUTATIONS):
        broken = copy.deepcopy(templates[name])
        mutate(broken)
        path = tmp_path / f"{index:02d}-{rule}-{mutate.__name__}.json"
        path.write_text(json.dumps(broken))
        files.append(path)
    originals = [ROOT / "infra" / f"{name}.yaml" for name in templates]
    failed = run_checkov(files + originals)
    by_file: dict[str, set[str]] = {}
    for check in failed:
        by_file.setdefault(Path(check["file_path"]).name, set()).add(check["check_id"])
    for path, (rule, _, mutate) in zip(files, MUTATIONS, strict=True):
        # The broken copy fails exactly the rule that guards what was broken.
        assert by_file.get(path.name) == {rule}, (mutate.__name__, by_file.get(path.name))
    for original in originals:
        assert original.name not in by_file, (original.name, by_file[original.name])
