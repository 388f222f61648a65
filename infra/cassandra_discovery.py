"""Make a self-managed Cassandra node discoverable: ``python -m infra.cassandra_discovery``.

Runs as the init container of every Cassandra task (host networking, on a Cassandra instance), before
the ``cassandra`` container, and:

1. reads this instance's id, private address and zone from the instance metadata service (IMDSv2);
2. lists the running instances of the Cassandra Auto Scaling group (EC2 ``DescribeInstances``);
3. picks the seeds: the ``--seeds`` longest-running instances (launch time, then instance id), the
   same list on every node. A new ring's first nodes are seeds of themselves and start it together; a
   replacement node is the newest instance, so it is no seed and bootstraps (streams) from the others;
4. registers this instance's address in the Cloud Map service (``cassandra.<env>.internal``, one A record
   per node: the application's contact point) and deregisters instances that no longer run;
5. writes the ``CASSANDRA_*`` variables the official image's entrypoint reads (seeds, listen and broadcast
   addresses, rack = zone) to ``--out``, which the ``cassandra`` container sources before starting.

Exit status 0 lets the ``cassandra`` container start (``dependsOn: SUCCESS``); anything else fails the task
and ECS retries it.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import ipaddress
import logging
import os
import sys
import urllib.parse
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

import aiobotocore.session  # type: ignore[import-untyped]  # aiobotocore ships no type information

log = logging.getLogger("sluice.cassandra_discovery")

IMDS_URL = "http://169.254.169.254"


class Ec2Client(Protocol):
    def describe_instances(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...


class CloudMapClient(Protocol):
    def register_instance(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...
    def deregister_instance(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...
    def list_instances(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...


@dataclass(frozen=True)
class Node:
    instance_id: str
    private_ip: str
    zone: str
    launched: datetime

    def __post_init__(self) -> None:
        ipaddress.IPv4Address(self.private_ip)  # the value is written to a file a shell sources


@dataclass(frozen=True)
class Discovery:
    me: Node
    nodes: tuple[Node, ...]
    seeds: tuple[str, ...]

    def env_file(self) -> str:
        ip = self.me.private_ip
        lines = {
            "CASSANDRA_SEEDS": ",".join(self.seeds),
            "CASSANDRA_LISTEN_ADDRESS": ip,
            "CASSANDRA_BROADCAST_ADDRESS": ip,
            # CQL on every interface of the host; the security group decides who connects.
            "CASSANDRA_RPC_ADDRESS": "0.0.0.0",
            "CASSANDRA_BROADCAST_RPC_ADDRESS": ip,
            "CASSANDRA_RACK": self.me.zone,
        }
        return "".join(f"{key}={value}\n" for key, value in lines.items())


def read_instance_identity(metadata_url: str = IMDS_URL, timeout_s: float = 2.0) -> tuple[str, str, str]:
    """(instance id, private IPv4, availability zone) of this instance, through IMDSv2."""
    url = urllib.parse.urlsplit(metadata_url)
    connection = http.client.HTTPConnection(url.hostname or "169.254.169.254", url.port or 80, timeout=timeout_s)

    def call(method: str, path: str, headers: dict[str, str]) -> str:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        body = response.read().decode().strip()
        if response.status != HTTPStatus.OK:
            raise OSError(f"instance metadata {path}: HTTP {response.status}")
        return body

    try:
        token = call("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        header = {"X-aws-ec2-metadata-token": token}
        return (
            call("GET", "/latest/meta-data/instance-id", header),
            call("GET", "/latest/meta-data/local-ipv4", header),
            call("GET", "/latest/meta-data/placement/availability-zone", header),
        )
    finally:
        connection.close()


async def list_group_nodes(ec2: Ec2Client, auto_scaling_group: str) -> list[Node]:
    nodes: list[Node] = []
    filters = [
        {"Name": "tag:aws:autoscaling:groupName", "Values": [auto_scaling_group]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]},
    ]
    token: str | None = None
    while True:
        page = await ec2.describe_instances(Filters=filters, **({"NextToken": token} if token else {}))
        for reservation in page.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                if not instance.get("PrivateIpAddress"):
                    continue
                nodes.append(
                    Node(
                        instance_id=instance["InstanceId"],
                        private_ip=instance["PrivateIpAddress"],
                        zone=instance.get("Placement", {}).get("AvailabilityZone", ""),
                        launched=instance["LaunchTime"],
                    )
                )
        token = page.get("NextToken")
        if not token:
            return nodes


def choose_seeds(nodes: Sequence[Node], count: int) -> tuple[str, ...]:
    """The ``count`` longest-running nodes' addresses: the same answer on every node."""
    ordered = sorted(nodes, key=lambda node: (node.launched, node.instance_id))
    return tuple(node.private_ip for node in ordered[:count])


