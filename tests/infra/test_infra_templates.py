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
    assert re.search(r'^CMD \["python", "-m", "api"\]$', runtime, re.M)  # exec form
    assert not any(re.match(r"^(ENV|ARG)\b.*(KEY|PASSWORD|SECRET|TOKEN)", line) for line in instructions)


def test_compose() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis
    assert "--maxmemory-policy noeviction" in redis
    assert services["cassandra"]["image"] == "cassandra:5.0.8"
    assert {"MAX_HEAP_SIZE", "HEAP_NEWSIZE"} <= set(services["cassandra"]["environment"])
    assert services["schema"]["command"] == ["python", "-m", "sluice.schema"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["schema"] == {"condition": "service_completed_successfully"}
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert services["api"]["environment"]["SLUICE_API_KEYS"].startswith("${SLUICE_API_KEYS:?")
    assert services["locust"]["profiles"] == ["loadtest"]
    assert services["locust"]["command"] == [
        "locust",
        "-f",
        "loadtests/locustfile.py",
        "--host",
        "http://api:8000",
    ]
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
    assert set(providers) == {"AppCapacityProvider", "CassandraCapacityProvider"}
    for provider in providers.values():
        group = provider["Properties"]["AutoScalingGroupProvider"]
        assert group["ManagedScaling"]["Status"] == "ENABLED"
        assert group["ManagedDraining"] == "ENABLED"
    cassandra_group = cluster["Resources"]["CassandraAutoScalingGroup"]["Properties"]
    assert cassandra_group["MinSize"] == cassandra_group["MaxSize"] == {"Ref": "CassandraNodeCount"}


def test_data(templates: dict[str, Any]) -> None:
    data = templates["data"]["Resources"]
    redis = data["Redis"]["Properties"]
    assert redis["MultiAZEnabled"]
    assert redis["AutomaticFailoverEnabled"]
    assert redis["TransitEncryptionEnabled"]
    assert redis["AtRestEncryptionEnabled"]
    assert "resolve:secretsmanager" in json.dumps(redis["AuthToken"])
    assert data["RedisParameters"]["Properties"]["Properties"]["maxmemory-policy"] == "noeviction"
    task = data["CassandraTaskDefinition"]["Properties"]
    assert task["NetworkMode"] == "host"
    assert {"Name": "data", "Host": {"SourcePath": "/data/cassandra"}} in task["Volumes"]
    assert data["CassandraService"]["Properties"]["PlacementConstraints"] == [{"Type": "distinctInstance"}]
    schema_env = {
        e["Name"]: e["Value"]
        for e in data["SchemaTaskDefinition"]["Properties"]["ContainerDefinitions"][0]["Environment"]
    }
    assert "NetworkTopologyStrategy" in json.dumps(schema_env["SLUICE_CASSANDRA_REPLICATION"])
    assert '\\"${AWS::Region}\\": 3' in json.dumps(schema_env["SLUICE_CASSANDRA_REPLICATION"])
    assert templates["data"]["Parameters"]["CassandraMode"]["AllowedValues"] == ["self-managed", "external"]


def test_services(templates: dict[str, Any]) -> None:
    services = templates["services"]["Resources"]
    group = services["ApiTargetGroup"]["Properties"]
    assert group["HealthCheckPath"] == "/readyz"
    assert {"Key": "deregistration_delay.timeout_seconds", "Value": "30"} in group["TargetGroupAttributes"]
    api = services["ApiService"]["Properties"]
    assert api["DeploymentConfiguration"]["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}
    assert {"Type": "spread", "Field": "attribute:ecs.availability-zone"} in api["PlacementStrategies"]
    kinds = {
        json.dumps(p["Properties"]["TargetTrackingScalingPolicyConfiguration"].get("PredefinedMetricSpecification"))
        for p in resources(templates["services"], "AWS::ApplicationAutoScaling::ScalingPolicy").values()
    }
    assert any("ALBRequestCountPerTarget" in k for k in kinds)
    assert any("CPUUtilization" in k for k in kinds)
    # The worker: a warm shutdown outlasts a task's time limit; one per instance; the publisher beside it.
    worker = services["WorkerTaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    limit = next(e["Value"] for e in worker["Environment"] if e["Name"] == "SLUICE_TASK_TIME_LIMIT_S")
    assert worker["StopTimeout"] > int(limit)
    assert services["WorkerBaseService"]["Properties"]["SchedulingStrategy"] == "DAEMON"
    base = services["WorkerBaseTaskDefinition"]["Properties"]["ContainerDefinitions"]
    assert [c["Command"] for c in base] == [["python", "-m", "worker"], ["python", "-m", "worker.cloudwatch"]]
    # Only the ALB reaches the API: the one ingress rule of the app security group comes from the ALB's.
    ingress = resources(templates["services"], "AWS::EC2::SecurityGroupIngress")
    assert [r["Properties"]["SourceSecurityGroupId"] for r in ingress.values()] == [{"Ref": "AlbSecurityGroup"}]
    # The worker may put metrics, in its namespace only.
    policy = services["WorkerTaskRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"][0]
    assert policy["Action"] == "cloudwatch:PutMetricData"
    assert policy["Condition"] == {"StringEquals": {"cloudwatch:namespace": {"Ref": "MetricsNamespace"}}}
    json.loads(re.sub(r"\$\{[^}]+\}", "x", services["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"][0]))


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
