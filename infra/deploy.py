"""Deploy Sluice to AWS: ``python -m infra.deploy`` (or ``infra/deploy``); see docs/deploy.md.

In order, waiting for each step and stopping at the first failure:

0. the service-linked roles of ECS, Auto Scaling, Application Auto Scaling (ECS) and ElastiCache, when
   the account has none yet (a new account creates them on first use, which is after CloudFormation
   needed them: the ECS cluster and capacity providers fail without AWSServiceRoleForECS);
1. stack ``<env>-foundation`` (KMS key, ECR repository);
2. the image: built from ./Dockerfile (target ``runtime``) with the Docker engine and pushed to the
   repository under an immutable tag (the git commit), unless that tag is already there or ``--image``
   names an image to deploy as is (a rollback, or an image built by CI);
3. stacks ``<env>-network``, ``<env>-cluster``, ``<env>-data``. The data stack's Cassandra helper image
   stays the one the ring runs (so a release never restarts the Cassandra nodes) unless
   ``--roll-cassandra-helper``; a new helper image is tagged ``cassandra-helper-<tag>``, which ECR keeps;
4. the schema step: one ECS task ``sluice schema apply``, never two at once, must exit 0;
5. stack ``<env>-services`` (API, workers, scaling, alarms, dashboard).

Each stack is created, or updated when it exists (a stack left in ROLLBACK_COMPLETE by a failed first
create is deleted and created again). The load balancer's deletion protection is off when the services
stack is created (so a failed first create rolls back cleanly) and on for every update.
Outputs of a stack feed the parameters of the next ones.
``--dry-run`` changes nothing: it reads what exists, validates the templates and prints the plan.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import math
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import aiobotocore.session  # type: ignore[import-untyped]  # aiobotocore ships no type information
import docker  # type: ignore[import-untyped]  # the docker SDK ships no type information
from botocore.exceptions import (  # type: ignore[import-untyped]  # botocore ships no type information
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    WaiterError,
)
from docker.errors import APIError, BuildError, DockerException  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "infra"
STACK_ORDER = ("foundation", "network", "cluster", "data", "services")
#: Values the tool computes itself, fed to the stacks like outputs: the image, the Cassandra helper image,
#: and facts of the deployment (does the services stack exist yet).
PSEUDO_STACKS = ("image", "helper", "deploy")
#: Role name -> AWS service of every service-linked role the stacks need before they are created.
SERVICE_LINKED_ROLES = {
    "AWSServiceRoleForECS": "ecs.amazonaws.com",
    "AWSServiceRoleForAutoScaling": "autoscaling.amazonaws.com",
    "AWSServiceRoleForApplicationAutoScaling_ECSService": "ecs.application-autoscaling.amazonaws.com",
    "AWSServiceRoleForElastiCache": "elasticache.amazonaws.com",
}
HELPER_TAG_PREFIX = "cassandra-helper-"
#: CloudFormation's limit for a template passed inline (larger ones must go through S3).
TEMPLATE_BODY_LIMIT = 51_200
DOCKER_API_VERSION = "1.41"

Echo = Callable[[str], None]


class DeployError(Exception):
    """A step failed; the message says which and why."""


class CloudFormationClient(Protocol):
    def describe_stacks(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...
    def describe_stack_events(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...
    def create_stack(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...
    def update_stack(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...
    def delete_stack(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...
    def validate_template(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...
    def get_waiter(self, name: str) -> Any: ...


class EcrClient(Protocol):
    def describe_images(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...
    def get_authorization_token(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...
    def batch_get_image(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...
    def put_image(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...


class IamClient(Protocol):
    def get_role(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...
    def create_service_linked_role(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...


class EcsClient(Protocol):
    def list_tasks(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...
    def run_task(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...
    def describe_tasks(self, **kwargs: Any) -> Awaitable[dict[str, Any]]: ...


# ----------------------------------------------------------------------------------------------
# Configuration and the stacks' parameters
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """A parameter value taken from an earlier stack's output."""

    stack: str
    key: str

    def __str__(self) -> str:
        return f"<{self.stack}.{self.key}>"


@dataclass(frozen=True)
class Missing:
    """A required value the command line did not give (fatal unless --dry-run)."""

    option: str

    def __str__(self) -> str:
        return f"<missing: {self.option}>"


ParameterValue = str | Output | Missing


