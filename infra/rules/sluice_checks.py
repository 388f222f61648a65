"""Checkov custom checks (``checkov --external-checks-dir infra/rules``), ids CKV_SLUICE_*.

Each guards one finding of the deploy review that cfn-lint and checkov's own checks could not see.
Checkov renders a ``Ref`` to a parameter as that parameter's default, so a default is checked like a
literal: a template deployed with its defaults must pass.
"""

from __future__ import annotations

from typing import Any

from checkov.cloudformation.checks.resource.base_resource_check import BaseResourceCheck
from checkov.common.models.enums import CheckCategories, CheckResult

#: The root device of the ECS-optimized AMI: the only volume allowed to die with its instance.
ROOT_DEVICE = "/dev/xvda"
#: The tag naming a Cassandra node slot (infra/cluster.yaml).
SLOT_TAG = "SluiceCassandraNode"


def _properties(conf: dict[str, Any]) -> dict[str, Any]:
    properties = conf.get("Properties")
    return properties if isinstance(properties, dict) else {}


def _is_true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _tags(properties: dict[str, Any]) -> dict[Any, Any]:
    tags = properties.get("Tags")
    return {t.get("Key"): t.get("Value") for t in tags if isinstance(t, dict)} if isinstance(tags, list) else {}


class _Check(BaseResourceCheck):
    def __init__(self, check_id: str, name: str, resources: list[str], category: Any) -> None:
        super().__init__(name=name, id=check_id, categories=[category], supported_resources=resources)

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        return CheckResult.PASSED if self.passes(_properties(conf)) else CheckResult.FAILED

    def passes(self, properties: dict[str, Any]) -> bool:
        raise NotImplementedError


class DataVolumesOutliveInstances(_Check):
    """A launch template's volumes other than the root die with nothing: data is never DeleteOnTermination.

    (The Cassandra data volumes are AWS::EC2::Volume resources of their own, re-attached by slot; their
    DeletionPolicy, which checkov does not show to checks, is asserted by tests/infra/test_infra_templates.py.)
    """

    def __init__(self) -> None:
        super().__init__(
            "CKV_SLUICE_1",
            "Data volumes outlive their instance (no DeleteOnTermination except the root volume)",
            ["AWS::EC2::LaunchTemplate"],
            CheckCategories.BACKUP_AND_RECOVERY,
        )

    def passes(self, properties: dict[str, Any]) -> bool:
        data = properties.get("LaunchTemplateData") or {}
        for device in data.get("BlockDeviceMappings") or []:
            ebs = device.get("Ebs") or {}
            if device.get("DeviceName") != ROOT_DEVICE and _is_true(ebs.get("DeleteOnTermination", True)):
                return False
        return True


class OneCassandraNodePerZone(_Check):
    """A Cassandra slot's group has one instance in one subnet: its replacement lands beside its volume."""

    def __init__(self) -> None:
        super().__init__(
            "CKV_SLUICE_2",
            "Each Cassandra node slot is a one-instance Auto Scaling group in a single zone",
            ["AWS::AutoScaling::AutoScalingGroup"],
            CheckCategories.BACKUP_AND_RECOVERY,
        )

    def passes(self, properties: dict[str, Any]) -> bool:
        if SLOT_TAG not in _tags(properties):
            return True
        subnets = properties.get("VPCZoneIdentifier")
        one_subnet = isinstance(subnets, list) and len(subnets) == 1
        return one_subnet and str(properties.get("MinSize")) == str(properties.get("MaxSize")) == "1"


class LivenessHealthCheck(_Check):
    """The load balancer checks liveness (/healthz): /readyz asks Cassandra, which accepting events does not need."""

    def __init__(self) -> None:
        super().__init__(
            "CKV_SLUICE_3",
            "Target groups health-check /healthz, not a dependency-checking path",
            ["AWS::ElasticLoadBalancingV2::TargetGroup"],
            CheckCategories.GENERAL_SECURITY,
        )

    def passes(self, properties: dict[str, Any]) -> bool:
        return properties.get("HealthCheckPath") == "/healthz"


class ServiceCircuitBreaker(_Check):
    """Every ECS service rolls a failing deployment back by itself."""

    def __init__(self) -> None:
        super().__init__(
            "CKV_SLUICE_4",
            "Every ECS service has the deployment circuit breaker with rollback",
            ["AWS::ECS::Service"],
            CheckCategories.GENERAL_SECURITY,
        )

    def passes(self, properties: dict[str, Any]) -> bool:
        breaker = (properties.get("DeploymentConfiguration") or {}).get("DeploymentCircuitBreaker") or {}
        return _is_true(breaker.get("Enable")) and _is_true(breaker.get("Rollback"))


