"""What the Dockerfile, compose.yaml and the CloudFormation templates promise, asserted on their text.

The validators (hadolint, check-jsonschema, cfn-lint, checkov) run in infra/validate.sh; these tests pin
the design decisions that no linter knows about.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def walk(value: Any) -> list[Any]:
    found = [value]
    if isinstance(value, dict):
        for item in value.values():
            found.extend(walk(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(walk(item))
    return found


def resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(re.findall(r"^FROM ", text, re.M)) >= 3  # multi-stage
    assert "pip install uv==" in text
    lock = text.index("COPY pyproject.toml uv.lock")
    assert lock < text.index("uv sync --frozen") < text.index("COPY sluice/")  # dependencies before code
    assert "--no-default-groups" in text  # runtime deps only in the runtime image
    runtime = text[text.index("AS runtime") :]
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    assert "HEALTHCHECK --interval" in runtime
    assert "/healthz" in runtime
    assert re.search(r'^CMD \["sluice", "api"\]$', runtime, re.M)  # exec form, the `sluice` command
    assert not any(re.match(r"^(ENV|ARG)\b.*(KEY|PASSWORD|SECRET|TOKEN)", line) for line in instructions)


def test_compose() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis
    assert "--maxmemory-policy noeviction" in redis
    assert services["cassandra"]["image"] == "cassandra:5.0.8"
    assert {"MAX_HEAP_SIZE", "HEAP_NEWSIZE"} <= set(services["cassandra"]["environment"])
    assert services["schema"]["command"] == ["sluice", "schema", "apply"]
    assert services["api"]["command"] == ["sluice", "api"]
    assert services["worker"]["command"] == ["sluice", "worker"]
    assert services["worker"]["healthcheck"]["test"][1:3] == ["sluice", "liveness"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["schema"] == {"condition": "service_completed_successfully"}
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert services["api"]["environment"]["SLUICE_API_KEYS"].startswith("${SLUICE_API_KEYS:?")
    assert services["locust"]["profiles"] == ["loadtest"]
    locust = services["locust"]["command"]
    assert locust[:3] == ["locust", "-f", "loadtests/locustfile.py"]
    assert locust[locust.index("--host") + 1] == "http://api:8000"
    # A user count: without one the locustfile's init hook exits (--users-batch must be below it).
    assert int(locust[locust.index("--users") + 1]) > 1
    assert all("healthcheck" in services[n] for n in ("redis", "cassandra", "api", "worker"))


def test_cluster(templates: dict[str, Any]) -> None:
    cluster = templates["cluster"]
    assert cluster["Parameters"]["EcsAmiId"]["Default"].startswith("/aws/service/ecs/optimized-ami/amazon-linux-2023/")
    ecs = resources(cluster, "AWS::ECS::Cluster")["Cluster"]["Properties"]
    assert {"Name": "containerInsights", "Value": "enabled"} in ecs["ClusterSettings"]
    for template in resources(cluster, "AWS::EC2::LaunchTemplate").values():
        data = template["Properties"]["LaunchTemplateData"]
        assert data["MetadataOptions"]["HttpTokens"] == "required"
        for device in data["BlockDeviceMappings"]:
            assert device["Ebs"]["VolumeType"] == "gp3"
            assert device["Ebs"]["Encrypted"] is True
    providers = resources(cluster, "AWS::ECS::CapacityProvider")
    assert set(providers) == {"AppCapacityProvider"} | {f"CassandraCapacityProvider{n}" for n in (1, 2, 3)}
    for provider in providers.values():
        group = provider["Properties"]["AutoScalingGroupProvider"]
        assert group["ManagedScaling"]["Status"] == "ENABLED"
        assert group["ManagedDraining"] == "ENABLED"
    # One group per node slot, each in one zone (its own subnet) with exactly one instance, and the slot's
    # volume in that same zone: a replacement lands where its data is.
    for n in (1, 2, 3):
        group = cluster["Resources"][f"CassandraAutoScalingGroup{n}"]["Properties"]
        assert group["MinSize"] == group["MaxSize"] == 1
        assert group["VPCZoneIdentifier"] == [{"Fn::Select": [n - 1, {"Ref": "PrivateSubnetIds"}]}]
        volume = cluster["Resources"][f"CassandraVolume{n}"]
        assert volume["Properties"]["AvailabilityZone"] == {"Fn::Select": [n - 1, {"Ref": "PrivateSubnetZones"}]}
        assert volume["DeletionPolicy"] == volume["UpdateReplacePolicy"] == "Snapshot"
        slot = {"Key": "SluiceCassandraNode", "Value": {"Fn::Sub": f"${{EnvironmentName}}-cassandra-{n}"}}
        assert slot in volume["Properties"]["Tags"]
        assert {**slot, "PropagateAtLaunch": True} in group["Tags"]
    launch = cluster["Resources"]["CassandraLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert launch["MetadataOptions"]["InstanceMetadataTags"] == "enabled"
    assert [d["DeviceName"] for d in launch["BlockDeviceMappings"]] == ["/dev/xvda"]  # no data volume in it
    boot = launch["UserData"]["Fn::Base64"]["Fn::Sub"]
    assert "attach-volume" in boot
    assert boot.index("mountpoint -q /data/cassandra") < boot.index("role=cassandra\n")


def test_data(templates: dict[str, Any]) -> None:
    data = templates["data"]["Resources"]
    redis = data["Redis"]["Properties"]
    assert redis["MultiAZEnabled"]
    assert redis["AutomaticFailoverEnabled"]
    assert redis["TransitEncryptionEnabled"]
    assert redis["AtRestEncryptionEnabled"]
    assert "resolve:secretsmanager" in json.dumps(redis["AuthToken"])
    parameters = data["RedisParameters"]["Properties"]["Properties"]
    assert parameters["maxmemory-policy"] == "noeviction"
    # A 202 is on two nodes: the primary refuses writes without a replica in reach, and the API waits (WAIT) for
    # as many replicas as the primary requires, a number the data stack hands to the services stack.
    assert int(parameters["min-slaves-to-write"]) >= 1
    assert int(parameters["min-slaves-max-lag"]) <= 10
    assert templates["data"]["Outputs"]["RedisMinReplicas"]["Value"] == parameters["min-slaves-to-write"]
    node_count = templates["data"]["Parameters"]["RedisNodeCount"]
    # Every replica-count the stack allows leaves a replica to confirm writes after one node is lost.
    assert node_count["Default"] == 3
    assert min(node_count["AllowedValues"]) > int(parameters["min-slaves-to-write"])
    assert redis["NumCacheClusters"] == {"Ref": "RedisNodeCount"}
    task = data["CassandraTaskDefinition"]["Properties"]
    assert task["NetworkMode"] == "host"
    assert {"Name": "data", "Host": {"SourcePath": "/data/cassandra"}} in task["Volumes"]
    containers = {c["Name"]: c for c in task["ContainerDefinitions"]}
    # The helper and the disk publisher run the pinned helper image, never the release image.
    assert containers["discover"]["Image"] == {"Ref": "CassandraHelperImage"}
    assert containers["disk-metrics"]["Image"] == {"Ref": "CassandraHelperImage"}
    assert "--data-dir" in containers["discover"]["Command"]
    assert "ImageUri" not in json.dumps(task)
    for n in (1, 2, 3):
        service = data[f"CassandraService{n}"]
        strategy = service["Properties"]["CapacityProviderStrategy"]
        assert strategy == [
            {"CapacityProvider": {"Fn::Select": [n - 1, {"Ref": "CassandraCapacityProviders"}]}, "Weight": 1}
        ]
        assert service.get("DependsOn") == (f"CassandraService{n - 1}" if n > 1 else None)  # one node at a time
    policy = json.dumps(data["CassandraTaskRole"]["Properties"]["Policies"])
    for action in ("servicediscovery:GetOperation", "route53:GetHostedZone", "route53:ListHostedZonesByName"):
        assert action in policy
    assert "ssl_cert_reqs=required" in data["RedisUrlSecret"]["Properties"]["SecretString"]["Fn::Sub"]
    schema_env = {
        e["Name"]: e["Value"]
        for e in data["SchemaTaskDefinition"]["Properties"]["ContainerDefinitions"][0]["Environment"]
    }
    assert "NetworkTopologyStrategy" in json.dumps(schema_env["SLUICE_CASSANDRA_REPLICATION"])
    assert '\\"${AWS::Region}\\": 3' in json.dumps(schema_env["SLUICE_CASSANDRA_REPLICATION"])
    # One retention for the schema step (TTL, compaction windows), the API (422 past it) and the workers (TTL).
    assert schema_env["SLUICE_RETENTION_DAYS"] == {"Ref": "EventRetentionDays"}
    assert templates["data"]["Outputs"]["EventRetentionDays"]["Value"] == {"Ref": "EventRetentionDays"}
    for name in ("ApiTaskDefinition", "WorkerTaskDefinition"):
        env = {e["Name"]: e.get("Value") for e in templates["services"]["Resources"][name]["Properties"][
            "ContainerDefinitions"][0]["Environment"]}  # fmt: skip
        assert env["SLUICE_RETENTION_DAYS"] == {"Ref": "EventRetentionDays"}, name
    assert "SingleRegionStrategy" not in json.dumps(templates["data"])  # no Keyspaces path
    assert templates["data"]["Parameters"]["CassandraMode"]["AllowedValues"] == ["self-managed", "external"]


def test_services(templates: dict[str, Any]) -> None:
    services = templates["services"]["Resources"]
    group = services["ApiTargetGroup"]["Properties"]
    assert group["HealthCheckPath"] == "/healthz"
    # Only /v1/*, PostHog's /batch/ and /healthz reach the API; the listener answers 404 for the rest.
    listener = services["HttpsListener"]["Properties"]
    assert listener["DefaultActions"][0]["Type"] == "fixed-response"
    assert listener["DefaultActions"][0]["FixedResponseConfig"]["StatusCode"] == "404"
    rule = services["PublicRoutes"]["Properties"]
    assert rule["Conditions"] == [
        {"Field": "path-pattern", "PathPatternConfig": {"Values": ["/v1/*", "/batch", "/batch/", "/healthz"]}}
    ]
    assert {"Key": "deregistration_delay.timeout_seconds", "Value": "30"} in group["TargetGroupAttributes"]
    # The API waits for the replicas the data stack's primary requires, and the value cannot be 0 (a Number
    # parameter with MinValue 1, fed from the data stack's output by the deploy tool).
    api_env = {e["Name"]: e.get("Value") for e in services["ApiTaskDefinition"]["Properties"]["ContainerDefinitions"][
        0]["Environment"]}  # fmt: skip
    assert api_env["SLUICE_REDIS_MIN_REPLICAS"] == {"Ref": "RedisMinReplicas"}
    assert api_env["SLUICE_REDIS_REPLICA_TIMEOUT_MS"] == {"Ref": "RedisReplicaTimeoutMs"}
    min_replicas = templates["services"]["Parameters"]["RedisMinReplicas"]
    assert min_replicas["Type"] == "Number"
    assert min_replicas["MinValue"] >= 1
    assert min_replicas["Default"] >= 1
    from infra.deploy import DeployConfig, Output, stack_parameters

    wired = stack_parameters(DeployConfig(region="us-east-1"), "services")["RedisMinReplicas"]
    assert wired == Output("data", "RedisMinReplicas")
    api = services["ApiService"]["Properties"]
    assert api["DeploymentConfiguration"]["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}
    assert {"Type": "spread", "Field": "attribute:ecs.availability-zone"} in api["PlacementStrategies"]
    kinds = {
        json.dumps(p["Properties"]["TargetTrackingScalingPolicyConfiguration"].get("PredefinedMetricSpecification"))
        for p in resources(templates["services"], "AWS::ApplicationAutoScaling::ScalingPolicy").values()
    }
    assert any("ALBRequestCountPerTarget" in k for k in kinds)
    assert any("CPUUtilization" in k for k in kinds)
    # The worker: a warm shutdown outlasts a task's time limit; the publisher beside it (and one worker per
    # instance: test_a_worker_on_every_app_instance).
    worker = services["WorkerTaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    limit = next(e["Value"] for e in worker["Environment"] if e["Name"] == "SLUICE_TASK_TIME_LIMIT_S")
    assert worker["StopTimeout"] > int(limit)
    publisher = services["QueueMetricsTaskDefinition"]["Properties"]["ContainerDefinitions"]
    assert [c["Command"] for c in publisher] == [["sluice", "cloudwatch"]]
    assert worker["Command"] == ["sluice", "worker"]
    # The worker's health check pings the node name worker/run.py gives it, and is valid Python.
    check = worker["HealthCheck"]["Command"]
    compile(check[-1], "healthcheck", "exec")
    assert "sluice-worker-" in check[-1]
    assert '"--hostname", f"sluice-worker-{os.getpid()}@%h"' in (ROOT / "worker" / "run.py").read_text()
    assert "b'/sluice\\0worker\\0'" in check[-1]  # finds `.../bin/sluice worker`, the command above
    # Only the ALB reaches the API: the one ingress rule of the app security group comes from the ALB's.
    ingress = resources(templates["services"], "AWS::EC2::SecurityGroupIngress")
    assert [r["Properties"]["SourceSecurityGroupId"] for r in ingress.values()] == [{"Ref": "AlbSecurityGroup"}]
    # The worker may put metrics, in its namespace only.
    policy = services["WorkerTaskRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"][0]
    assert policy["Action"] == "cloudwatch:PutMetricData"
    assert policy["Condition"] == {"StringEquals": {"cloudwatch:namespace": {"Ref": "MetricsNamespace"}}}
    json.loads(re.sub(r"\$\{[^}]+\}", "x", services["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"][0]))


def test_a_worker_on_every_app_instance(templates: dict[str, Any]) -> None:
    """The design's floor, "a celery worker process on each instance": a DAEMON service runs the worker's
    container on every app instance, beside the scaled worker service (which alone may leave an instance
    without one). cfn-lint accepts a DAEMON with a capacity provider or placement strategy, which ECS refuses."""
    services = templates["services"]["Resources"]

    def containers(service: dict[str, Any]) -> list[dict[str, Any]]:
        task = services[service["Properties"]["TaskDefinition"]["Ref"]]["Properties"]
        return task["ContainerDefinitions"]  # type: ignore[no-any-return]

    ecs_services = resources(templates["services"], "AWS::ECS::Service")
    daemons = {
        name: r
        for name, r in ecs_services.items()
        if r["Properties"].get("SchedulingStrategy") == "DAEMON"
        and [c["Command"] for c in containers(r)] == [["sluice", "worker"]]
    }
    assert len(daemons) == 1, f"no DAEMON service runs the worker: {sorted(ecs_services)}"
    ((name, daemon),) = daemons.items()
    props = daemon["Properties"]
    # What ECS allows a DAEMON: the EC2 launch type, constraints but no strategies, no count, no scaling.
    assert props["LaunchType"] == "EC2"
    assert not {"CapacityProviderStrategy", "PlacementStrategies", "DesiredCount"} & set(props), name
    targets = resources(templates["services"], "AWS::ApplicationAutoScaling::ScalableTarget").values()
    assert not any(name in json.dumps(t["Properties"]["ResourceId"]) for t in targets)
    # On the app instances, which are the ones that say sluice.role == app.
    task = services[props["TaskDefinition"]["Ref"]]["Properties"]
    app_only = {"Type": "memberOf", "Expression": "attribute:sluice.role == app"}
    assert app_only in props["PlacementConstraints"]
    assert app_only in task["PlacementConstraints"]
    boot = templates["cluster"]["Resources"]["AppLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
    assert 'ECS_INSTANCE_ATTRIBUTES={"sluice.role": "app"}' in json.dumps(boot).replace('\\"', '"')
    # The worker's container, smaller: one pool process; everything else alike (image, settings, secrets,
    # health check, stop timeout), so a change to the worker cannot leave the baseline behind.
    (baseline,) = containers(daemon)
    (scaled,) = services["WorkerTaskDefinition"]["Properties"]["ContainerDefinitions"]
    environment = {e["Name"]: e["Value"] for e in baseline["Environment"]}
    assert environment.pop("SLUICE_WORKER_CONCURRENCY") == "1"
    assert environment == {e["Name"]: e["Value"] for e in scaled["Environment"]}
    assert int(baseline["Cpu"]) < int(templates["services"]["Parameters"]["WorkerCpu"]["Default"])
    assert int(baseline["Memory"]) < int(templates["services"]["Parameters"]["WorkerMemoryMiB"]["Default"])
    for key in set(scaled) | set(baseline):
        if key not in ("Cpu", "Memory", "Environment", "LogConfiguration"):
            assert baseline.get(key) == scaled.get(key), key
    options = {**baseline["LogConfiguration"]["Options"], "awslogs-stream-prefix": "worker"}
    assert options == scaled["LogConfiguration"]["Options"]
    # The scaled service stays: REPLICA, at least one task per zone, under its scaling policy.
    worker = services["WorkerService"]["Properties"]
    assert worker.get("SchedulingStrategy", "REPLICA") == "REPLICA"
    assert templates["services"]["Parameters"]["WorkerMinTasks"]["MinValue"] >= 3


def test_every_template(templates: dict[str, Any]) -> None:
    for name, template in templates.items():
        for log_group in resources(template, "AWS::Logs::LogGroup").values():
            assert "RetentionInDays" in log_group["Properties"], name
            assert "KmsKeyId" in log_group["Properties"], name
        for node in walk(template["Resources"]):
            if isinstance(node, dict) and node.get("Effect") == "Allow":
                actions = node["Action"] if isinstance(node["Action"], list) else [node["Action"]]
                assert "*" not in actions, (name, node)
                assert not any(a.endswith(":*") for a in actions if a != "kms:*"), (name, node)


def test_alarms_watch_every_node_and_the_capacity_limits(templates: dict[str, Any]) -> None:
    data, services = templates["data"]["Resources"], templates["services"]["Resources"]
    for name in ("RedisMemoryAlarm", "RedisEngineCpuAlarm"):
        text = json.dumps(data[name]["Properties"]["Metrics"])
        # Every node (the primary moves on failover), not the first one only.
        assert "${Redis}-001" in text
        assert "${Redis}-002" in text
        assert "${Redis}-003" in text
        assert "MAX([node1, node2" in text
    assert data["CassandraDiskAlarm"]["Properties"]["MetricName"] == "DataVolumeUsedPercent"
    assert "FILL(node1, 0)" in json.dumps(data["CassandraNodesAlarm"]["Properties"]["Metrics"])
    tasks = json.dumps(services["TasksNotRunningAlarm"]["Properties"]["Metrics"])
    assert "DesiredTaskCount" in tasks
    assert "RunningTaskCount" in tasks
    group = json.dumps(services["AppGroupAtMaximumAlarm"]["Properties"]["Metrics"])
    assert "GroupMaxSize" in group
    assert "GroupInServiceInstances" in group
    alarms = services["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"][0]
    for name in ("TasksNotRunningAlarm", "AppGroupAtMaximumAlarm"):
        assert f"${{{name}.Arn}}" in alarms
