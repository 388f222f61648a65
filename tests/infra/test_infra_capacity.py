"""The capacity figures of docs/deploy.md against the templates' limits.

docs/deploy.md holds two machine-read tables: the per-task costs (from `make bench`) and the capacity rows.
This test recomputes every row from the costs with the formulas the document states, and checks that the
templates can deploy it: ApiMaxTasks x per-task rate covers each row, the tasks fit the instance types,
AppMaxInstances suffices (for the rows and for every service at its maximum), the request-count target
matches the per-task rate, and the pre-warming floors cover the spike row. Where build/bench/summary.json
exists (a developer ran `make bench`), the figures the document quotes are cross-checked against it.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import pytest

from tests.infra.conftest import ROOT

DOC = ROOT / "docs" / "deploy.md"
SUMMARY = ROOT / "build" / "bench" / "summary.json"
#: vCPUs and memory (MiB) of the instance types the rows name (AWS's published sizes).
INSTANCE_TYPES = {
    "c6i.xlarge": (4, 8192),
    "c6i.2xlarge": (8, 16384),
    "c6i.4xlarge": (16, 32768),
    "r6i.xlarge": (4, 32768),
    "r6i.2xlarge": (8, 65536),
    "r6i.4xlarge": (16, 131072),
}
#: Share of an instance's memory the ECS agent registers (the OS and the agent keep the rest); an estimate.
REGISTERED_MEMORY = 0.94
CASSANDRA_SLOTS = 3


def table(marker: str, text: str) -> list[list[str]]:
    """The rows (cells, stripped) of the Markdown table following ``<!-- marker -->``."""
    after = text.split(f"<!-- {marker} -->", 1)[1].lstrip("\n")
    rows = []
    for line in after.splitlines():
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[2:]  # header and separator


def number(cell: str) -> float:
    found = re.search(r"-?[\d,]*\.?\d+", cell)
    assert found, cell
    return float(found.group().replace(",", ""))


@dataclass(frozen=True)
class Row:
    load: str
    events_per_s: float
    requests_per_s: float
    api_tasks: int
    worker_tasks: int
    app_instances: int
    app_type: str
    cassandra_nodes: int
    cassandra_type: str
    deployable: bool

    @property
    def batched(self) -> bool:
        return self.events_per_s > self.requests_per_s


def doc_inputs(text: str) -> dict[str, float]:
    return {re.sub(r"`", "", cells[1]): number(cells[2]) for cells in table("capacity-inputs", text)}


def doc_rows(text: str) -> list[Row]:
    rows = []
    for cells in table("capacity-rows", text):
        rows.append(
            Row(
                load=cells[0],
                events_per_s=number(cells[1]),
                requests_per_s=number(cells[2]),
                api_tasks=int(number(cells[3])),
                worker_tasks=int(number(cells[4])),
                app_instances=int(number(cells[5])),
                app_type=cells[6].strip("`"),
                cassandra_nodes=int(number(cells[7])),
                cassandra_type=cells[8].strip("`"),
                deployable="beyond these templates" not in cells[-1],
            )
        )
    return rows


def default(template: dict[str, Any], parameter: str) -> Any:
    return template["Parameters"][parameter]["Default"]


@dataclass(frozen=True)
class Plan:
    api: int
    workers: int
    instances: int
    cassandra_vcpu: float


def plan(row: Row, k: dict[str, float], reserved_mib: float, daemon: tuple[int, int] = (0, 0)) -> Plan:
    """A row from the per-task costs, with the formulas of docs/deploy.md (the baseline workers, a DAEMON, take
    their room on every instance first; their draining is not counted, so the worker tasks are an upper bound)."""
    floor = int(k["min_tasks_per_zone"] * k["zones"])
    if row.batched:
        api_rate = 1000 / k["api_ms_per_batched_event"]  # events/s per task
        worker_rate = 1000 / k["worker_ms_per_event_batched"]
    else:
        api_rate = 1000 / k["api_ms_per_request"]  # requests/s per task (one event each)
        worker_rate = 1000 / k["worker_ms_per_event_single"]
    api = max(floor, math.ceil(row.events_per_s / api_rate * k["headroom"]))
    workers = max(floor, math.ceil(row.events_per_s / worker_rate * k["headroom"]))
    per_instance = tasks_per_instance(row.app_type, k, reserved_mib, daemon)
    instances = max(int(k["zones"]), math.ceil((api + workers) / per_instance / k["target_capacity"]))
    cassandra = row.events_per_s * k["cassandra_ms_per_event"] / 1000 * 3 * k["compaction_factor"]
    return Plan(api, workers, instances, cassandra)


def tasks_per_instance(
    instance_type: str, k: dict[str, float], reserved_mib: float, daemon: tuple[int, int] = (0, 0)
) -> int:
    vcpu, memory = INSTANCE_TYPES[instance_type]
    cpu_units = vcpu * 1024 - daemon[0]
    memory_mib = memory * REGISTERED_MEMORY - reserved_mib - daemon[1]
    return int(min(cpu_units // k["task_cpu_units"], memory_mib // k["task_memory_mib"]))


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def reserved_memory(cluster: dict[str, Any]) -> float:
    boot = cluster["Resources"]["AppLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"][
        "Fn::Sub"
    ]
    return number(re.search(r"ECS_RESERVED_MEMORY=(\d+)", boot).group(1))  # type: ignore[union-attr]


def daemon_reservation(services: dict[str, Any]) -> tuple[int, int]:
    """CPU units and MiB that DAEMON services reserve on every app instance (the baseline worker)."""
    cpu = memory = 0
    resources = services["Resources"]
    for res in resources.values():
        if res["Type"] == "AWS::ECS::Service" and res["Properties"].get("SchedulingStrategy") == "DAEMON":
            task = resources[res["Properties"]["TaskDefinition"]["Ref"]]["Properties"]
            for container in task["ContainerDefinitions"]:
                cpu += (
                    int(container.get("Cpu", 0))
                    if not isinstance(container.get("Cpu"), dict)
                    else int(default(services, container["Cpu"]["Ref"]))
                )
                mem = container.get("Memory", 0)
                memory += int(default(services, mem["Ref"]) if isinstance(mem, dict) else mem)
    return cpu, memory


def test_rows_follow_from_the_costs_and_fit_the_templates(doc: str, templates: dict[str, Any]) -> None:
    k = doc_inputs(doc)
    rows = doc_rows(doc)
    assert len(rows) >= 4
    services, cluster = templates["services"], templates["cluster"]
    reserved = reserved_memory(cluster)
    daemon = daemon_reservation(services)
    api_max, worker_max = default(services, "ApiMaxTasks"), default(services, "WorkerMaxTasks")
    app_max = default(cluster, "AppMaxInstances")
    for row in rows:
        expected = plan(row, k, reserved, daemon)
        assert (row.api_tasks, row.worker_tasks, row.app_instances) == (
            expected.api,
            expected.workers,
            expected.instances,
        ), row.load
        # The Cassandra nodes carry the row (RF 3, compaction headroom) and come in multiples of the zones.
        assert row.cassandra_nodes * INSTANCE_TYPES[row.cassandra_type][0] >= expected.cassandra_vcpu, row.load
        assert row.cassandra_nodes % int(k["zones"]) == 0, row.load
        if not row.deployable:
            assert row.cassandra_nodes > CASSANDRA_SLOTS, f"{row.load}: marked beyond the templates for no reason"
            continue
        assert row.cassandra_nodes <= CASSANDRA_SLOTS, row.load
        # The scaling ceilings cover the row: max tasks x per-task rate >= the row's rate (with headroom).
        assert row.api_tasks <= api_max, f"{row.load}: ApiMaxTasks {api_max} < {row.api_tasks}"
        assert row.worker_tasks <= worker_max, f"{row.load}: WorkerMaxTasks {worker_max} < {row.worker_tasks}"
        assert row.app_instances <= app_max, f"{row.load}: AppMaxInstances {app_max} < {row.app_instances}"
        # Beside the daemon, the row's instance type still takes one task per vCPU: the daemon strands nothing.
        vcpu = INSTANCE_TYPES[row.app_type][0]
        assert tasks_per_instance(row.app_type, k, reserved, daemon) == vcpu, f"{row.load}: {daemon} strands a task"


def test_every_service_at_its_maximum_fits_the_app_group(doc: str, templates: dict[str, Any]) -> None:
    k = doc_inputs(doc)
    services, cluster = templates["services"], templates["cluster"]
    instance_type = default(cluster, "AppInstanceType")
    daemon = daemon_reservation(services)
    assert daemon != (0, 0), "no DAEMON reservation: the baseline worker is gone (test_infra_templates)"
    per_instance = tasks_per_instance(instance_type, k, reserved_memory(cluster), daemon)
    # Nothing stranded: one task per vCPU beside the daemon (the task size leaves the daemon its room).
    assert per_instance == INSTANCE_TYPES[instance_type][0], f"{daemon} leaves room for {per_instance} tasks"
    assert default(services, "ApiCpu") == default(services, "WorkerCpu") == k["task_cpu_units"]
    assert default(services, "ApiMemoryMiB") == default(services, "WorkerMemoryMiB") == k["task_memory_mib"]
    publishers = 1  # the two small queue-metrics tasks fit in one task's room
    most = default(services, "ApiMaxTasks") + default(services, "WorkerMaxTasks") + publishers
    needed = math.ceil(most / per_instance / k["target_capacity"])
    assert needed <= default(cluster, "AppMaxInstances"), f"{most} tasks need {needed} x {instance_type}"


def test_scaling_targets_and_floors_match_the_document(doc: str, templates: dict[str, Any]) -> None:
    k = doc_inputs(doc)
    services, cluster = templates["services"], templates["cluster"]
    per_task_rps = 1000 / k["api_ms_per_request"]
    target = per_task_rps * 60 / k["headroom"]
    assert 0.8 * target <= default(services, "ApiRequestsPerTargetPerMinute") <= target
    floor = int(k["min_tasks_per_zone"] * k["zones"])
    assert default(services, "ApiMinTasks") == default(services, "WorkerMinTasks") == floor
    assert default(cluster, "AppMinInstances") == k["zones"]
    # Pre-warming for the spike covers the 10,000 req/s single-event row.
    spike = next(r for r in doc_rows(doc) if r.requests_per_s == 10_000 and not r.batched)
    assert default(services, "ApiPeakMinTasks") >= spike.api_tasks
    assert default(services, "WorkerPeakMinTasks") >= spike.worker_tasks


def test_quoted_bench_figures_match_the_latest_bench_where_there_is_one(doc: str) -> None:
    k = doc_inputs(doc)
    if not SUMMARY.exists():
        # CI has no bench run; the document's own figures are what the other tests check.
        assert {"single_rps", "batch_events_per_s", "drain_events_per_s", "api_rss_mb"} <= set(k)
        return
    summary = json.loads(SUMMARY.read_text())
    for key in ("single_rps", "batch_events_per_s", "drain_events_per_s", "api_rss_mb"):
        measured = float(summary.get(key) or 0)
        # The bench's machine is shared and noisy (2-3x between runs, docs/performance.md): beyond 3x the
        # document's table is stale and needs recomputing from the new run.
        assert measured / 3 <= k[key] <= measured * 3, f"{key}: docs say {k[key]}, {SUMMARY} says {measured}"
    assert k["api_rss_mb"] * 2 <= k["task_memory_mib"], "an API task's memory must hold its process twice over"


def test_the_check_sees_a_ceiling_below_a_row(doc: str, templates: dict[str, Any]) -> None:
    broken = copy.deepcopy(templates)
    broken["services"]["Parameters"]["ApiMaxTasks"]["Default"] = 20  # the 10,000 req/s row needs 32
    with pytest.raises(AssertionError, match="ApiMaxTasks 20 < 32"):
        test_rows_follow_from_the_costs_and_fit_the_templates(doc, broken)
    broken = copy.deepcopy(templates)
    broken["cluster"]["Parameters"]["AppMaxInstances"]["Default"] = 30  # 121 tasks at their maximum need 34
    with pytest.raises(AssertionError, match="need 34"):
        test_every_service_at_its_maximum_fits_the_app_group(doc, broken)
    # A baseline worker of 512 units leaves room for 3 tasks on a c6i.xlarge (3,584 units), not 4: a task's room
    # stranded on every instance.
    broken = copy.deepcopy(templates)
    baseline = broken["services"]["Resources"]["WorkerBaselineTaskDefinition"]["Properties"]
    baseline["ContainerDefinitions"][0]["Cpu"] = 512
    with pytest.raises(AssertionError, match="leaves room for 3 tasks"):
        test_every_service_at_its_maximum_fits_the_app_group(doc, broken)
    with pytest.raises(AssertionError, match=r"1,000 req/s single: .* strands a task"):
        test_rows_follow_from_the_costs_and_fit_the_templates(doc, broken)