class NoBinpackWithZoneRebalancing(_Check):
    """AWS refuses (or ignores) Availability Zone rebalancing for a service that binpacks."""

    def __init__(self) -> None:
        super().__init__(
            "CKV_SLUICE_5",
            "No binpack placement on a service with Availability Zone rebalancing",
            ["AWS::ECS::Service"],
            CheckCategories.GENERAL_SECURITY,
        )

    def passes(self, properties: dict[str, Any]) -> bool:
        if properties.get("AvailabilityZoneRebalancing") != "ENABLED":
            return True
        strategies = properties.get("PlacementStrategies") or []
        return not any(isinstance(s, dict) and s.get("Type") == "binpack" for s in strategies)


class InstanceMetadataV2(_Check):
    """Instances answer metadata only with a session token, and containers get no extra hop to it."""

    def __init__(self) -> None:
        super().__init__(
            "CKV_SLUICE_6",
            "Launch templates require IMDSv2 with a hop limit of 1",
            ["AWS::EC2::LaunchTemplate"],
            CheckCategories.GENERAL_SECURITY,
        )

    def passes(self, properties: dict[str, Any]) -> bool:
        options = (properties.get("LaunchTemplateData") or {}).get("MetadataOptions") or {}
        return options.get("HttpTokens") == "required" and str(options.get("HttpPutResponseHopLimit")) == "1"


