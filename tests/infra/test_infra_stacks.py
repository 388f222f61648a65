"""The deploy tool creates, in order, every stack moto can create, in a moto server.

moto's CloudFormation skips what it does not implement (capacity providers, ElastiCache, Cloud Map,
CloudWatch alarms, ...) and then leaves out the outputs that name them. So: with the Cassandra ring,
foundation -> network -> cluster are created for real (volumes, groups, roles, launch templates); without
it (external Cassandra), the data stack too. The services stack needs outputs of skipped resources
(capacity providers), so it is planned (--dry-run against the same moto) rather than created.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiobotocore.session
import pytest
from botocore.exceptions import ClientError

from infra import deploy as d

T = TypeVar("T")
# moto warns (from its server thread) for each resource type it skips; that is the point here, not an error.
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS.* not supported by moto:UserWarning")
IMAGE_TAG = "abc123"
CERTIFICATE = "arn:aws:acm:us-east-1:123456789012:certificate/x"
API_KEYS = "arn:aws:secretsmanager:us-east-1:123456789012:secret:sluice/api-keys"


def with_aws(endpoint: str, body: Callable[[d.Clients, Any], Awaitable[T]]) -> T:
    async def run() -> T:
        session = aiobotocore.session.get_session()
        async with (
            session.create_client("cloudformation", endpoint_url=endpoint) as cfn,
            session.create_client("ecr", endpoint_url=endpoint) as ecr,
            session.create_client("ecs", endpoint_url=endpoint) as ecs,
            session.create_client("iam", endpoint_url=endpoint) as iam,
            session.create_client("ec2", endpoint_url=endpoint) as ec2,
            session.create_client("autoscaling", endpoint_url=endpoint) as autoscaling,
        ):
            clients = d.Clients(cloudformation=cfn, ecr=ecr, ecs=ecs, iam=iam)
            return await body(clients, {"ec2": ec2, "autoscaling": autoscaling})

    return asyncio.run(run())


def config(**overrides: Any) -> d.DeployConfig:
    base: dict[str, Any] = {
        "poll_seconds": 0.05,
        "validate_templates": False,
        "image_tag": IMAGE_TAG,
        "run_schema": False,
        "certificate_arn": CERTIFICATE,
        "api_keys_secret_arn": API_KEYS,
    }
    return d.DeployConfig(**{**base, **overrides})


async def push_release_image(clients: d.Clients) -> None:
    """The foundation stack, and this release's image in its repository (no Docker engine here)."""
    await d.deploy(config(stacks=("foundation",)), clients, lambda _: None, never_build)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {},
        "layers": [],
    }
    await clients.ecr.put_image(repositoryName="sluice", imageManifest=json.dumps(manifest), imageTag=IMAGE_TAG)


def never_build(*args: Any) -> None:
    raise AssertionError(f"nothing should be built here: {args}")


@pytest.mark.timeout(180)
def test_the_ring_stacks_are_created_in_order(aws: str) -> None:
    lines: list[str] = []

    async def scenario(clients: d.Clients, extra: Any) -> dict[str, Any]:
        await push_release_image(clients)
        cfg = config(stacks=("foundation", "network", "cluster"))
        outputs = await d.deploy(cfg, clients, lines.append, never_build)
        volumes = [
            v
            for v in (await extra["ec2"].describe_volumes())["Volumes"]
            # moto keeps CloudFormation's own tags on a volume, not the template's (slot tags: test_infra_templates)
            if any(t["Key"] == "aws:cloudformation:logical-id" for t in v.get("Tags") or [])
        ]
        names = outputs["cluster"]["CassandraAutoScalingGroupNames"].split(",")
        groups = (await extra["autoscaling"].describe_auto_scaling_groups(AutoScalingGroupNames=names))[
            "AutoScalingGroups"
        ]
        roles = [r["RoleName"] for r in (await clients.iam.list_roles(PathPrefix="/aws-service-role/"))["Roles"]]
        return {"outputs": outputs, "volumes": volumes, "groups": groups, "roles": roles}

    found = with_aws(aws, scenario)
    created = [
        line.split()[1].removesuffix(":") for line in lines if line.startswith("stack ") and ": created in" in line
    ]
    assert created == ["sluice-network", "sluice-cluster"]  # foundation existed (the image's repository)
    # Service-linked roles first: a new account's ECS cluster needs AWSServiceRoleForECS.
    # (moto names service-linked roles its own way, so count them; AWS's names are checked below with a fake.)
    assert len(found["roles"]) >= len(d.SERVICE_LINKED_ROLES)
    assert sum(line.startswith("service-linked role ") for line in lines) == len(d.SERVICE_LINKED_ROLES)
    assert lines.index("service-linked role AWSServiceRoleForECS: created for ecs.amazonaws.com") < lines.index(
        "stack sluice-network: creating from infra/network.yaml"
    )
    cluster = found["outputs"]["cluster"]
    zones = found["outputs"]["network"]["PrivateSubnetZones"].split(",")
    assert len(set(zones)) == 3
    # One data volume per slot, in the slot's zone, and one single-subnet group per slot.
    by_slot = {
        next(t["Value"] for t in v["Tags"] if t["Key"] == "aws:cloudformation:logical-id"): v for v in found["volumes"]
    }
    assert sorted(by_slot) == ["CassandraVolume1", "CassandraVolume2", "CassandraVolume3"]
    assert [by_slot[f"CassandraVolume{n}"]["AvailabilityZone"] for n in (1, 2, 3)] == zones
    assert sorted(cluster["CassandraVolumeIds"].split(",")) == sorted(v["VolumeId"] for v in found["volumes"])
    slot_groups = {
        g["AutoScalingGroupName"]: g
        for g in found["groups"]
        if g["AutoScalingGroupName"].startswith("sluice-cassandra-")
    }
    assert cluster["CassandraAutoScalingGroupNames"].split(",") == sorted(slot_groups)
    private = found["outputs"]["network"]["PrivateSubnetIds"].split(",")
    for n, name in enumerate(sorted(slot_groups)):
        group = slot_groups[name]
        assert (group["MinSize"], group["MaxSize"]) == (1, 1)
        assert group["VPCZoneIdentifier"] == private[n]


