"""infra/cassandra_discovery.py against moto (EC2, Auto Scaling, Cloud Map) and a fake metadata service."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiobotocore.session
import pytest

from infra.cassandra_discovery import (
    INSTANCE_ATTRIBUTE,
    SLOT_TAG,
    Discovery,
    DiscoveryError,
    Node,
    choose_seeds,
    discover,
    has_node_data,
    main,
    read_instance_identity,
)

GROUPS = ("sluice-cassandra-1", "sluice-cassandra-2", "sluice-cassandra-3")


async def make_ring(endpoint: str) -> tuple[list[dict[str, Any]], str]:
    """Three one-instance slot groups (tagged like the templates' groups) and a Cloud Map service holding
    one record of no slot (from before slots)."""
    session = aiobotocore.session.get_session()
    async with (
        session.create_client("ec2", endpoint_url=endpoint) as ec2,
        session.create_client("autoscaling", endpoint_url=endpoint) as autoscaling,
        session.create_client("servicediscovery", endpoint_url=endpoint) as cloudmap,
    ):
        vpc = (await ec2.create_vpc(CidrBlock="10.40.0.0/16"))["Vpc"]["VpcId"]
        subnet = (await ec2.create_subnet(VpcId=vpc, CidrBlock="10.40.64.0/19"))["Subnet"]["SubnetId"]
        images = (await ec2.describe_images())["Images"]
        await ec2.create_launch_template(
            LaunchTemplateName="cassandra",
            LaunchTemplateData={"ImageId": images[0]["ImageId"], "InstanceType": "r6i.xlarge"},
        )
        for group in GROUPS:
            await autoscaling.create_auto_scaling_group(
                AutoScalingGroupName=group,
                LaunchTemplate={"LaunchTemplateName": "cassandra", "Version": "$Latest"},
                MinSize=1,
                MaxSize=1,
                DesiredCapacity=1,
                VPCZoneIdentifier=subnet,
                Tags=[{"Key": SLOT_TAG, "Value": group, "PropagateAtLaunch": True}],
            )
        # An instance of another group must never count.
        await ec2.run_instances(ImageId=images[0]["ImageId"], MinCount=1, MaxCount=1, SubnetId=subnet)
        await cloudmap.create_private_dns_namespace(Name="sluice.internal", Vpc=vpc)
        namespace = (await cloudmap.list_namespaces())["Namespaces"][0]["Id"]
        service = (
            await cloudmap.create_service(
                Name="cassandra",
                NamespaceId=namespace,
                DnsConfig={"RoutingPolicy": "MULTIVALUE", "DnsRecords": [{"Type": "A", "TTL": 10}]},
            )
        )["Service"]["Id"]
        await cloudmap.register_instance(
            ServiceId=service, InstanceId="i-0gone", Attributes={"AWS_INSTANCE_IPV4": "10.40.99.9"}
        )
        reservations = (
            await ec2.describe_instances(Filters=[{"Name": "tag:aws:autoscaling:groupName", "Values": list(GROUPS)}])
        )["Reservations"]
    instances = [i for r in reservations for i in r["Instances"]]
    assert len(instances) == len(GROUPS)
    return instances, service


async def registered(endpoint: str, service: str) -> dict[str, dict[str, str]]:
    session = aiobotocore.session.get_session()
    async with session.create_client("servicediscovery", endpoint_url=endpoint) as cloudmap:
        found = (await cloudmap.list_instances(ServiceId=service))["Instances"]
    return {i["Id"]: i["Attributes"] for i in found}


def slot_of(instance: dict[str, Any]) -> str:
    return next(t["Value"] for t in instance["Tags"] if t["Key"] == SLOT_TAG)


def as_node(instance: dict[str, Any], zone: str = "us-east-1a") -> Node:
    return Node(instance["InstanceId"], instance["PrivateIpAddress"], zone, instance["LaunchTime"], slot_of(instance))


def run_discover(endpoint: str, me: Node, data_dir: Path, service: str) -> Discovery:
    async def run() -> Discovery:
        session = aiobotocore.session.get_session()
        async with (
            session.create_client("ec2", endpoint_url=endpoint) as ec2,
            session.create_client("servicediscovery", endpoint_url=endpoint) as cloudmap,
        ):
            return await discover(
                ec2,
                cloudmap,
                me=me,
                auto_scaling_groups=GROUPS,
                service_id=service,
                seed_count=2,
                data_dir=data_dir,
                poll_s=0.01,
            )

    return asyncio.run(run())


def test_seeds_are_the_longest_running_nodes_the_same_everywhere() -> None:
    def node(instance_id: str, ip: str, minute: int) -> Node:
        return Node(instance_id, ip, "us-east-1a", datetime(2026, 1, 1, 0, minute, tzinfo=UTC))

    nodes = [node("i-3", "10.0.0.3", 5), node("i-1", "10.0.0.1", 0), node("i-2", "10.0.0.2", 0)]
    assert choose_seeds(nodes, 2) == ("10.0.0.1", "10.0.0.2")
    assert choose_seeds(list(reversed(nodes)), 2) == ("10.0.0.1", "10.0.0.2")
    assert choose_seeds(nodes[:1], 2) == ("10.0.0.3",)
    assert choose_seeds(nodes, 2, exclude="i-1") == ("10.0.0.2", "10.0.0.3")  # a replacement seeds nobody
    with pytest.raises(ValueError, match="rm -rf"):
        node("i-4", "10.0.0.4; rm -rf /", 0)  # written to a file that a shell sources


def test_discover_registers_this_slot_drops_records_of_no_slot_and_picks_seeds(aws: str, tmp_path: Path) -> None:
    instances, service = asyncio.run(make_ring(aws))
    ordered = sorted(instances, key=lambda i: (i["LaunchTime"], i["InstanceId"]))
    me = as_node(ordered[-1])
    found = run_discover(aws, me, tmp_path / "empty", service)
    assert {n.instance_id for n in found.nodes} == {i["InstanceId"] for i in instances}
    assert found.seeds == tuple(i["PrivateIpAddress"] for i in ordered[:2])
    assert found.replaces is None  # a new ring: nobody to replace
    records = asyncio.run(registered(aws, service))
    assert set(records) == {me.slot}  # i-0gone is no slot's: deregistered
    assert records[me.slot]["AWS_INSTANCE_IPV4"] == me.private_ip
    assert records[me.slot][INSTANCE_ATTRIBUTE] == me.instance_id
    env = dict(line.split("=", 1) for line in found.env_file().splitlines())
    assert env == {
        "CASSANDRA_SEEDS": ",".join(found.seeds),
        "CASSANDRA_LISTEN_ADDRESS": me.private_ip,
        "CASSANDRA_BROADCAST_ADDRESS": me.private_ip,
        "CASSANDRA_RPC_ADDRESS": "0.0.0.0",
        "CASSANDRA_BROADCAST_RPC_ADDRESS": me.private_ip,
        "CASSANDRA_RACK": "us-east-1a",
    }
    # The same instance again (its task restarted before Cassandra wrote anything): no replacement of itself.
    assert run_discover(aws, me, tmp_path / "empty", service).replaces is None


def test_a_new_instance_without_data_replaces_the_slots_dead_node(aws: str, tmp_path: Path) -> None:
    instances, service = asyncio.run(make_ring(aws))
    me = as_node(sorted(instances, key=lambda i: (i["LaunchTime"], i["InstanceId"]))[0])
    dead = Node("i-0dead", "10.40.64.200", "us-east-1a", me.launched, me.slot)
    run_discover(aws, dead, tmp_path / "empty", service)  # the slot's previous node registered itself

    found = run_discover(aws, me, tmp_path / "empty", service)
    assert found.replaces == "10.40.64.200"
    assert me.private_ip not in found.seeds  # a seed would not bootstrap
    assert "JVM_EXTRA_OPTS=-Dcassandra.replace_address_first_boot=10.40.64.200\n" in found.env_file()
    assert asyncio.run(registered(aws, service))[me.slot]["AWS_INSTANCE_IPV4"] == me.private_ip


def test_a_new_instance_with_the_slots_data_is_the_same_node(aws: str, tmp_path: Path) -> None:
    instances, service = asyncio.run(make_ring(aws))
    me = as_node(instances[0])
    run_discover(aws, Node("i-0old", "10.40.64.201", "us-east-1a", me.launched, me.slot), tmp_path, service)
    data = tmp_path / "volume"
    (data / "data" / "system" / "local-7ad54392bcdd35a684174e047860b377").mkdir(parents=True)
    found = run_discover(aws, me, data, service)
    assert found.replaces is None
    assert "JVM_EXTRA_OPTS" not in found.env_file()
    assert has_node_data(data)
    assert not has_node_data(tmp_path / "nothing-here")


class FailingCloudMap:
    """Cloud Map that accepts a registration and then reports the operation failed."""

    async def list_instances(self, **kwargs: Any) -> dict[str, Any]:
        return {"Instances": []}

    async def register_instance(self, **kwargs: Any) -> dict[str, Any]:
        return {"OperationId": "op-1"}

    async def deregister_instance(self, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("nothing to deregister")

    async def get_operation(self, **kwargs: Any) -> dict[str, Any]:
        return {
            "Operation": {
                "Id": "op-1",
                "Type": "REGISTER_INSTANCE",
                "Status": "FAIL",
                "ErrorCode": "ACCESS_DENIED",
                "ErrorMessage": "route53:ChangeResourceRecordSets",
            }
        }


class NoInstances:
    async def describe_instances(self, **kwargs: Any) -> dict[str, Any]:
        return {"Reservations": []}


def test_a_failed_registration_fails_the_helper(tmp_path: Path) -> None:
    me = Node("i-1", "10.0.0.1", "us-east-1a", datetime(2026, 1, 1, tzinfo=UTC), "sluice-cassandra-1")
    with pytest.raises(DiscoveryError, match="ACCESS_DENIED"):
        asyncio.run(
            discover(
                NoInstances(),
                FailingCloudMap(),
                me=me,
                auto_scaling_groups=GROUPS,
                service_id="srv-1",
                seed_count=2,
                data_dir=tmp_path,
                poll_s=0.01,
            )
        )
    untagged = Node("i-1", "10.0.0.1", "us-east-1a", me.launched)
    with pytest.raises(DiscoveryError, match="SluiceCassandraNode"):
        asyncio.run(
            discover(
                NoInstances(),
                FailingCloudMap(),
                me=untagged,
                auto_scaling_groups=GROUPS,
                service_id="srv-1",
                seed_count=2,
                data_dir=tmp_path,
            )
        )


class FakeMetadata(BaseHTTPRequestHandler):
    """IMDSv2: a token from PUT /latest/api/token, required by every GET."""

    identity: dict[str, str] = {}

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._answer(200, "token-123")
        else:
            self._answer(400, "")

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != "token-123":
            self._answer(401, "")
            return
        key = self.path.removeprefix("/latest/meta-data/")
        if key in self.identity:
            self._answer(200, self.identity[key])
        else:
            self._answer(404, "")

    def _answer(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def metadata_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeMetadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_reads_identity_through_imdsv2(metadata_url: str) -> None:
    FakeMetadata.identity = {
        "instance-id": "i-0abc",
        "local-ipv4": "10.40.64.10",
        "placement/availability-zone": "us-east-1b",
        f"tags/instance/{SLOT_TAG}": "sluice-cassandra-2",
    }
    assert read_instance_identity(metadata_url) == ("i-0abc", "10.40.64.10", "us-east-1b", "sluice-cassandra-2")
    FakeMetadata.identity = {}
    with pytest.raises(OSError, match="HTTP 404"):
        read_instance_identity(metadata_url)


def test_main_writes_the_env_file_the_cassandra_container_sources(aws: str, metadata_url: str, tmp_path: Path) -> None:
    instances, service = asyncio.run(make_ring(aws))
    me = instances[0]
    FakeMetadata.identity = {
        "instance-id": me["InstanceId"],
        "local-ipv4": me["PrivateIpAddress"],
        "placement/availability-zone": "us-east-1c",
        f"tags/instance/{SLOT_TAG}": slot_of(me),
    }
    out = tmp_path / "cassandra.env"
    code = asyncio.run(
        main(
            [
                "--auto-scaling-groups",
                ",".join(GROUPS),
                "--service-id",
                service,
                "--seeds",
                "2",
                "--out",
                str(out),
                "--metadata-url",
                metadata_url,
                "--endpoint-url",
                aws,
                "--data-dir",
                str(tmp_path / "data"),
            ]
        )
    )
    assert code == 0
    text = out.read_text()
    assert f"CASSANDRA_BROADCAST_ADDRESS={me['PrivateIpAddress']}\n" in text
    assert "CASSANDRA_RACK=us-east-1c\n" in text
    assert len(text.split("CASSANDRA_SEEDS=")[1].splitlines()[0].split(",")) == 2
    assert asyncio.run(registered(aws, service))[slot_of(me)]["AWS_INSTANCE_IPV4"] == me["PrivateIpAddress"]
