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

from infra.cassandra_discovery import Node, choose_seeds, discover, main, read_instance_identity

GROUP = "sluice-cassandra"


async def make_ring(endpoint: str, size: int = 3) -> tuple[list[dict[str, Any]], str]:
    """An Auto Scaling group of `size` instances and a Cloud Map service holding one stale record."""
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
        await autoscaling.create_auto_scaling_group(
            AutoScalingGroupName=GROUP,
            LaunchTemplate={"LaunchTemplateName": "cassandra", "Version": "$Latest"},
            MinSize=size,
            MaxSize=size,
            DesiredCapacity=size,
            VPCZoneIdentifier=subnet,
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
            await ec2.describe_instances(Filters=[{"Name": "tag:aws:autoscaling:groupName", "Values": [GROUP]}])
        )["Reservations"]
    instances = [i for r in reservations for i in r["Instances"]]
    assert len(instances) == size
    return instances, service


async def registered(endpoint: str, service: str) -> dict[str, str]:
    session = aiobotocore.session.get_session()
    async with session.create_client("servicediscovery", endpoint_url=endpoint) as cloudmap:
        found = (await cloudmap.list_instances(ServiceId=service))["Instances"]
    return {i["Id"]: i["Attributes"].get("AWS_INSTANCE_IPV4", "") for i in found}


def test_seeds_are_the_longest_running_nodes_the_same_everywhere() -> None:
    def node(instance_id: str, ip: str, minute: int) -> Node:
        return Node(instance_id, ip, "us-east-1a", datetime(2026, 1, 1, 0, minute, tzinfo=UTC))

    nodes = [node("i-3", "10.0.0.3", 5), node("i-1", "10.0.0.1", 0), node("i-2", "10.0.0.2", 0)]
    assert choose_seeds(nodes, 2) == ("10.0.0.1", "10.0.0.2")
    assert choose_seeds(list(reversed(nodes)), 2) == ("10.0.0.1", "10.0.0.2")
    assert choose_seeds(nodes[:1], 2) == ("10.0.0.3",)
    with pytest.raises(ValueError, match="rm -rf"):
        node("i-4", "10.0.0.4; rm -rf /", 0)  # written to a file that a shell sources


def test_discover_registers_this_node_drops_stale_ones_and_picks_seeds(aws: str) -> None:
    instances, service = asyncio.run(make_ring(aws))
    ordered = sorted(instances, key=lambda i: (i["LaunchTime"], i["InstanceId"]))
    me_raw = ordered[-1]
    me = Node(me_raw["InstanceId"], me_raw["PrivateIpAddress"], "us-east-1a", me_raw["LaunchTime"])

    async def run() -> Any:
        session = aiobotocore.session.get_session()
        async with (
            session.create_client("ec2", endpoint_url=aws) as ec2,
            session.create_client("servicediscovery", endpoint_url=aws) as cloudmap,
        ):
            return await discover(ec2, cloudmap, me=me, auto_scaling_group=GROUP, service_id=service, seed_count=2)

    found = asyncio.run(run())
    assert {n.instance_id for n in found.nodes} == {i["InstanceId"] for i in instances}
    assert found.seeds == tuple(i["PrivateIpAddress"] for i in ordered[:2])
    assert asyncio.run(registered(aws, service)) == {me.instance_id: me.private_ip}
    env = dict(line.split("=", 1) for line in found.env_file().splitlines())
    assert env == {
        "CASSANDRA_SEEDS": ",".join(found.seeds),
        "CASSANDRA_LISTEN_ADDRESS": me.private_ip,
        "CASSANDRA_BROADCAST_ADDRESS": me.private_ip,
        "CASSANDRA_RPC_ADDRESS": "0.0.0.0",
        "CASSANDRA_BROADCAST_RPC_ADDRESS": me.private_ip,
        "CASSANDRA_RACK": "us-east-1a",
    }


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
    }
    assert read_instance_identity(metadata_url) == ("i-0abc", "10.40.64.10", "us-east-1b")
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
    }
    out = tmp_path / "cassandra.env"
    code = asyncio.run(
        main(
            [
                "--auto-scaling-group",
                GROUP,
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
            ]
        )
    )
    assert code == 0
    text = out.read_text()
    assert f"CASSANDRA_BROADCAST_ADDRESS={me['PrivateIpAddress']}\n" in text
    assert "CASSANDRA_RACK=us-east-1c\n" in text
    assert len(text.split("CASSANDRA_SEEDS=")[1].splitlines()[0].split(",")) == 2
    assert asyncio.run(registered(aws, service)) == {me["InstanceId"]: me["PrivateIpAddress"]}