@pytest.mark.timeout(180)
def test_the_external_cassandra_stacks_are_created_and_the_services_planned(aws: str) -> None:
    lines: list[str] = []

    async def scenario(clients: d.Clients, extra: Any) -> list[str]:
        await push_release_image(clients)
        cfg = config(cassandra_mode="external", external_cassandra_endpoint="cassandra.example.internal")
        with pytest.raises(d.DeployError, match="output AppCapacityProvider"):  # skipped by moto
            await d.deploy(cfg, clients, lines.append, never_build)
        return await d.plan(
            config(cassandra_mode="external", external_cassandra_endpoint="cassandra.example.internal", dry_run=True),
            clients,
            lambda _: None,
        )

    plan = with_aws(aws, scenario)
    created = [line.split()[1].removesuffix(":") for line in lines if ": created in" in line]
    assert created == ["sluice-network", "sluice-cluster", "sluice-data"]
    text = "\n".join(plan)
    assert "stack sluice-data: would update (now CREATE_COMPLETE)" in text
    assert "stack sluice-services: would create from infra/services.yaml" in text
    # A first create of the services stack: no deletion protection, so a failure can roll back.
    assert "    AlbDeletionProtection = false" in text
    assert "    CassandraContactPoints = cassandra.example.internal" in text


def test_deletion_protection_is_on_once_the_services_stack_exists(aws: str) -> None:
    async def scenario(clients: d.Clients, extra: Any) -> list[str]:
        minimal = {"Resources": {"Topic": {"Type": "AWS::SNS::Topic"}}}
        await clients.cloudformation.create_stack(StackName="sluice-services", TemplateBody=json.dumps(minimal))
        return await d.plan(config(dry_run=True, stacks=("services",)), clients, lambda _: None)

    assert "    AlbDeletionProtection = true" in "\n".join(with_aws(aws, scenario))


@pytest.mark.timeout(180)
def test_a_release_keeps_the_rings_helper_image(aws: str) -> None:
    """The helper image is the release's on the first deploy (tagged so ECR keeps it), then stays."""
    lines: list[str] = []

    async def scenario(clients: d.Clients, extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        await push_release_image(clients)
        outputs: dict[str, Any] = {
            "image": {"ImageUri": f"123456789012.dkr.ecr.us-east-1.amazonaws.com/sluice:{IMAGE_TAG}"}
        }
        outputs["foundation"] = d.stack_outputs(
            await d.describe_stack(clients.cloudformation, "sluice-foundation") or {}
        )
        first = await d.helper_image(config(), clients, outputs, lines.append)
        # The data stack now exists and names that helper; the next release has another image.
        template = {
            "Parameters": {"H": {"Type": "String"}},
            "Resources": {"Topic": {"Type": "AWS::SNS::Topic"}},
            "Outputs": {"CassandraHelperImage": {"Value": {"Ref": "H"}}},
        }
        await clients.cloudformation.create_stack(
            StackName="sluice-data",
            TemplateBody=json.dumps(template),
            Parameters=[{"ParameterKey": "H", "ParameterValue": first}],
        )
        outputs["image"] = {"ImageUri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/sluice:def456"}
        kept = await d.helper_image(config(), clients, outputs, lines.append)
        tags = [i["imageTag"] for i in (await clients.ecr.list_images(repositoryName="sluice"))["imageIds"]]
        return {"first": first, "kept": kept}, {"tags": tags}

    images, ecr = with_aws(aws, scenario)
    assert images["first"].endswith(f"/sluice:cassandra-helper-{IMAGE_TAG}")
    assert images["kept"] == images["first"]
    assert f"cassandra-helper-{IMAGE_TAG}" in ecr["tags"]
    assert any("keeping" in line and "not restarted" in line for line in lines)


class FakeIam:
    """An account with ECS's role already, where ElastiCache's appears between our check and our create."""

    def __init__(self) -> None:
        self.created: list[str] = []

    async def get_role(self, RoleName: str) -> dict[str, Any]:
        if RoleName == "AWSServiceRoleForECS":
            return {"Role": {"RoleName": RoleName}}
        raise ClientError({"Error": {"Code": "NoSuchEntity", "Message": "not found"}}, "GetRole")

    async def create_service_linked_role(self, AWSServiceName: str) -> dict[str, Any]:
        if AWSServiceName == "elasticache.amazonaws.com":
            message = "Service role name AWSServiceRoleForElastiCache has been taken in this account"
            raise ClientError({"Error": {"Code": "InvalidInput", "Message": message}}, "CreateServiceLinkedRole")
        self.created.append(AWSServiceName)
        return {}


def test_service_linked_roles_are_created_only_where_missing() -> None:
    iam = FakeIam()
    lines: list[str] = []
    created = asyncio.run(d.ensure_service_linked_roles(iam, lines.append))
    assert iam.created == ["autoscaling.amazonaws.com", "ecs.application-autoscaling.amazonaws.com"]
    assert "AWSServiceRoleForECS" not in created
    planned: list[str] = []
    asyncio.run(d.ensure_service_linked_roles(FakeIam(), planned.append, dry_run=True))
    assert len(planned) == 3
    assert all("would create" in line for line in planned)
    assert "service-linked role AWSServiceRoleForElastiCache: already there" in lines