@dataclass(frozen=True)
class DeployConfig:
    environment: str = "sluice"
    region: str | None = None
    certificate_arn: str | None = None
    api_keys_secret_arn: str | None = None
    alarm_email: str = ""
    nat_gateways: str = "one-per-zone"
    cassandra_mode: str = "self-managed"
    external_cassandra_endpoint: str = ""
    external_cassandra_port: int = 9042
    external_cassandra_credentials_secret_arn: str = ""
    image: str | None = None
    image_tag: str | None = None
    stacks: tuple[str, ...] = STACK_ORDER
    run_schema: bool = True
    #: Give the Cassandra ring this release's image as its helper (restarts the nodes one by one).
    roll_cassandra_helper: bool = False
    dry_run: bool = False
    #: --dry-run asks CloudFormation to validate each template (ValidateTemplate, read-only).
    validate_templates: bool = True
    overrides: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    endpoint_url: str | None = None
    poll_seconds: float = 15.0
    stack_timeout_seconds: float = 90 * 60
    schema_timeout_seconds: float = 15 * 60
    context: Path = ROOT

    def stack_name(self, key: str) -> str:
        return f"{self.environment}-{key}"


def stack_parameters(config: DeployConfig, key: str) -> dict[str, ParameterValue]:
    """The parameters the deploy tool gives stack ``key`` (``--param`` overrides win)."""
    image: ParameterValue = config.image or Output("image", "ImageUri")
    external = config.cassandra_mode == "external"
    parameters: dict[str, ParameterValue]
    if key == "foundation":
        parameters = {"EnvironmentName": config.environment}
    elif key == "network":
        parameters = {
            "EnvironmentName": config.environment,
            "KeyArn": Output("foundation", "KeyArn"),
            "NatGateways": config.nat_gateways,
        }
    elif key == "cluster":
        parameters = {
            "EnvironmentName": config.environment,
            "VpcId": Output("network", "VpcId"),
            "VpcCidr": Output("network", "VpcCidr"),
            "PrivateSubnetIds": Output("network", "PrivateSubnetIds"),
            "PrivateSubnetZones": Output("network", "PrivateSubnetZones"),
            "CassandraMode": config.cassandra_mode,
        }
    elif key == "data":
        parameters = {
            "EnvironmentName": config.environment,
            "KeyArn": Output("foundation", "KeyArn"),
            "VpcId": Output("network", "VpcId"),
            "PrivateSubnetIds": Output("network", "PrivateSubnetIds"),
            "ClusterName": Output("cluster", "ClusterName"),
            "AppSecurityGroupId": Output("cluster", "AppSecurityGroupId"),
            "ImageUri": image,
            "AlarmEmail": config.alarm_email,
            "CassandraMode": config.cassandra_mode,
            "CassandraHelperImage": "" if external else Output("helper", "ImageUri"),
            "CassandraCapacityProviders": "" if external else Output("cluster", "CassandraCapacityProviders"),
            "CassandraAutoScalingGroupNames": "" if external else Output("cluster", "CassandraAutoScalingGroupNames"),
            "ExternalCassandraEndpoint": config.external_cassandra_endpoint,
            "ExternalCassandraPort": str(config.external_cassandra_port),
            "ExternalCassandraCredentialsSecretArn": config.external_cassandra_credentials_secret_arn,
        }
    elif key == "services":
        parameters = {
            "EnvironmentName": config.environment,
            "KeyArn": Output("foundation", "KeyArn"),
            "VpcId": Output("network", "VpcId"),
            "PublicSubnetIds": Output("network", "PublicSubnetIds"),
            "ClusterName": Output("cluster", "ClusterName"),
            "AppCapacityProvider": Output("cluster", "AppCapacityProvider"),
            "AppAutoScalingGroupName": Output("cluster", "AppAutoScalingGroupName"),
            "AppSecurityGroupId": Output("cluster", "AppSecurityGroupId"),
            "AlbDeletionProtection": Output("deploy", "AlbDeletionProtection"),
            "ImageUri": image,
            "CertificateArn": config.certificate_arn or Missing("--certificate-arn"),
            "ApiKeysSecretArn": config.api_keys_secret_arn or Missing("--api-keys-secret-arn"),
            "AlarmTopicArn": Output("data", "AlarmTopicArn"),
            "RedisUrlSecretArn": Output("data", "RedisUrlSecretArn"),
            "RedisReplicationGroupId": Output("data", "RedisReplicationGroupId"),
            "RedisMinReplicas": Output("data", "RedisMinReplicas"),
            "CassandraContactPoints": Output("data", "CassandraContactPoints"),
            "CassandraPort": Output("data", "CassandraPort"),
            "CassandraReplication": Output("data", "CassandraReplication"),
            "CassandraLocalDc": Output("data", "CassandraLocalDc"),
            "CassandraCredentialsSecretArn": Output("data", "CassandraCredentialsSecretArn"),
            "EventRetentionDays": Output("data", "EventRetentionDays"),
        }
    else:
        raise DeployError(f"unknown stack {key!r} (known: {', '.join(STACK_ORDER)})")
    parameters.update(config.overrides.get(key, {}))
    return parameters


