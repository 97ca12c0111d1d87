"""What a run and a sweep spent: node-seconds by node type, GPU-seconds, and at known prices, dollars.

Each run's rank 0 counts the node time its workers hold (``Meter``): a worker holding 1 GPU of a
1-GPU node for an hour holds one node-hour; one holding 1 of a node's 8 CPUs, an eighth. The share
is the larger of its CPU and GPU shares, as a node held by a worker is not free for another trial.
A run logs the running totals each epoch (``cost/node_seconds/<type>``, ``cost/gpu_seconds``);
an attempt after a lost node adds to what the earlier attempts logged. At the end of a sweep its
parent run gets the sums over its trials (``sweep_totals``): node-hours by type, GPU-hours, and
an estimate in dollars where every type has a price.

Not counted: a Ray Train trial's driver (on the head, holding no CPU or GPU; the head runs whether
or not a sweep does) and the time a worker node sits idle before the autoscaler removes it
(``idle_timeout_minutes`` of cluster.yaml). Workers that train on the head count as type "head".
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field

NODE_SECONDS = "cost/node_seconds/"  # + node type: a run's node-seconds on nodes of that type
GPU_SECONDS = "cost/gpu_seconds"
NODE_HOURS = "cost/node_hours/"  # + node type: a sweep's sums, on its parent run
GPU_HOURS = "cost/gpu_hours"
DOLLARS = "cost/usd"  # a sweep's estimated cost, where every node type it used has a price
NODE_TYPES_TAG = "platform.node_types"  # the node types a run trained on

# Prices per node-hour (USD) of the instance types cluster.yaml names, AWS us-west-2, by market:
# on-demand list prices, and spot prices as they typically were in 2026 (spot moves with demand:
# give yours with cost.hourly.<node type>=...). A node type is priced by its name in cost.hourly
# first, else by its instance type and market from the autoscaler's config.
LIST_PRICES = {
    ("m6i.2xlarge", "on-demand"): 0.384, ("m6i.2xlarge", "spot"): 0.17,
    ("g5.2xlarge", "on-demand"): 1.212, ("g5.2xlarge", "spot"): 0.48,
    ("g5.12xlarge", "on-demand"): 5.672, ("g5.12xlarge", "spot"): 2.27,
}
# What those instances hold, for a cluster file whose node types leave `resources` to the provider.
INSTANCE_RESOURCES = {
    "m6i.2xlarge": {"CPU": 8},
    "g5.2xlarge": {"CPU": 8, "GPU": 1},
    "g5.12xlarge": {"CPU": 48, "GPU": 4},
}


def metric_name(node_type: str) -> str:
    """A node type as MLflow takes it in a metric name."""
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", node_type) or "unnamed"


# --- on a worker --------------------------------------------------------------------------------

def where_this_runs(cpus: float, gpus: float) -> tuple[str, float]:
    """(node type, the share of the node ``cpus`` and ``gpus`` hold) for this process's node; the share
    is the larger of the two."""
    import ray
    import ray._raylet

    if not ray.is_initialized():  # a run in the command's own process without Ray (runner.without_ray)
        return "head", 1.0
    node_id = ray.get_runtime_context().get_node_id()
    me = next((n for n in ray.nodes() if n["NodeID"] == node_id), {"NodeID": node_id})
    # The autoscaler's providers name a worker's type in its environment (not always as a label).
    node_type = os.environ.get(ray._raylet.NODE_TYPE_NAME_ENV) or node_type_of(me)
    total = me.get("Resources") or {}
    shares = [cpus / total["CPU"]] if total.get("CPU") else []
    shares += [gpus / total["GPU"]] if gpus and total.get("GPU") else []
    return node_type, min(1.0, max(shares, default=1.0))


def node_type_of(node: dict, mapping: dict | None = None) -> str:
    """The autoscaler's node type of a node (an entry of ``ray.nodes()``); "head" or "worker" where none
    says. ``mapping``: ``node_type_mapping()``, read once by a caller that asks about many nodes."""
    import ray._raylet

    labels = node.get("Labels") or {}
    if labels.get(ray._raylet.RAY_NODE_GROUP_KEY):  # KubeRay's and autoscaler v2's nodes
        return labels[ray._raylet.RAY_NODE_GROUP_KEY]
    # Without an autoscaler (a laptop, a fixed cluster) its monitor names each node "node_<id>": no type.
    mapping = node_type_mapping() if mapping is None else mapping
    for key in (node.get("NodeManagerAddress"), node.get("NodeID")):
        if key in mapping and mapping[key] != f"node_{node.get('NodeID')}":
            return mapping[key]
    return "head" if "node:__internal_head__" in (node.get("Resources") or {}) else "worker"


def node_type_mapping() -> dict:
    """{node address: node type}: how Ray's own autoscaler (``ray up``) names its nodes' types, in the
    status it publishes (what `ray status` prints); {} without one."""
    import json

    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return {}
    raw = _internal_kv_get("__autoscaling_status")  # ray_constants.DEBUG_AUTOSCALING_STATUS
    try:
        status = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return status.get("autoscaler_report", {}).get("node_type_mapping") or {}


@dataclass
class Meter:
    """Rank 0's count of the node time a run's workers hold, since ``since``, on top of ``before``."""

    shares: dict[str, float]  # node type -> the workers' summed shares of nodes of that type
    gpus: float  # GPUs the workers hold
    since: float = field(default_factory=time.time)
    before: dict[str, float] = field(default_factory=dict)  # what earlier attempts of the run logged

    def metrics(self) -> dict[str, float]:
        seconds = max(0.0, time.time() - self.since)
        totals = dict(self.before)
        for node_type, share in self.shares.items():
            key = NODE_SECONDS + metric_name(node_type)
            totals[key] = totals.get(key, 0.0) + share * seconds
        totals[GPU_SECONDS] = totals.get(GPU_SECONDS, 0.0) + self.gpus * seconds
        return totals


def meter(placements: list[tuple[str, float, float]], logged: dict[str, float], started_at: float | None) -> Meter:
    """A run's meter from each worker's (node type, share of its node, GPUs), going on from the
    cost metrics the run ``logged`` before (an earlier attempt's).

    A first attempt counts from ``started_at``, when its driver asked for the workers (their nodes,
    launched for them, bill from then); a later one from now: the time between a lost attempt's
    last epoch and its restart goes uncounted."""
    shares: dict[str, float] = {}
    for node_type, share, _ in placements:
        shares[node_type] = shares.get(node_type, 0.0) + share
    before = {k: v for k, v in logged.items() if k.startswith(NODE_SECONDS) or k == GPU_SECONDS}
    since = started_at if started_at and not before else time.time()
    return Meter(shares=shares, gpus=sum(g for _, _, g in placements), since=since, before=before)


# --- a sweep's totals ---------------------------------------------------------------------------

def price(node_type: str, hourly: dict[str, float], node_types: dict | None) -> float | None:
    """USD per node-hour of ``node_type``: cost.hourly's, else the list price of its instance and market."""
    if node_type in hourly:
        return float(hourly[node_type])
    spec = (node_types or {}).get(node_type)
    if spec is None or not spec.instance:
        return None
    return LIST_PRICES.get((spec.instance, "spot" if spec.spot else "on-demand"))


def sweep_totals(trial_metrics: list[dict[str, float]], hourly: dict[str, float],
                 node_types: dict | None = None) -> dict[str, float]:
    """The parent run's cost metrics from its trial runs' last metrics."""
    seconds: dict[str, float] = {}
    for metrics in trial_metrics:
        for key, value in metrics.items():
            if key.startswith(NODE_SECONDS) and math.isfinite(value):
                node_type = key[len(NODE_SECONDS):]
                seconds[node_type] = seconds.get(node_type, 0.0) + value
    totals = {NODE_HOURS + t: s / 3600 for t, s in sorted(seconds.items())}
    totals[GPU_HOURS] = sum(m.get(GPU_SECONDS, 0.0) for m in trial_metrics) / 3600
    prices = {t: price(t, hourly, node_types) for t in seconds}
    if seconds and all(p is not None for p in prices.values()):
        totals[DOLLARS] = sum(seconds[t] / 3600 * prices[t] for t in seconds)
    return totals


def describe(totals: dict[str, float]) -> str:
    """One line: "0.42 GPU-hours; node-hours: gpu_spot 0.42; about $0.20"."""
    hours = ", ".join(f"{k[len(NODE_HOURS):]} {v:.3g}" for k, v in totals.items() if k.startswith(NODE_HOURS))
    text = f"{totals.get(GPU_HOURS, 0.0):.3g} GPU-hours; node-hours: {hours or 'none'}"
    if DOLLARS in totals:
        text += f"; about ${totals[DOLLARS]:.2f} (cost.hourly prices)"
    else:
        text += "; no estimate in dollars (set cost.hourly.<node type> for every type)"
    return text