async def discover(
    ec2: Ec2Client,
    cloudmap: CloudMapClient,
    *,
    me: Node,
    auto_scaling_group: str,
    service_id: str,
    seed_count: int,
) -> Discovery:
    nodes = {node.instance_id: node for node in await list_group_nodes(ec2, auto_scaling_group)}
    # The group's listing can lag behind a just-launched instance: this one always counts.
    nodes.setdefault(me.instance_id, me)
    seeds = choose_seeds(list(nodes.values()), seed_count)
    log.info(
        "Cassandra nodes of %s: %s",
        auto_scaling_group,
        ", ".join(f"{n.instance_id}={n.private_ip} ({n.zone})" for n in nodes.values()),
    )
    log.info(
        "seeds: %s; this node %s is %sa seed",
        ",".join(seeds),
        me.private_ip,
        "" if me.private_ip in seeds else "not ",
    )

    await cloudmap.register_instance(
        ServiceId=service_id,
        InstanceId=me.instance_id,
        CreatorRequestId=f"{me.instance_id}-{int(datetime.now(UTC).timestamp())}",
        Attributes={"AWS_INSTANCE_IPV4": me.private_ip, "AVAILABILITY_ZONE": me.zone},
    )
    log.info("registered %s=%s in Cloud Map service %s", me.instance_id, me.private_ip, service_id)
    registered = await cloudmap.list_instances(ServiceId=service_id)
    for instance in registered.get("Instances", []):
        if instance["Id"] not in nodes:
            await cloudmap.deregister_instance(ServiceId=service_id, InstanceId=instance["Id"])
            log.info("deregistered %s: no longer a running instance of %s", instance["Id"], auto_scaling_group)
    return Discovery(me=me, nodes=tuple(nodes.values()), seeds=seeds)


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m infra.cassandra_discovery", description=__doc__.split("\n")[0])
    parser.add_argument("--auto-scaling-group", required=True, help="the Cassandra Auto Scaling group's name")
    parser.add_argument(
        "--service-id", required=True, help="Cloud Map service id (srv-...) of cassandra.<env>.internal"
    )
    parser.add_argument("--seeds", type=int, default=2, help="how many nodes are seeds (default 2)")
    parser.add_argument("--out", type=Path, required=True, help="file of CASSANDRA_* variables to write")
    parser.add_argument("--metadata-url", default=IMDS_URL, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint-url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


async def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    instance_id, private_ip, zone = await asyncio.to_thread(read_instance_identity, args.metadata_url)
    me = Node(instance_id=instance_id, private_ip=private_ip, zone=zone, launched=datetime.now(UTC))
    session = aiobotocore.session.get_session()
    async with (
        session.create_client("ec2", endpoint_url=args.endpoint_url) as ec2,
        session.create_client("servicediscovery", endpoint_url=args.endpoint_url) as cloudmap,
    ):
        found = await discover(
            ec2,
            cloudmap,
            me=me,
            auto_scaling_group=args.auto_scaling_group,
            service_id=args.service_id,
            seed_count=args.seeds,
        )
    write_atomically(args.out, found.env_file())
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sys.exit(asyncio.run(main(sys.argv[1:])))
