"""Every CloudWatch metric a dashboard widget, an alarm or a scaling policy names exists.

Metrics in our namespace must be ones worker/cloudwatch.py really puts (computed by calling it, not read
from a list); AWS's metrics must be on the list of those AWS documents for the namespace. A counter
(``...Total``) published by several processes must be read as a rate of its Maximum, never summed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from worker.cloudwatch import PUBLISHED_METRICS, PublisherConfig, QueueMetrics, disk_metric_data, metric_data

OURS = "Sluice"
#: The metrics of AWS's namespaces that the templates use (from each service's CloudWatch documentation).
AWS_METRICS = {
    "AWS/ApplicationELB": {
        "RequestCount",
        "HTTPCode_Target_2XX_Count",
        "HTTPCode_Target_4XX_Count",
        "HTTPCode_Target_5XX_Count",
        "HTTPCode_ELB_5XX_Count",
        "TargetResponseTime",
        "UnHealthyHostCount",
        "HealthyHostCount",
    },
    "ECS/ContainerInsights": {"RunningTaskCount", "DesiredTaskCount", "PendingTaskCount"},
    "AWS/ECS": {"CPUUtilization", "MemoryUtilization"},
    "AWS/ElastiCache": {"DatabaseMemoryUsagePercentage", "EngineCPUUtilization", "CurrConnections"},
    "AWS/AutoScaling": {"GroupInServiceInstances", "GroupMaxSize", "GroupDesiredCapacity"},
}


@dataclass(frozen=True)
class Use:
    where: str
    namespace: str
    metric: str
    stat: str | None = None
    metric_id: str | None = None


def published() -> set[str]:
    """What worker/cloudwatch.py puts, by calling it."""
    config = PublisherConfig(namespace=OURS, environment="test")
    now = datetime.now(UTC)
    names = {d["MetricName"] for d in metric_data(QueueMetrics(1, 0, 0.0, 5), config, now)}
    names |= {d["MetricName"] for d in disk_metric_data(Path("/"), config, now)}
    return names


def namespace_of(value: Any) -> str:
    # The templates name our namespace by its parameter; its default is "Sluice".
    return OURS if value in ({"Ref": "MetricsNamespace"}, "${MetricsNamespace}") else str(value)


def alarm_uses(template: dict[str, Any], name: str) -> list[Use]:
    uses: list[Use] = []
    for logical, res in template["Resources"].items():
        props = res.get("Properties", {})
        if res["Type"] == "AWS::CloudWatch::Alarm":
            if "MetricName" in props:
                uses.append(
                    Use(
                        f"{name}:{logical}",
                        namespace_of(props["Namespace"]),
                        props["MetricName"],
                        props.get("Statistic"),
                    )
                )
            for item in props.get("Metrics", []):
                for query in item.get("Fn::If", [None, item])[1:2] if "Fn::If" in item else [item]:
                    stat = query.get("MetricStat") if isinstance(query, dict) else None
                    if stat:
                        metric = stat["Metric"]
                        uses.append(
                            Use(
                                f"{name}:{logical}",
                                namespace_of(metric["Namespace"]),
                                metric["MetricName"],
                                stat["Stat"],
                            )
                        )
        if res["Type"] == "AWS::ApplicationAutoScaling::ScalingPolicy":
            custom = props["TargetTrackingScalingPolicyConfiguration"].get("CustomizedMetricSpecification", {})
            for item in custom.get("Metrics", []):
                if "MetricStat" in item:
                    metric = item["MetricStat"]["Metric"]
                    uses.append(
                        Use(
                            f"{name}:{logical}",
                            namespace_of(metric["Namespace"]),
                            metric["MetricName"],
                            item["MetricStat"]["Stat"],
                        )
                    )
    return uses


def dashboard_uses(body: str) -> tuple[list[Use], list[str]]:
    """The metrics of a CloudWatch dashboard body (with ``${...}`` still in it) and its expressions."""
    widgets = json.loads(re.sub(r"\$\{(?!MetricsNamespace)[^}]+\}", "x", body))["widgets"]
    uses: list[Use] = []
    expressions: list[str] = []
    for widget in widgets:
        props = widget.get("properties", {})
        previous: list[str] = []
        for row in props.get("metrics", []):
            options = row[-1] if row and isinstance(row[-1], dict) else {}
            if "expression" in options:
                expressions.append(options["expression"])
                continue
            names = [c for c in row if isinstance(c, str)]
            if names[:1] == ["..."]:
                names = previous[:2]
            else:
                names = [previous[i] if c == "." and i < len(previous) else c for i, c in enumerate(names)]
            previous = names
            stat = options.get("stat", props.get("stat"))
            uses.append(
                Use(f"dashboard:{props.get('title')}", namespace_of(names[0]), names[1], stat, options.get("id"))
            )
    return uses, expressions


def check(uses: list[Use], expressions: list[str]) -> list[str]:
    problems: list[str] = []
    ours = published()
    for use in uses:
        if use.namespace == OURS:
            if use.metric not in ours:
                problems.append(f"{use.where}: {use.metric} is not published by worker/cloudwatch.py ({sorted(ours)})")
            if use.metric.endswith("Total"):
                # A counter put by N publishers: Sum adds N copies of a running total. Read Maximum, then a rate.
                rated = use.metric_id and any(re.search(rf"\b(RATE|DIFF)\({use.metric_id}\)", e) for e in expressions)
                if use.stat != "Maximum" or not rated:
                    problems.append(f"{use.where}: counter {use.metric} needs stat Maximum and RATE()/DIFF()")
        elif use.metric not in AWS_METRICS.get(use.namespace, set()):
            problems.append(f"{use.where}: {use.namespace} {use.metric} is not a metric we know AWS publishes")
    return problems


def template_uses(templates: dict[str, dict[str, Any]]) -> tuple[list[Use], list[str]]:
    uses = alarm_uses(templates["data"], "data") + alarm_uses(templates["services"], "services")
    body = templates["services"]["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"][0]
    widget_uses, expressions = dashboard_uses(body)
    return uses + widget_uses, expressions


def test_every_named_metric_is_published(templates: dict[str, dict[str, Any]]) -> None:
    assert set(PUBLISHED_METRICS) == published()
    uses, expressions = template_uses(templates)
    assert len(uses) > 30  # the extraction found the dashboard, the alarms and the scaling policy
    assert {u.metric for u in uses if u.namespace == OURS} == published()  # and each of ours is watched
    assert check(uses, expressions) == []


@pytest.mark.parametrize(
    ("broken", "problem"),
    [
        # The review's finding: the dashboard plotted a metric nobody publishes, summed.
        (
            '["${MetricsNamespace}", "EventsWritten", "Environment", "x", {"stat": "Sum", "id": "written"}]',
            "EventsWritten is not published",
        ),
        (
            '["${MetricsNamespace}", "EventsWrittenTotal", "Environment", "x", {"stat": "Sum", "id": "written"}]',
            "needs stat Maximum and RATE",
        ),
        ('["AWS/ElastiCache", "DatabaseMemoryUsage", "CacheClusterId", "x"]', "not a metric we know AWS publishes"),
    ],
)
def test_the_check_sees_a_broken_dashboard(broken: str, problem: str) -> None:
    body = (
        '{"widgets": [{"type": "metric", "properties": {"title": "t", "metrics": ['
        '[{"expression": "RATE(written)", "id": "rate"}], ' + broken + "]}}]}"
    )
    problems = check(*dashboard_uses(body))
    assert any(problem in p for p in problems), problems
