"""infra/deploy.py: its AWS calls against moto (server mode), the rest without any engine or account.

moto's CloudFormation creates the foundation and network stacks for real; it silently skips capacity
providers and Application Auto Scaling resources, so those are exercised through the direct APIs with
the very settings the templates declare.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiobotocore.session
import pytest

from infra import deploy as d

T = TypeVar("T")


def with_clients(endpoint: str, body: Callable[[d.Clients], Awaitable[T]]) -> T:
    async def run() -> T:
        session = aiobotocore.session.get_session()
        async with (
            session.create_client("cloudformation", endpoint_url=endpoint) as cfn,
            session.create_client("ecr", endpoint_url=endpoint) as ecr,
            session.create_client("ecs", endpoint_url=endpoint) as ecs,
        ):
            return await body(d.Clients(cloudformation=cfn, ecr=ecr, ecs=ecs))

    return asyncio.run(run())


def config(**overrides: Any) -> d.DeployConfig:
    base: dict[str, Any] = {"poll_seconds": 0.05, "validate_templates": False, "image_tag": "abc123"}
    return d.DeployConfig(**{**base, **overrides})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def never_build(*args: Any) -> None:
    raise AssertionError(f"nothing should be built here: {args}")


def test_parameters_match_every_template(templates: dict[str, dict[str, Any]]) -> None:
    """Every parameter the tool passes exists, and every parameter without a default is passed."""
    for mode in ("self-managed", "external"):
        cfg = config(cassandra_mode=mode, certificate_arn="arn:aws:acm:x", api_keys_secret_arn="arn:aws:x")
        for key in d.STACK_ORDER:
            declared = templates[key]["Parameters"]
            given = d.stack_parameters(cfg, key)
            assert set(given) <= set(declared), (key, set(given) - set(declared))
            required = {name for name, spec in declared.items() if "Default" not in spec}
            assert required <= set(given), (key, required - set(given))
            outputs_used = {v for v in given.values() if isinstance(v, d.Output) and v.stack not in d.PSEUDO_STACKS}
            for output in outputs_used:
                assert output.key in templates[output.stack]["Outputs"], output


def test_templates_fit_inline() -> None:
    for key in d.STACK_ORDER:
        assert len(d.template_body(key).encode()) < d.TEMPLATE_BODY_LIMIT


def test_deploy_creates_then_updates_the_stacks(aws: str) -> None:
    lines: list[str] = []
    cfg = config(stacks=("foundation", "network"))
    outputs = with_clients(aws, lambda c: d.deploy(cfg, c, lines.append, never_build))
    assert outputs["foundation"]["RepositoryUri"].endswith("/sluice")
    assert outputs["network"]["VpcId"].startswith("vpc-")
    assert len(outputs["network"]["PrivateSubnetIds"].split(",")) == 3
    assert "stack sluice-foundation: creating from infra/foundation.yaml" in lines
    assert any(line.startswith("stack sluice-network: created in ") for line in lines)

    lines.clear()
    again = with_clients(aws, lambda c: d.deploy(cfg, c, lines.append, never_build))
    # An update of the same templates: same outputs. (moto applies every update; AWS answers "No updates
    # are to be performed", which deploy_stack reports as "no changes".)
    assert again["network"] == outputs["network"]
    assert "stack sluice-network: updating from infra/network.yaml (CREATE_COMPLETE)" in lines


def test_dry_run_changes_nothing_and_shows_the_whole_plan(aws: str) -> None:
    with_clients(aws, lambda c: d.deploy(config(stacks=("foundation",)), c, lambda _: None, never_build))
    lines = with_clients(
        aws,
        lambda c: d.plan(config(dry_run=True, certificate_arn="arn:aws:acm:us-east-1:1:certificate/x"), c, print),
    )
    text = "\n".join(lines)
    assert "stack sluice-foundation: would update (now CREATE_COMPLETE)" in text
    assert "stack sluice-network: would create from infra/network.yaml" in text
    assert "123456789012.dkr.ecr.us-east-1.amazonaws.com/sluice:abc123" in text  # from the real output
    assert "ClusterName = <cluster.ClusterName>" in text
    assert "ApiKeysSecretArn = <missing: --api-keys-secret-arn>" in text
    assert "schema: would run task definition <data.SchemaTaskDefinitionArn> once" in text

    async def stacks(c: d.Clients) -> list[str]:
        return [s["StackName"] for s in (await c.cloudformation.describe_stacks())["Stacks"]]

    assert with_clients(aws, stacks) == ["sluice-foundation"]


def test_dry_run_without_aws_still_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    lines = asyncio.run(d.plan(config(dry_run=True), None))
    assert any("stack sluice-services: would create" in line for line in lines)
    assert "[dry-run] stack sluice-foundation: would create" in capsys.readouterr().out


def test_missing_required_options_fail_before_any_change(aws: str) -> None:
    with pytest.raises(d.DeployError, match="--certificate-arn"):
        with_clients(aws, lambda c: d.deploy(config(), c, print, never_build))

    async def stacks(c: d.Clients) -> Any:
        return (await c.cloudformation.describe_stacks())["Stacks"]

    assert with_clients(aws, stacks) == []


def test_image_already_in_the_repository_is_not_built_again(aws: str) -> None:
    with_clients(aws, lambda c: d.deploy(config(stacks=("foundation",)), c, lambda _: None, never_build))

    async def push_manifest(c: d.Clients) -> None:
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {},
            "layers": [],
        }
        await c.ecr.put_image(repositoryName="sluice", imageManifest=json.dumps(manifest), imageTag="abc123")

    with_clients(aws, push_manifest)
    outputs: dict[str, dict[str, str]] = {}
    lines: list[str] = []
    cfg = config(stacks=("data",))
    with_clients(aws, lambda c: d.ensure_image(cfg, c, outputs, lines.append, never_build))
    assert outputs["image"]["ImageUri"].endswith("/sluice:abc123")
    assert any("already in the repository" in line for line in lines)

    built: list[tuple[Any, ...]] = []
    cfg = config(stacks=("data",), image_tag="def456")
    with_clients(aws, lambda c: d.ensure_image(cfg, c, {}, lines.append, lambda *a: built.append(a)))
    (context, repository_uri, tag, username, password, _echo) = built[0]
    assert (context, tag, username) == (d.ROOT, "def456", "AWS")
    assert repository_uri.endswith("/sluice")
    assert password


def test_no_docker_engine_gives_a_clear_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(d.DeployError, match="no Docker engine reachable") as raised:
        d.build_and_push(d.ROOT, "123.dkr.ecr.us-east-1.amazonaws.com/sluice", "t", "AWS", "pw", print)
    assert "--image" in str(raised.value)
    # An engine address where nothing listens (a free loopback port): the same message, after trying.
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{free_port()}")
    with pytest.raises(d.DeployError, match=r"no Docker engine reachable at tcp://127\.0\.0\.1"):
        d.build_and_push(d.ROOT, "123.dkr.ecr.us-east-1.amazonaws.com/sluice", "t", "AWS", "pw", print)


async def ecs_cluster_with_an_instance(c: d.Clients, endpoint: str) -> str:
    """A cluster with one registered EC2 container instance and the schema task definition."""
    session = aiobotocore.session.get_session()
    async with session.create_client("ec2", endpoint_url=endpoint) as ec2:
        image = (await ec2.describe_images(Owners=["amazon"]))["Images"][0]["ImageId"]
        instance = (await ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1))["Instances"][0]
    await c.ecs.create_cluster(clusterName="sluice")
    document = {"instanceId": instance["InstanceId"], "region": "us-east-1"}
    await c.ecs.register_container_instance(
        cluster="sluice",
        instanceIdentityDocument=json.dumps(document),
        totalResources=[
            {"name": "CPU", "type": "INTEGER", "integerValue": 4096},
            {"name": "MEMORY", "type": "INTEGER", "integerValue": 8192},
        ],
    )
    registered = await c.ecs.register_task_definition(
        family="sluice-schema",
        containerDefinitions=[
            {
                "name": "schema",
                "image": "sluice:t",
                "memory": 512,
                "command": ["sluice", "schema", "apply"],
            }
        ],
    )
    return str(registered["taskDefinition"]["taskDefinitionArn"])


def test_schema_step_runs_one_task_and_waits_for_exit_zero(aws: str) -> None:
    lines: list[str] = []

    async def scenario(c: d.Clients) -> str:
        arn = await ecs_cluster_with_an_instance(c, aws)
        step = asyncio.create_task(
            d.run_schema(
                c.ecs,
                cluster="sluice",
                task_definition=arn,
                capacity_provider="app",
                echo=lines.append,
                poll_seconds=0.05,
                timeout_seconds=30,
            )
        )
        while not (await c.ecs.list_tasks(cluster="sluice"))["taskArns"]:  # noqa: ASYNC110 - polls ECS
            await asyncio.sleep(0.05)
        running = (await c.ecs.list_tasks(cluster="sluice"))["taskArns"]
        assert len(running) == 1
        assert not step.done()
        await c.ecs.stop_task(cluster="sluice", task=running[0], reason="Essential container exited")
        return await asyncio.wait_for(step, timeout=10)

    task_arn = with_clients(aws, scenario)
    assert lines == [f"schema: task {task_arn} started", "schema: applied (exit code 0)"]


def test_schema_step_never_runs_twice_at_once(aws: str) -> None:
    async def scenario(c: d.Clients) -> None:
        arn = await ecs_cluster_with_an_instance(c, aws)
        await c.ecs.run_task(cluster="sluice", taskDefinition=arn, count=1, launchType="EC2")
        await d.run_schema(
            c.ecs,
            cluster="sluice",
            task_definition=arn,
            capacity_provider="app",
            echo=print,
            poll_seconds=0.05,
            timeout_seconds=1,
        )

    with pytest.raises(d.DeployError, match="already running"):
        with_clients(aws, scenario)


def test_capacity_providers_accept_the_templates_settings(aws: str, templates: dict[str, Any]) -> None:
    """moto's CloudFormation skips AWS::ECS::CapacityProvider: create them through ECS with the same settings."""
    resources = templates["cluster"]["Resources"]

    def lower_first(value: Any) -> Any:
        if isinstance(value, dict):
            return {k[:1].lower() + k[1:]: lower_first(v) for k, v in value.items()}
        return value

    async def scenario(c: d.Clients) -> list[dict[str, Any]]:
        session = aiobotocore.session.get_session()
        async with session.create_client("autoscaling", endpoint_url=aws) as autoscaling:
            await autoscaling.create_launch_configuration(
                LaunchConfigurationName="lc", ImageId="ami-12c6146b", InstanceType="c6i.xlarge"
            )
            for name in ("app", "cassandra"):
                await autoscaling.create_auto_scaling_group(
                    AutoScalingGroupName=name,
                    LaunchConfigurationName="lc",
                    MinSize=0,
                    MaxSize=3,
                    AvailabilityZones=["us-east-1a"],
                )
        for name, logical in (("app", "AppCapacityProvider"), ("cassandra", "CassandraCapacityProvider1")):
            provider = dict(resources[logical]["Properties"]["AutoScalingGroupProvider"])
            provider.pop("AutoScalingGroupArn")
            scaling = dict(provider["ManagedScaling"])
            if isinstance(scaling["TargetCapacity"], dict):  # !Ref AppTargetCapacity
                scaling["TargetCapacity"] = templates["cluster"]["Parameters"]["AppTargetCapacity"]["Default"]
            provider["ManagedScaling"] = scaling
            api_provider = lower_first(provider)
            api_provider["autoScalingGroupArn"] = name
            await c.ecs.create_capacity_provider(name=name, autoScalingGroupProvider=api_provider)
        return list(
            (await c.ecs.describe_capacity_providers(capacityProviders=["app", "cassandra"]))["capacityProviders"]
        )

    providers = with_clients(aws, scenario)
    for provider in providers:
        asg = provider["autoScalingGroupProvider"]
        assert asg["managedScaling"]["status"] == "ENABLED"
        assert asg["managedTerminationProtection"] == "DISABLED"