class EncryptedEverywhere(_Check):
    """Every volume, the broker (at rest and in transit), every log group and topic is encrypted."""

    def __init__(self) -> None:
        super().__init__(
            "CKV_SLUICE_7",
            "Volumes, ElastiCache, log groups and SNS topics are encrypted",
            [
                "AWS::EC2::Volume",
                "AWS::EC2::LaunchTemplate",
                "AWS::ElastiCache::ReplicationGroup",
                "AWS::Logs::LogGroup",
                "AWS::SNS::Topic",
            ],
            CheckCategories.ENCRYPTION,
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        properties = _properties(conf)
        kind = conf.get("Type")
        if kind == "AWS::EC2::Volume":
            ok = _is_true(properties.get("Encrypted"))
        elif kind == "AWS::EC2::LaunchTemplate":
            devices = (properties.get("LaunchTemplateData") or {}).get("BlockDeviceMappings") or []
            ok = all(_is_true((d.get("Ebs") or {}).get("Encrypted")) for d in devices)
        elif kind == "AWS::ElastiCache::ReplicationGroup":
            ok = (
                _is_true(properties.get("AtRestEncryptionEnabled"))
                and _is_true(properties.get("TransitEncryptionEnabled"))
                and properties.get("TransitEncryptionMode", "required") == "required"
            )
        elif kind == "AWS::Logs::LogGroup":
            ok = bool(properties.get("KmsKeyId"))
        else:
            ok = bool(properties.get("KmsMasterKeyId"))
        return CheckResult.PASSED if ok else CheckResult.FAILED


class DeletionProtectionNotOnCreate(_Check):
    """Deletion protection hard-wired on makes a failed first create end in ROLLBACK_FAILED."""

    def __init__(self) -> None:
        super().__init__(
            "CKV_SLUICE_8",
            "Load balancer deletion protection comes from a parameter whose default is false",
            ["AWS::ElasticLoadBalancingV2::LoadBalancer"],
            CheckCategories.GENERAL_SECURITY,
        )

    def passes(self, properties: dict[str, Any]) -> bool:
        attributes = properties.get("LoadBalancerAttributes") or []
        values = [a.get("Value") for a in attributes if a.get("Key") == "deletion_protection.enabled"]
        return not any(_is_true(v) for v in values)


class OnlyPublicRoutesAtTheEdge(_Check):
    """Operator routes (/metrics, /docs, /openapi.json, /readyz) never reach the internet: 404 by default."""

    def __init__(self) -> None:
        super().__init__(
            "CKV_SLUICE_9",
            "Internet-facing listeners answer a fixed 404 unless a rule forwards a public route",
            ["AWS::ElasticLoadBalancingV2::Listener"],
            CheckCategories.NETWORKING,
        )

    def passes(self, properties: dict[str, Any]) -> bool:
        actions = properties.get("DefaultActions") or []
        return bool(actions) and all(
            a.get("Type") == "fixed-response" and str((a.get("FixedResponseConfig") or {}).get("StatusCode")) == "404"
            for a in actions
        )


class LongRunningContainersHaveHealthChecks(_Check):
    """ECS replaces a stuck process only if it can tell: every essential container has a health check."""

    def __init__(self) -> None:
        super().__init__(
            "CKV_SLUICE_10",
            "Essential containers of long-running tasks have a health check",
            ["AWS::ECS::TaskDefinition"],
            CheckCategories.GENERAL_SECURITY,
        )

    def passes(self, properties: dict[str, Any]) -> bool:
        containers = properties.get("ContainerDefinitions") or []
        return all(c.get("HealthCheck") for c in containers if _is_true(c.get("Essential", True)))


def _count(value: Any) -> int | None:
    """A count as CloudFormation writes it (1, "1"); None when it is not a literal (an unresolved function)."""
    if isinstance(value, bool):
        return None
    try:
        return int(str(value))
    except ValueError:
        return None


class BrokerKeepsAcknowledgedWrites(_Check):
    """The broker keeps what the API acknowledged: a failover promotes a replica, and no primary takes writes
    without one.

    ElastiCache replicates asynchronously; a 202 survives the primary's loss only because a replica confirmed it
    (the API's WAIT, CKV_SLUICE_12) and that replica is promoted (Multi-AZ, automatic failover, a second node).
    The primary's parameter group makes it refuse writes when no replica is in reach (``min-slaves-to-write``,
    ``min-replicas-to-write`` in Redis's newer name), so an isolated old primary cannot take events that the
    failover drops; the default parameter groups leave it at 0 and cannot be changed, so a group of our own is
    required.
    """

    def __init__(self) -> None:
        super().__init__(
            "CKV_SLUICE_11",
            "The Redis broker fails over to a replica and refuses writes that no replica can receive",
            ["AWS::ElastiCache::ReplicationGroup", "AWS::ElastiCache::ParameterGroup"],
            CheckCategories.BACKUP_AND_RECOVERY,
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        properties = _properties(conf)
        if conf.get("Type") == "AWS::ElastiCache::ParameterGroup":
            ok = self._parameters_pass(properties)
        else:
            ok = self._group_passes(properties)
        return CheckResult.PASSED if ok else CheckResult.FAILED

    @staticmethod
    def _group_passes(properties: dict[str, Any]) -> bool:
        if properties.get("Engine", "redis") not in ("redis", "valkey"):
            return True
        nodes = _count(properties.get("NumCacheClusters"))
        if nodes is None and "NumCacheClusters" not in properties:  # cluster mode: node groups of 1 + replicas
            replicas = _count(properties.get("ReplicasPerNodeGroup"))
            nodes = None if replicas is None else replicas + 1
        return (
            _is_true(properties.get("AutomaticFailoverEnabled"))
            and _is_true(properties.get("MultiAZEnabled"))
            and nodes is not None
            and nodes >= 2
            and bool(properties.get("CacheParameterGroupName"))
        )

    @staticmethod
    def _parameters_pass(properties: dict[str, Any]) -> bool:
        family = str(properties.get("CacheParameterGroupFamily", ""))
        if not family.startswith(("redis", "valkey")):
            return True  # memcached keeps no queue
        values = properties.get("Properties")
        values = values if isinstance(values, dict) else {}
        required = [_count(values.get(name)) for name in ("min-slaves-to-write", "min-replicas-to-write")]
        return any(n is not None and n >= 1 for n in required)


class ApiWaitsForAReplica(_Check):
    """The API answers 202 only once a replica confirmed the publish (``SLUICE_REDIS_MIN_REPLICAS`` >= 1).

    Without it (the setting's default is 0, for one local node) a 202 means the events are on the primary alone,
    and an ElastiCache failover can drop them. The API's container is the one running ``sluice api``.
    """

    def __init__(self) -> None:
        super().__init__(
            "CKV_SLUICE_12",
            "The API task waits for a Redis replica before it acknowledges events (SLUICE_REDIS_MIN_REPLICAS >= 1)",
            ["AWS::ECS::TaskDefinition"],
            CheckCategories.BACKUP_AND_RECOVERY,
        )

    def passes(self, properties: dict[str, Any]) -> bool:
        for container in properties.get("ContainerDefinitions") or []:
            if not isinstance(container, dict) or container.get("Command") != ["sluice", "api"]:
                continue
            environment = {
                e.get("Name"): e.get("Value") for e in container.get("Environment") or [] if isinstance(e, dict)
            }
            replicas = _count(environment.get("SLUICE_REDIS_MIN_REPLICAS"))
            if replicas is None or replicas < 1:
                return False
        return True


data_volumes_outlive_instances = DataVolumesOutliveInstances()
one_cassandra_node_per_zone = OneCassandraNodePerZone()
liveness_health_check = LivenessHealthCheck()
service_circuit_breaker = ServiceCircuitBreaker()
no_binpack_with_zone_rebalancing = NoBinpackWithZoneRebalancing()
instance_metadata_v2 = InstanceMetadataV2()
encrypted_everywhere = EncryptedEverywhere()
deletion_protection_not_on_create = DeletionProtectionNotOnCreate()
only_public_routes_at_the_edge = OnlyPublicRoutesAtTheEdge()
long_running_containers_have_health_checks = LongRunningContainersHaveHealthChecks()
broker_keeps_acknowledged_writes = BrokerKeepsAcknowledgedWrites()
api_waits_for_a_replica = ApiWaitsForAReplica()