def resolve(
    parameters: Mapping[str, ParameterValue], outputs: Mapping[str, Mapping[str, str]], *, strict: bool
) -> dict[str, str]:
    resolved: dict[str, str] = {}
    for name, value in parameters.items():
        if isinstance(value, Output) and value.key in outputs.get(value.stack, {}):
            resolved[name] = outputs[value.stack][value.key]
        elif isinstance(value, str):
            resolved[name] = value
        elif strict:
            if isinstance(value, Missing):
                raise DeployError(f"parameter {name} needs {value.option}")
            raise DeployError(
                f"parameter {name} needs output {value.key} of stack {value.stack}, which is not deployed"
            )
        else:
            resolved[name] = str(value)
    return resolved


def template_body(key: str) -> str:
    path = TEMPLATES / f"{key}.yaml"
    body = path.read_text()
    if len(body.encode()) > TEMPLATE_BODY_LIMIT:
        raise DeployError(f"{path} is over CloudFormation's {TEMPLATE_BODY_LIMIT}-byte inline limit")
    return body


# ----------------------------------------------------------------------------------------------
# CloudFormation
# ----------------------------------------------------------------------------------------------


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _error_message(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Message", error))


async def describe_stack(cfn: CloudFormationClient, name: str) -> dict[str, Any] | None:
    try:
        response = await cfn.describe_stacks(StackName=name)
    except ClientError as error:
        if _error_code(error) == "ValidationError" and "does not exist" in _error_message(error):
            return None
        raise
    stacks = response.get("Stacks", [])
    return stacks[0] if stacks else None


def stack_outputs(stack: Mapping[str, Any]) -> dict[str, str]:
    return {item["OutputKey"]: str(item.get("OutputValue", "")) for item in stack.get("Outputs", [])}


async def failure_reasons(cfn: CloudFormationClient, name: str, limit: int = 8) -> list[str]:
    try:
        events = (await cfn.describe_stack_events(StackName=name)).get("StackEvents", [])
    except (ClientError, BotoCoreError):
        return []
    reasons = [
        f"{event.get('LogicalResourceId')} {event.get('ResourceStatus')}: {event.get('ResourceStatusReason')}"
        for event in events
        if str(event.get("ResourceStatus", "")).endswith("FAILED") and event.get("ResourceStatusReason")
    ]
    return reasons[:limit]


async def _wait(cfn: CloudFormationClient, waiter_name: str, name: str, config: DeployConfig) -> None:
    attempts = max(1, math.ceil(config.stack_timeout_seconds / config.poll_seconds))
    try:
        await cfn.get_waiter(waiter_name).wait(
            StackName=name, WaiterConfig={"Delay": config.poll_seconds, "MaxAttempts": attempts}
        )
    except WaiterError as error:
        reasons = await failure_reasons(cfn, name)
        detail = "\n  ".join(reasons) if reasons else str(error)
        raise DeployError(f"stack {name} did not reach {waiter_name.replace('_', ' ')}:\n  {detail}") from error


async def deploy_stack(
    cfn: CloudFormationClient,
    config: DeployConfig,
    key: str,
    parameters: Mapping[str, str],
    echo: Echo,
) -> dict[str, str]:
    """Create or update stack ``key``, wait for it, return its outputs."""
    name = config.stack_name(key)
    body = template_body(key)
    arguments: dict[str, Any] = {
        "StackName": name,
        "TemplateBody": body,
        "Parameters": [{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        "Capabilities": ["CAPABILITY_NAMED_IAM"],
        "Tags": [{"Key": "sluice:environment", "Value": config.environment}],
    }
    existing = await describe_stack(cfn, name)
    status = str(existing.get("StackStatus", "")) if existing else ""
    if status.endswith("_IN_PROGRESS"):
        raise DeployError(f"stack {name} is busy ({status}); wait for it and run the deploy again")
    if status in {"ROLLBACK_FAILED", "DELETE_FAILED"}:
        raise DeployError(
            f"stack {name} is {status}: see its events, delete what blocks it (e.g. a load balancer with "
            "deletion protection), then `aws cloudformation delete-stack` and deploy again"
        )
    if status == "ROLLBACK_COMPLETE":
        echo(f"stack {name}: ROLLBACK_COMPLETE after a failed first create; deleting it to create it again")
        await cfn.delete_stack(StackName=name)
        await _wait(cfn, "stack_delete_complete", name, config)
        existing = None
    started = time.monotonic()
    if existing is None:
        echo(f"stack {name}: creating from infra/{key}.yaml")
        await cfn.create_stack(**arguments, OnFailure="ROLLBACK")
        await _wait(cfn, "stack_create_complete", name, config)
        echo(f"stack {name}: created in {time.monotonic() - started:.0f} s")
    else:
        echo(f"stack {name}: updating from infra/{key}.yaml ({status})")
        try:
            await cfn.update_stack(**arguments)
        except ClientError as error:
            if "No updates are to be performed" not in _error_message(error):
                raise DeployError(f"stack {name}: update refused: {_error_message(error)}") from error
            echo(f"stack {name}: no changes")
        else:
            await _wait(cfn, "stack_update_complete", name, config)
            echo(f"stack {name}: updated in {time.monotonic() - started:.0f} s")
    stack = await describe_stack(cfn, name)
    return stack_outputs(stack or {})


# ----------------------------------------------------------------------------------------------
# The image
# ----------------------------------------------------------------------------------------------


def default_image_tag(context: Path) -> str:
    """The commit (12 hex digits), suffixed when the tree has changes; a timestamp outside git."""
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")

    def git(*args: str) -> str:
        completed = subprocess.run(["git", *args], cwd=context, capture_output=True, text=True, check=True, timeout=30)
        return str(completed.stdout).strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return f"dev-{stamp}"
    # Tags are immutable: a build of uncommitted changes gets a tag of its own.
    return f"{commit}-dirty-{stamp}" if dirty else commit


async def image_exists(ecr: EcrClient, repository: str, tag: str) -> bool:
    try:
        response = await ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": tag}])
    except ClientError as error:
        if _error_code(error) in {"ImageNotFoundException", "RepositoryNotFoundException"}:
            return False
        raise
    return bool(response.get("imageDetails"))


async def registry_credentials(ecr: EcrClient) -> tuple[str, str]:
    data = (await ecr.get_authorization_token())["authorizationData"][0]
    username, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    return username, password


async def ensure_service_linked_roles(iam: IamClient, echo: Echo, *, dry_run: bool = False) -> list[str]:
    """Create the service-linked roles the stacks need and the account lacks; returns the roles created."""
    created: list[str] = []
    for role, service in SERVICE_LINKED_ROLES.items():
        try:
            await iam.get_role(RoleName=role)
            continue
        except ClientError as error:
            if _error_code(error) != "NoSuchEntity":
                raise
        if dry_run:
            echo(f"service-linked role {role}: would create it for {service}")
            continue
        try:
            await iam.create_service_linked_role(AWSServiceName=service)
        except ClientError as error:
            # Created meanwhile (by a first use of the service, or another deploy): just as good.
            if "has been taken" not in _error_message(error):
                raise
            echo(f"service-linked role {role}: already there")
            continue
        echo(f"service-linked role {role}: created for {service}")
        created.append(role)
    return created


async def tag_helper_image(ecr: EcrClient, repository: str, tag: str) -> str:
    """Tag image ``tag`` also as ``cassandra-helper-<tag>`` (ECR's lifecycle keeps those); returns the new tag."""
    helper_tag = tag if tag.startswith(HELPER_TAG_PREFIX) else f"{HELPER_TAG_PREFIX}{tag}"
    if helper_tag == tag:
        return tag
    found = await ecr.batch_get_image(repositoryName=repository, imageIds=[{"imageTag": tag}])
    images = found.get("images") or []
    if not images:
        raise DeployError(f"image {repository}:{tag} is not in the repository; cannot make it the Cassandra helper")
    try:
        await ecr.put_image(repositoryName=repository, imageManifest=images[0]["imageManifest"], imageTag=helper_tag)
    except ClientError as error:
        if _error_code(error) != "ImageAlreadyExistsException":
            raise
    return helper_tag


def build_and_push(context: Path, repository_uri: str, tag: str, username: str, password: str, echo: Echo) -> None:
    """Build the runtime image and push it, with the Docker engine of DOCKER_HOST (or the local socket)."""
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    hint = (
        "  Start Docker (or set DOCKER_HOST), or deploy an image that is already pushed with\n"
        "  --image <uri> (or --tag <existing tag>), or look at the plan with --dry-run."
    )
    if host.startswith("unix://") and not Path(host.removeprefix("unix://")).exists():
        raise DeployError(f"no Docker engine reachable at {host} (no such socket).\n{hint}")
    # A fixed API version (Docker 20.10 and later) instead of "auto": nothing connects before ping().
    client = docker.from_env(version=DOCKER_API_VERSION, timeout=600)
    try:
        client.ping()
    except (DockerException, OSError) as error:  # requests' connection errors are OSErrors
        client.close()
        raise DeployError(f"no Docker engine reachable at {host} ({error}).\n{hint}") from error
    reference = f"{repository_uri}:{tag}"
    try:
        echo(f"image: building {reference} (Dockerfile, target runtime, linux/amd64)")
        client.images.build(
            path=str(context),
            dockerfile="Dockerfile",
            target="runtime",
            tag=reference,
            platform="linux/amd64",
            pull=True,
            rm=True,
            forcerm=True,
        )
        echo(f"image: pushing {reference}")
        for line in client.api.push(
            repository_uri,
            tag=tag,
            stream=True,
            decode=True,
            auth_config={"username": username, "password": password},
        ):
            if isinstance(line, dict) and line.get("error"):
                raise DeployError(f"push of {reference} failed: {line['error']}")
    except (BuildError, APIError) as error:
        raise DeployError(f"image {reference}: {error}") from error
    finally:
        client.close()


# ----------------------------------------------------------------------------------------------
# The schema step
# ----------------------------------------------------------------------------------------------


def task_family(task_definition_arn: str) -> str:
    return task_definition_arn.rsplit("/", 1)[-1].split(":", 1)[0]


async def run_schema(
    ecs: EcsClient,
    *,
    cluster: str,
    task_definition: str,
    capacity_provider: str,
    echo: Echo,
    poll_seconds: float,
    timeout_seconds: float,
) -> str:
    """Run ``sluice schema apply`` once as an ECS task and wait for it to exit 0; returns the task ARN."""
    family = task_family(task_definition)
    running = await ecs.list_tasks(cluster=cluster, family=family, desiredStatus="RUNNING")
    if running.get("taskArns"):
        raise DeployError(
            f"a schema task is already running ({', '.join(running['taskArns'])}); the schema step never "
            "runs twice at once: wait for it to stop and deploy again"
        )
    response = await ecs.run_task(
        cluster=cluster,
        taskDefinition=task_definition,
        count=1,
        capacityProviderStrategy=[{"capacityProvider": capacity_provider, "weight": 1}],
        startedBy="sluice-deploy",
    )
    if response.get("failures") or not response.get("tasks"):
        raise DeployError(f"the schema task could not start: {response.get('failures')}")
    task_arn = str(response["tasks"][0]["taskArn"])
    echo(f"schema: task {task_arn} started")
    deadline = time.monotonic() + timeout_seconds
    while True:
        described = await ecs.describe_tasks(cluster=cluster, tasks=[task_arn])
        task = (described.get("tasks") or [{}])[0]
        if task.get("lastStatus") == "STOPPED":
            break
        if time.monotonic() > deadline:
            raise DeployError(f"the schema task {task_arn} did not stop within {timeout_seconds:.0f} s")
        await asyncio.sleep(poll_seconds)
    container = next((c for c in task.get("containers", []) if c.get("name") == "schema"), None)
    container = container or (task.get("containers") or [{}])[0]
    exit_code = container.get("exitCode")
    if exit_code != 0:
        raise DeployError(
            f"the schema task {task_arn} failed (exit code {exit_code}, {task.get('stoppedReason')}, "
            f"{container.get('reason', 'no reason given')}); see its log group /<environment>/schema"
        )
    echo("schema: applied (exit code 0)")
    return task_arn


# ----------------------------------------------------------------------------------------------
# The whole deployment
# ----------------------------------------------------------------------------------------------


@dataclass
class Clients:
    cloudformation: CloudFormationClient
    ecr: EcrClient
    ecs: EcsClient
    iam: IamClient | None = None


BuildAndPush = Callable[[Path, str, str, str, str, Echo], None]


async def deploy(
    config: DeployConfig,
    clients: Clients,
    echo: Echo = print,
    build: BuildAndPush = build_and_push,
) -> dict[str, dict[str, str]]:
    """Run every step for real; returns the outputs of every stack (and the image under ``image``)."""
    unknown = set(config.stacks) - set(STACK_ORDER)
    if unknown:
        raise DeployError(f"unknown stacks: {', '.join(sorted(unknown))}")
    for key in config.stacks:  # fail before changing anything
        for name, value in stack_parameters(config, key).items():
            if isinstance(value, Missing):
                raise DeployError(f"stack {config.stack_name(key)} needs {value.option} (parameter {name})")
    cfn = clients.cloudformation
    outputs: dict[str, dict[str, str]] = {}

    async def outputs_of(key: str) -> None:
        if key not in config.stacks and key not in outputs:
            stack = await describe_stack(cfn, config.stack_name(key))
            if stack is not None:
                outputs[key] = stack_outputs(stack)

    if clients.iam is not None and any(k in config.stacks for k in ("cluster", "data", "services")):
        await ensure_service_linked_roles(clients.iam, echo)
    for key in STACK_ORDER:
        if key == "network":
            await ensure_image(config, clients, outputs, echo, build)
        if key == "services" and config.run_schema and "data" in config.stacks:
            await run_schema_step(config, clients, outputs, echo)
        for needed in {v.stack for v in stack_parameters(config, key).values() if isinstance(v, Output)}:
            if needed not in PSEUDO_STACKS:
                await outputs_of(needed)
        if key == "data" and key in config.stacks and config.cassandra_mode == "self-managed":
            outputs["helper"] = {"ImageUri": await helper_image(config, clients, outputs, echo)}
        if key == "services" and key in config.stacks:
            exists = await describe_stack(cfn, config.stack_name(key)) is not None
            outputs["deploy"] = {"AlbDeletionProtection": "true" if exists else "false"}
        if key not in config.stacks:
            continue
        parameters = resolve(stack_parameters(config, key), outputs, strict=True)
        outputs[key] = await deploy_stack(cfn, config, key, parameters, echo)
    if "services" in outputs:
        for label, output in (("API", "ApiUrl"), ("dashboard", "DashboardUrl")):
            if output in outputs["services"]:
                echo(f"{label}: {outputs['services'][output]}")
    return outputs


async def ensure_image(
    config: DeployConfig,
    clients: Clients,
    outputs: dict[str, dict[str, str]],
    echo: Echo,
    build: BuildAndPush,
) -> None:
    needs_image = any(k in config.stacks for k in ("data", "services"))
    if config.image:
        echo(f"image: deploying {config.image} as given")
        outputs["image"] = {"ImageUri": config.image}
        return
    if not needs_image:
        return
    if "foundation" not in outputs:
        stack = await describe_stack(clients.cloudformation, config.stack_name("foundation"))
        if stack is None:
            raise DeployError(f"stack {config.stack_name('foundation')} (the image repository) is not deployed")
        outputs["foundation"] = stack_outputs(stack)
    repository_uri = outputs["foundation"]["RepositoryUri"]
    repository = outputs["foundation"].get("RepositoryName") or repository_uri.rsplit("/", 1)[-1]
    tag = config.image_tag or default_image_tag(config.context)
    if await image_exists(clients.ecr, repository, tag):
        echo(f"image: {repository_uri}:{tag} is already in the repository; not building it again")
    else:
        username, password = await registry_credentials(clients.ecr)
        await asyncio.to_thread(build, config.context, repository_uri, tag, username, password, echo)
    outputs["image"] = {"ImageUri": f"{repository_uri}:{tag}"}


async def helper_image(
    config: DeployConfig, clients: Clients, outputs: Mapping[str, Mapping[str, str]], echo: Echo
) -> str:
    """The Cassandra helper image: the ring's current one, unless there is none yet or a roll is asked for."""
    stack = await describe_stack(clients.cloudformation, config.stack_name("data"))
    current = stack_outputs(stack).get("CassandraHelperImage", "") if stack else ""
    if current and not config.roll_cassandra_helper:
        echo(f"cassandra helper: keeping {current} (the ring is not restarted; --roll-cassandra-helper to change)")
        return current
    image = outputs["image"]["ImageUri"]
    repository_uri = outputs.get("foundation", {}).get("RepositoryUri", "")
    if repository_uri and image.startswith(f"{repository_uri}:"):
        repository = outputs["foundation"].get("RepositoryName") or repository_uri.rsplit("/", 1)[-1]
        tag = await tag_helper_image(clients.ecr, repository, image.rsplit(":", 1)[1])
        image = f"{repository_uri}:{tag}"
    echo(f"cassandra helper: {image} ({'rolling the ring, one node at a time' if current else 'first deploy'})")
    return image


async def run_schema_step(
    config: DeployConfig, clients: Clients, outputs: Mapping[str, Mapping[str, str]], echo: Echo
) -> None:
    data, cluster = outputs.get("data", {}), outputs.get("cluster", {})
    try:
        task_definition = data["SchemaTaskDefinitionArn"]
        cluster_name, provider = cluster["ClusterName"], cluster["AppCapacityProvider"]
    except KeyError as missing:
        raise DeployError(f"the schema step needs output {missing} of the data and cluster stacks") from None
    await run_schema(
        clients.ecs,
        cluster=cluster_name,
        task_definition=task_definition,
        capacity_provider=provider,
        echo=echo,
        poll_seconds=config.poll_seconds,
        timeout_seconds=config.schema_timeout_seconds,
    )


async def plan(config: DeployConfig, clients: Clients | None, echo: Echo = print) -> list[str]:
    """--dry-run: what ``deploy`` would do, reading (never changing) what exists. Returns the lines."""
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        echo(f"[dry-run] {line}")

    say(f"environment {config.environment}, region {config.region or '(from the AWS configuration)'}")
    if clients is not None and clients.iam is not None:
        try:
            await ensure_service_linked_roles(clients.iam, say, dry_run=True)
        except (ClientError, BotoCoreError) as error:
            say(f"(service-linked roles not checked: {type(error).__name__}: {error})")
    outputs: dict[str, dict[str, str]] = {}
    aws = clients
    for key in STACK_ORDER:
        if key == "network":
            if config.image:
                say(f"image: would deploy {config.image} as given")
            elif any(k in config.stacks for k in ("data", "services")):
                tag = config.image_tag or default_image_tag(config.context)
                repository = outputs.get("foundation", {}).get(
                    "RepositoryUri", str(Output("foundation", "RepositoryUri"))
                )
                say(f"image: would build Dockerfile (target runtime), push {repository}:{tag} (unless there)")
                outputs["image"] = {"ImageUri": f"{repository}:{tag}"}
        if key == "services" and config.run_schema and "data" in config.stacks:
            schema = outputs.get("data", {}).get("SchemaTaskDefinitionArn", "<data.SchemaTaskDefinitionArn>")
            cluster = outputs.get("cluster", {}).get("ClusterName", "<cluster.ClusterName>")
            say(f"schema: would run task definition {schema} once on cluster {cluster} and wait for exit 0")
        name = config.stack_name(key)
        existing: dict[str, Any] | None = None
        if aws is not None:
            try:
                existing = await describe_stack(aws.cloudformation, name)
                if key in config.stacks and config.validate_templates:
                    await aws.cloudformation.validate_template(TemplateBody=template_body(key))
            except (ClientError, BotoCoreError) as error:
                if isinstance(error, ClientError) and _error_code(error) == "ValidationError" and existing is not None:
                    raise DeployError(f"infra/{key}.yaml does not validate: {_error_message(error)}") from error
                say(f"(AWS not reachable, planning without it: {type(error).__name__}: {error})")
                aws = None
        if existing is not None:
            outputs[key] = stack_outputs(existing)
        if key == "services":
            outputs["deploy"] = {"AlbDeletionProtection": "true" if existing else "false"}
        if key == "data" and config.cassandra_mode == "self-managed":
            current = outputs.get("data", {}).get("CassandraHelperImage", "")
            if current and not config.roll_cassandra_helper:
                outputs["helper"] = {"ImageUri": current}
            else:
                image = outputs.get("image", {}).get("ImageUri", "<image>")
                outputs["helper"] = {"ImageUri": f"{image} (tagged {HELPER_TAG_PREFIX}*)"}
        if key not in config.stacks:
            continue
        action = f"update (now {existing['StackStatus']})" if existing else "create"
        say(f"stack {name}: would {action} from infra/{key}.yaml")
        for param, value in resolve(stack_parameters(config, key), outputs, strict=False).items():
            say(f"    {param} = {value}")
    return lines


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, str]]:
    overrides: dict[str, dict[str, str]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        stack, dot, param = target.partition(".")
        if not sep or not dot or stack not in STACK_ORDER or not param:
            raise DeployError(
                f"--param {item!r}: expected STACK.Parameter=value with STACK in {', '.join(STACK_ORDER)}"
            )
        overrides.setdefault(stack, {})[param] = value
    return overrides


def parse_args(argv: Sequence[str]) -> DeployConfig:
    parser = argparse.ArgumentParser(
        prog="infra/deploy", description="Build, push and deploy Sluice to AWS (see docs/deploy.md)."
    )
    parser.add_argument("--environment", default="sluice", help="name prefix of every stack and resource")
    parser.add_argument("--region", default=None, help="AWS region (default: the AWS configuration's)")
    parser.add_argument("--certificate-arn", help="ACM certificate of the API's host name (services stack)")
    parser.add_argument("--api-keys-secret-arn", help="Secrets Manager secret holding SLUICE_API_KEYS")
    parser.add_argument("--alarm-email", default="", help="address subscribed to the alarms")
    parser.add_argument("--nat-gateways", choices=["one-per-zone", "single"], default="one-per-zone")
    parser.add_argument("--keyspaces", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--external-cassandra-endpoint", default="", help="use this Cassandra endpoint (plain CQL, in the VPC) instead"
    )
    parser.add_argument("--external-cassandra-port", type=int, default=9042)
    parser.add_argument(
        "--external-cassandra-credentials-secret-arn",
        default="",
        help='secret with JSON keys "username" and "password" for the external endpoint',
    )
    image = parser.add_mutually_exclusive_group()
    image.add_argument("--image", help="deploy this image URI as is (no build); e.g. a rollback")
    image.add_argument("--tag", help="image tag to build and push (default: the git commit)")
    parser.add_argument(
        "--stacks",
        default=",".join(STACK_ORDER),
        help=f"comma-separated subset of {','.join(STACK_ORDER)} (default: all)",
    )
    parser.add_argument("--skip-schema", action="store_true", help="do not run the schema step")
    parser.add_argument(
        "--roll-cassandra-helper",
        action="store_true",
        help="give the Cassandra ring this release's image as its discovery helper (restarts every node, one by one)",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="STACK.Parameter=value",
        help="override a template parameter (repeatable)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would be done; change nothing")
    parser.add_argument("--no-validate", action="store_true", help="--dry-run: skip CloudFormation's ValidateTemplate")
    parser.add_argument("--poll-seconds", type=float, default=15.0, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint-url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.param)
    except DeployError as error:
        parser.error(str(error))
    stacks = tuple(s.strip() for s in args.stacks.split(",") if s.strip())
    if set(stacks) - set(STACK_ORDER):
        parser.error(f"--stacks: unknown {', '.join(sorted(set(stacks) - set(STACK_ORDER)))}")
    endpoint = args.external_cassandra_endpoint
    if args.keyspaces:
        # Keyspaces accepts only TLS (port 9142) and protocol v4; the application's Cassandra connection has
        # no TLS setting, so the path would deploy and then fail at the first query.
        parser.error(
            "--keyspaces is not supported: Amazon Keyspaces needs TLS, which Sluice's Cassandra connection "
            "does not offer yet (docs/deploy.md, Limits)"
        )
    return DeployConfig(
        environment=args.environment,
        region=args.region,
        certificate_arn=args.certificate_arn,
        api_keys_secret_arn=args.api_keys_secret_arn,
        alarm_email=args.alarm_email,
        nat_gateways=args.nat_gateways,
        cassandra_mode="external" if endpoint else "self-managed",
        external_cassandra_endpoint=endpoint,
        external_cassandra_port=args.external_cassandra_port,
        external_cassandra_credentials_secret_arn=args.external_cassandra_credentials_secret_arn,
        image=args.image,
        image_tag=args.tag,
        stacks=tuple(k for k in STACK_ORDER if k in stacks),
        run_schema=not args.skip_schema,
        roll_cassandra_helper=args.roll_cassandra_helper,
        dry_run=args.dry_run,
        validate_templates=not args.no_validate,
        overrides=overrides,
        endpoint_url=args.endpoint_url,
        poll_seconds=args.poll_seconds,
    )


async def async_main(argv: Sequence[str], echo: Echo = print) -> int:
    config = parse_args(argv)
    session = aiobotocore.session.get_session()
    client_options = {"region_name": config.region, "endpoint_url": config.endpoint_url}
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients = Clients(
                cloudformation=await stack.enter_async_context(
                    session.create_client("cloudformation", **client_options)
                ),
                ecr=await stack.enter_async_context(session.create_client("ecr", **client_options)),
                ecs=await stack.enter_async_context(session.create_client("ecs", **client_options)),
                iam=await stack.enter_async_context(session.create_client("iam", **client_options)),
            )
            if config.dry_run:
                await plan(config, clients, echo)
            else:
                await deploy(config, clients, echo)
    except DeployError as error:
        echo(f"deploy failed: {error}")
        return 1
    except NoCredentialsError:
        echo("deploy failed: no AWS credentials (set a profile, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
        return 1
    except (ClientError, BotoCoreError) as error:
        echo(f"deploy failed: AWS said: {error}")
        return 1
    return 0


def main() -> None:
    sys.exit(asyncio.run(async_main(sys.argv[1:])))


if __name__ == "__main__":
    main()