def test_scaling_policies_of_the_template_are_accepted(aws: str, templates: dict[str, Any]) -> None:
    """moto's CloudFormation skips Application Auto Scaling: register the template's policies directly."""
    resources = templates["services"]["Resources"]
    values = {
        "ClusterName": "sluice",
        "EnvironmentName": "sluice",
        "MetricsNamespace": "Sluice",
        "WorkerBacklogPerTaskTarget": 20,
        "WorkerCpuTarget": 70,
        "ApiCpuTarget": 60,
        "ApiRequestsPerTargetPerMinute": 18000,
    }

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"Ref"}:
                return values[value["Ref"]]
            if set(value) == {"Fn::GetAtt"}:
                return {"WorkerService": "worker", "ApiService": "api"}[value["Fn::GetAtt"][0]]
            if set(value) == {"Fn::Join"}:
                return "app/sluice-api/0123456789abcdef/targetgroup/api/0123456789abcdef"
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    async def scenario(c: d.Clients) -> list[dict[str, Any]]:
        await c.ecs.create_cluster(clusterName="sluice")
        task = await c.ecs.register_task_definition(
            family="t", containerDefinitions=[{"name": "c", "image": "i", "memory": 128}]
        )
        for service in ("api", "worker"):
            await c.ecs.create_service(
                cluster="sluice",
                serviceName=service,
                taskDefinition=task["taskDefinition"]["taskDefinitionArn"],
            )
        session = aiobotocore.session.get_session()
        async with session.create_client("application-autoscaling", endpoint_url=aws) as scaling:
            for service, target in (("api", "ApiScalableTarget"), ("worker", "WorkerScalableTarget")):
                props = resources[target]["Properties"]
                await scaling.register_scalable_target(
                    ServiceNamespace="ecs",
                    ScalableDimension="ecs:service:DesiredCount",
                    ResourceId=f"service/sluice/{service}",
                    MinCapacity=1,
                    MaxCapacity=10,
                )
                assert props["ScalableDimension"] == "ecs:service:DesiredCount"
            for logical, service in (
                ("ApiRequestsScaling", "api"),
                ("ApiCpuScaling", "api"),
                ("WorkerBacklogScaling", "worker"),
                ("WorkerCpuScaling", "worker"),
            ):
                props = resources[logical]["Properties"]
                await scaling.put_scaling_policy(
                    PolicyName=logical,
                    ServiceNamespace="ecs",
                    ResourceId=f"service/sluice/{service}",
                    ScalableDimension="ecs:service:DesiredCount",
                    PolicyType="TargetTrackingScaling",
                    TargetTrackingScalingPolicyConfiguration=resolve(props["TargetTrackingScalingPolicyConfiguration"]),
                )
            return list((await scaling.describe_scaling_policies(ServiceNamespace="ecs"))["ScalingPolicies"])

    policies = {p["PolicyName"]: p for p in with_clients(aws, scenario)}
    assert set(policies) == {
        "ApiRequestsScaling",
        "ApiCpuScaling",
        "WorkerBacklogScaling",
        "WorkerCpuScaling",
    }
    backlog = policies["WorkerBacklogScaling"]["TargetTrackingScalingPolicyConfiguration"]
    metrics = backlog["CustomizedMetricSpecification"]["Metrics"]
    # The policy divides by the tasks it controls (the worker service's), nothing else.
    assert [m["Id"] for m in metrics] == ["depth", "scaled", "backlogPerTask"]
    assert metrics[1]["MetricStat"]["Metric"]["Dimensions"][1] == {"Name": "ServiceName", "Value": "worker"}
    assert metrics[-1]["Expression"] == "depth / scaled"


def test_command_line() -> None:
    cfg = d.parse_args(
        [
            "--environment",
            "prod",
            "--region",
            "eu-west-1",
            "--external-cassandra-endpoint",
            "cassandra.example.internal",
            "--param",
            "services.ApiMinTasks=4",
            "--stacks",
            "services,data",
            "--tag",
            "v1",
        ]
    )
    assert cfg.cassandra_mode == "external"
    assert cfg.external_cassandra_endpoint == "cassandra.example.internal"
    assert d.stack_parameters(cfg, "data")["ExternalCassandraPort"] == "9042"
    assert cfg.stacks == ("data", "services")
    assert d.stack_parameters(cfg, "services")["ApiMinTasks"] == "4"
    assert d.stack_parameters(cfg, "data")["CassandraCapacityProviders"] == ""
    assert d.stack_parameters(cfg, "data")["CassandraHelperImage"] == ""
    with pytest.raises(SystemExit):
        d.parse_args(["--param", "nowhere.X=1"])
    # Keyspaces needs TLS, which the application's Cassandra connection lacks: refused, not half-deployed.
    with pytest.raises(SystemExit):
        d.parse_args(["--region", "eu-west-1", "--keyspaces"])
