"""Make a self-managed Cassandra node discoverable: ``python -m infra.cassandra_discovery``.

Runs as the init container of every Cassandra task (host networking, on a Cassandra instance), before
the ``cassandra`` container, and:

1. reads this instance's id, private address, zone and node slot (the ``SluiceCassandraNode`` tag,
   e.g. ``sluice-cassandra-2``) from the instance metadata service (IMDSv2);
2. lists the running instances of the slots' Auto Scaling groups (EC2 ``DescribeInstances``);
3. reads the slot's Cloud Map record: the address the slot's node had before. If this instance is new
   to the slot and the data directory is empty (the slot's volume was lost), the node is a replacement
   of that dead address and starts with ``-Dcassandra.replace_address_first_boot`` (so it takes over the
   dead node's tokens instead of bootstrapping beside a DN node nobody removed). With its data, a new
   instance simply comes back as the same node (same host id, new address);
4. picks the seeds: the ``--seeds`` longest-running instances (launch time, then instance id), the
   same list on every node, never a replacing node itself (a seed does not bootstrap);
5. registers this node's address under its slot in the Cloud Map service (``cassandra.<env>.internal``,
   one A record per slot: the application's contact point), waits for Cloud Map's operation to succeed
   (registration is asynchronous), and deregisters records that are no slot's;
6. writes the ``CASSANDRA_*`` variables the official image's entrypoint reads (seeds, listen and broadcast
   addresses, rack = zone) and ``JVM_EXTRA_OPTS`` to ``--out``, which the ``cassandra`` container sources.

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
    def get_operation(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...


class DiscoveryError(Exception):
    """Cloud Map refused or failed an operation; the task fails and ECS starts it again."""


#: The Cloud Map attribute naming the EC2 instance that last held a slot.
INSTANCE_ATTRIBUTE = "EC2_INSTANCE_ID"


@dataclass(frozen=True)
class Node:
    instance_id: str
    private_ip: str
    zone: str
    launched: datetime
    slot: str = ""

    def __post_init__(self) -> None:
        ipaddress.IPv4Address(self.private_ip)  # the value is written to a file a shell sources


@dataclass(frozen=True)
class Discovery:
    me: Node
    nodes: tuple[Node, ...]
    seeds: tuple[str, ...]
    #: The dead node this one replaces (its address), when this node starts without data.
    replaces: str | None = None

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
        if self.replaces:
            # Read once: ignored after the node has joined, so a later restart with it set is harmless.
            ipaddress.IPv4Address(self.replaces)
            lines["JVM_EXTRA_OPTS"] = f"-Dcassandra.replace_address_first_boot={self.replaces}"
        return "".join(f"{key}={value}\n" for key, value in lines.items())


SLOT_TAG = "SluiceCassandraNode"


def read_instance_identity(metadata_url: str = IMDS_URL, timeout_s: float = 2.0) -> tuple[str, str, str, str]:
    """(instance id, private IPv4, availability zone, node slot) of this instance, through IMDSv2."""
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
            call("GET", f"/latest/meta-data/tags/instance/{SLOT_TAG}", header),
        )
    finally:
        connection.close()


async def list_group_nodes(ec2: Ec2Client, auto_scaling_groups: Sequence[str]) -> list[Node]:
    nodes: list[Node] = []
    filters = [
        {"Name": "tag:aws:autoscaling:groupName", "Values": list(auto_scaling_groups)},
        {"Name": "instance-state-name", "Values": ["pending", "running"]},
    ]
    token: str | None = None
    while True:
        page = await ec2.describe_instances(Filters=filters, **({"NextToken": token} if token else {}))
        for reservation in page.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                if not instance.get("PrivateIpAddress"):
                    continue
                tags = {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}
                nodes.append(
                    Node(
                        instance_id=instance["InstanceId"],
                        private_ip=instance["PrivateIpAddress"],
                        zone=instance.get("Placement", {}).get("AvailabilityZone", ""),
                        launched=instance["LaunchTime"],
                        slot=tags.get(SLOT_TAG, ""),
                    )
                )
        token = page.get("NextToken")
        if not token:
            return nodes


def choose_seeds(nodes: Sequence[Node], count: int, *, exclude: str | None = None) -> tuple[str, ...]:
    """The ``count`` longest-running nodes' addresses: the same answer on every node.

    ``exclude`` (a replacing node's own instance id) is never a seed: a seed does not bootstrap.
    """
    ordered = sorted((n for n in nodes if n.instance_id != exclude), key=lambda node: (node.launched, node.instance_id))
    return tuple(node.private_ip for node in ordered[:count])


def has_node_data(data_dir: Path) -> bool:
    """Whether Cassandra has ever started on this volume (its system keyspace exists).

    When the directory cannot be read, the answer is yes: a node that wrongly believes it is a replacement
    would take over a live node's tokens, so doubt means "not a replacement".
    """
    try:
        return any((data_dir / "data" / "system").iterdir())
    except FileNotFoundError:
        return False
    except OSError:
        return True


async def wait_for_operation(
    cloudmap: CloudMapClient, operation_id: str, *, timeout_s: float = 120.0, poll_s: float = 1.0
) -> None:
    """Cloud Map applies (de)registrations asynchronously: wait for SUCCESS, raise on FAIL or timeout."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        operation = (await cloudmap.get_operation(OperationId=operation_id)).get("Operation", {})
        status = operation.get("Status")
        if status == "SUCCESS":
            return
        if status == "FAIL":
            raise DiscoveryError(
                f"Cloud Map operation {operation_id} ({operation.get('Type')}) failed: "
                f"{operation.get('ErrorCode')}: {operation.get('ErrorMessage')}"
            )
        if asyncio.get_running_loop().time() > deadline:
            raise DiscoveryError(f"Cloud Map operation {operation_id} still {status} after {timeout_s:.0f} s")
        await asyncio.sleep(poll_s)


async def discover(
    ec2: Ec2Client,
    cloudmap: CloudMapClient,
    *,
    me: Node,
    auto_scaling_groups: Sequence[str],
    service_id: str,
    seed_count: int,
    data_dir: Path,
    operation_timeout_s: float = 120.0,
    poll_s: float = 1.0,
) -> Discovery:
    if not me.slot:
        raise DiscoveryError(f"instance {me.instance_id} has no {SLOT_TAG} tag: it belongs to no node slot")
    nodes = {node.instance_id: node for node in await list_group_nodes(ec2, auto_scaling_groups)}
    # The groups' listing can lag behind a just-launched instance: this one always counts.
    nodes.setdefault(me.instance_id, me)
    log.info(
        "Cassandra nodes of %s: %s",
        ",".join(auto_scaling_groups),
        ", ".join(f"{n.slot or '?'}={n.instance_id} {n.private_ip} ({n.zone})" for n in nodes.values()),
    )

    registered = {
        i["Id"]: i.get("Attributes", {})
        for i in (await cloudmap.list_instances(ServiceId=service_id)).get("Instances", [])
    }
    previous = registered.get(me.slot, {})
    replaces: str | None = None
    if previous.get(INSTANCE_ATTRIBUTE, me.instance_id) != me.instance_id and not has_node_data(data_dir):
        replaces = previous.get("AWS_INSTANCE_IPV4") or None
        log.warning(
            "slot %s: new instance %s with an empty data directory replaces dead node %s (instance %s)",
            me.slot,
            me.instance_id,
            replaces,
            previous.get(INSTANCE_ATTRIBUTE),
        )
    seeds = choose_seeds(list(nodes.values()), seed_count, exclude=me.instance_id if replaces else None)
    if not seeds:  # a ring of one: the node seeds itself
        seeds = (me.private_ip,)
    log.info(
        "seeds: %s; this node %s is %sa seed", ",".join(seeds), me.private_ip, "" if me.private_ip in seeds else "not "
    )

    response = await cloudmap.register_instance(
        ServiceId=service_id,
        InstanceId=me.slot,
        CreatorRequestId=f"{me.instance_id}-{int(datetime.now(UTC).timestamp())}",
        Attributes={
            "AWS_INSTANCE_IPV4": me.private_ip,
            "AVAILABILITY_ZONE": me.zone,
            INSTANCE_ATTRIBUTE: me.instance_id,
        },
    )
    await wait_for_operation(cloudmap, response["OperationId"], timeout_s=operation_timeout_s, poll_s=poll_s)
    log.info("registered %s=%s in Cloud Map service %s", me.slot, me.private_ip, service_id)
    # Slot records stay while their node is down (the replacement reads the dead address from them);
    # anything else (e.g. a record keyed by an instance id, from before slots) is no node's and goes.
    slot_prefix = me.slot.rsplit("-", 1)[0] + "-"
    for instance_id in registered:
        if not instance_id.startswith(slot_prefix):
            response = await cloudmap.deregister_instance(ServiceId=service_id, InstanceId=instance_id)
            await wait_for_operation(cloudmap, response["OperationId"], timeout_s=operation_timeout_s, poll_s=poll_s)
            log.info("deregistered %s: the record of no node slot", instance_id)
    return Discovery(me=me, nodes=tuple(nodes.values()), seeds=seeds, replaces=replaces)


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m infra.cassandra_discovery", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--auto-scaling-groups", required=True, help="comma-separated names of the node slots' Auto Scaling groups"
    )
    parser.add_argument(
        "--service-id", required=True, help="Cloud Map service id (srv-...) of cassandra.<env>.internal"
    )
    parser.add_argument("--seeds", type=int, default=2, help="how many nodes are seeds (default 2)")
    parser.add_argument("--out", type=Path, required=True, help="file of CASSANDRA_* variables to write")
    parser.add_argument(
        "--data-dir", type=Path, default=Path("/var/lib/cassandra"), help="the node's data volume (read only)"
    )
    parser.add_argument("--metadata-url", default=IMDS_URL, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint-url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


async def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    instance_id, private_ip, zone, slot = await asyncio.to_thread(read_instance_identity, args.metadata_url)
    me = Node(instance_id=instance_id, private_ip=private_ip, zone=zone, launched=datetime.now(UTC), slot=slot)
    session = aiobotocore.session.get_session()
    async with (
        session.create_client("ec2", endpoint_url=args.endpoint_url) as ec2,
        session.create_client("servicediscovery", endpoint_url=args.endpoint_url) as cloudmap,
    ):
        found = await discover(
            ec2,
            cloudmap,
            me=me,
            auto_scaling_groups=[g for g in args.auto_scaling_groups.split(",") if g],
            service_id=args.service_id,
            seed_count=args.seeds,
            data_dir=args.data_dir,
        )
    write_atomically(args.out, found.env_file())
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sys.exit(asyncio.run(main(sys.argv[1:])))
