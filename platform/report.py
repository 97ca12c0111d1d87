"""``python -m platform.report``: the best run of every task and sweep, beside the published numbers.

    python -m platform.report                                  # ./mlflow.db -> report/report.md, report/report.png
    python -m platform.report mlflow.tracking_uri=http://127.0.0.1:5000 report.out=results/

Read from the MLflow store alone: one row per sweep (its best trial) and per training run
outside a sweep, with the task's objective, the other validation metrics, the parameters
that made it, the data it saw and a link to the run in the MLflow UI. Under each task's
table, the numbers the DeepLense community published for it (``Task.references``), each
with its data (simulated or real, which images) and protocol, because a number measured on
real Hyper Suprime-Cam images or on another simulation is context, not a score to beat.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field

from platform import cli, cost, masking, registry, runs, tracking
from platform import config as config_lib
from platform import space as space_lib


@dataclass(frozen=True)
class Reference:
    """A number the DeepLense community published for a task (``Task.references``), shown beside the
    best runs, with what it takes to compare it: the data and the protocol."""

    metric: str  # the platform's metric it sits beside (the task's objective, without val/)
    value: float
    definition: str  # what the number is: "macro one-vs-rest ROC AUC", "PSNR (dB)"
    model: str
    data: str  # simulated (which model / preset, image size) or real (which survey); how many images
    protocol: str  # the split it was measured on, and anything else that differs from this platform's
    source: str  # author, project or paper, year
    url: str


def references(task_name: str) -> list[Reference]:
    """What was published for the task, over all its registrations (one per head, say)."""
    return [ref for task in registry.all_registrations(task_name) for ref in task.references]


@dataclass
class StoreSettings:
    tracking_uri: str = ""  # default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db, as for train and tune
    experiment: str = ""  # one experiment; default: every experiment that holds platform runs


@dataclass
class OutputSettings:
    out: str = "report"  # the folder report.md and report.png are written to
    ui_url: str = ""  # the MLflow UI that run links point at; default: the tracking URI if http(s), else 127.0.0.1:5000


@dataclass
class ReportConfig:
    mlflow: StoreSettings = field(default_factory=StoreSettings)
    report: OutputSettings = field(default_factory=OutputSettings)


@dataclass
class Row:
    """The best run of one sweep (or one run outside a sweep) of one task."""

    task: str
    group: str  # the sweep's name, or the run's
    kind: str  # "sweep", "train", "comparison"
    runs: int  # runs in the group (a sweep's trials that finished)
    run_id: str
    experiment_id: str
    objective: str  # e.g. "auc_macro"
    mode: str
    value: float  # the best epoch's val/<objective>: what the sweep chose by
    test: float  # test/<objective> of those weights, scored once (NaN: a run from before test splits)
    metrics: dict  # the run's other val/* metrics (last epoch)
    params: dict  # what was searched (a sweep) or the main training settings
    data: str
    cost: str = ""  # what a sweep spent (its parent run's cost/ metrics), "" where not recorded


SHOWN_SETTINGS = ("train.epochs", "train.lr", "train.batch_size", "init_from")


def data_of(params: dict) -> str:
    """The data a run saw, in words: simulated (which preset) or a folder of real images."""
    num_test = params.get("data.num_test") if params.get("data.num_test") not in (None, "", "None") else None
    test = f" / {num_test or params.get('data.num_val', '?')} test" if "data.num_test" in params else ""
    sizes = f"{params.get('data.num_train', '?')} train / {params.get('data.num_val', '?')} val{test} images"
    if params.get("data.path") not in (None, "", "None"):
        return f"folder {params['data.path']}"
    return f"simulated ({params.get('data.preset', '?')}), {sizes}"


def collect(client, experiment_ids: list[str]) -> tuple[list[Row], list[str]]:
    """Rows, best first within each task; and notes on what was left out."""
    finished = runs.finished_runs(client, experiment_ids)
    by_id = {r.info.run_id: r for r in finished}
    groups: dict[tuple[str, str, str], list] = {}
    for run in finished:
        tags = run.data.tags
        if tracking.TASK_TAG not in tags or tracking.KIND_TAG in tags or runs.objective_of(run) is None:
            continue  # a sweep's parent (it holds its best trial's metrics), a comparison's, or no platform run
        if tracking.SWEEP_TAG in tags:
            key = (tags[tracking.TASK_TAG], tags[tracking.SWEEP_TAG], "sweep")
        elif tracking.PARENT_TAG in tags and tags[tracking.PARENT_TAG] in by_id:
            key = (tags[tracking.TASK_TAG], by_id[tags[tracking.PARENT_TAG]].info.run_name, "comparison")
        else:
            key = (tags[tracking.TASK_TAG], run.info.run_name, "train")
        groups.setdefault(key, []).append(run)
    parents = {r.data.tags.get(tracking.SWEEP_TAG): r for r in finished if r.data.tags.get(tracking.KIND_TAG) == "sweep"}
    rows, notes = [], []
    for (task_name, group, kind), members in groups.items():
        try:
            mode = registry.get(task_name).mode
        except registry.UnknownTaskError:
            notes.append(f"{group}: task {task_name} is not installed here; its runs are left out")
            continue
        objective = runs.objective_of(members[0])
        scored = [r for r in members if math.isfinite(r.data.metrics.get(f"best/{objective}", math.nan))]
        if not scored:
            continue
        best = (max if mode == "max" else min)(scored, key=lambda r: r.data.metrics[f"best/{objective}"])
        params = best.data.params
        if kind == "sweep" and group in parents:
            space = runs.recorded_space(parents[group])
            shown = {k: params[k] for k in space_lib.sampled_params(space, params)}
        else:
            shown = {k: params[k] for k in SHOWN_SETTINGS if params.get(k) not in (None, "")}
        rows.append(Row(task=task_name, group=group, kind=kind, runs=len(members), run_id=best.info.run_id,
                        experiment_id=best.info.experiment_id, objective=objective, mode=mode,
                        value=best.data.metrics[f"best/{objective}"],
                        test=best.data.metrics.get(f"test/{objective}", math.nan),
                        metrics={k: v for k, v in sorted(best.data.metrics.items())
                                 if k.startswith("val/") and k != f"val/{objective}"},
                        params=shown, data=data_of(params),
                        cost=spent(parents[group]) if kind == "sweep" and group in parents else ""))
    rows.sort(key=lambda r: (r.task, r.objective, -r.value if r.mode == "max" else r.value))
    return rows, notes


def spent(parent) -> str:
    """A sweep's cost in a cell: "$1.23 (2.5 GPU-h; 2.5 node-h)", from its parent run's cost metrics."""
    metrics = parent.data.metrics
    node_hours = sum(v for k, v in metrics.items() if k.startswith(cost.NODE_HOURS))
    if not any(k.startswith(cost.NODE_HOURS) for k in metrics):
        return ""
    hours = f"{metrics.get(cost.GPU_HOURS, 0):.3g} GPU-h; {node_hours:.3g} node-h"
    return f"${metrics[cost.DOLLARS]:.2f} ({hours})" if cost.DOLLARS in metrics else hours


def sections(rows: list[Row]) -> list[tuple[str, str, list[Row]]]:
    """(task, objective, its rows): one table per metric, since a setting may choose it (mae_finetune's head)."""
    keys = sorted({(r.task, r.objective) for r in rows})
    return [(task, objective, [r for r in rows if (r.task, r.objective) == (task, objective)]) for task, objective in keys]


def _number(value) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{value:.4g}"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[Row], ui_url: str, store: str, notes: list[str]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# DeepLense platform report", "",
        f"From the MLflow store `{masking.redact(store)}`, {now}. One row per sweep (its best trial) and per "
        "training run outside a sweep, chosen by its validation score; the headline is its test score: the test "
        "split, which no search or choice saw, scored once with that run's best weights.", "",
        "The published numbers under each table were measured on other data, often with another protocol or "
        "metric definition, and some on real telescope images: read them as context, and compare only where the "
        "data and protocol match.", "",
    ]
    for task_name, objective, mine in sections(rows):
        task = registry.get(task_name)
        better = "higher" if task.mode == "max" else "lower"
        lines += [f"## {task_name}: {objective} ({better} is better)", "",
                  f"| sweep / run | kind | test/{objective} | best val/{objective} | other val metrics (last epoch) "
                  "| parameters | data | cost | MLflow run |", "|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            kind = f"sweep, {r.runs} trials" if r.kind == "sweep" else r.kind
            others = ", ".join(f"{k[4:]} {_number(v)}" for k, v in list(r.metrics.items())[:4])
            params = ", ".join(f"{k}={_number(v)}" for k, v in r.params.items())
            link = tracking.ui_link(ui_url, r.experiment_id, r.run_id)
            test = f"**{_number(r.test)}**" if math.isfinite(r.test) else "not scored"
            lines.append(f"| {_cell(r.group)} | {kind} | {test} | {_number(r.value)} | {_cell(others)} "
                         f"| {_cell(params)} | {_cell(r.data)} | {_cell(r.cost or '-')} | [{r.run_id[:8]}]({link}) |")
        lines.append("")
        published = references(task_name)
        published = [ref for ref in published if ref.metric == objective] or published
        if published:
            lines += ["Published for this task:", "",
                      "| value | what it is | model | data | protocol | source |", "|---|---|---|---|---|---|"]
            for ref in published:
                lines.append(f"| {_number(ref.value)} | {_cell(ref.definition)} | {_cell(ref.model)} | {_cell(ref.data)} "
                             f"| {_cell(ref.protocol)} | [{_cell(ref.source)}]({ref.url}) |")
        else:
            lines.append("No published number for this task's metric was found to set beside it.")
        lines.append("")
    if not rows:
        lines += ["No finished platform runs in this store yet: run `python -m platform.tune task=classification`.", ""]
    for note in notes:
        lines.append(f"- note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def figure(rows: list[Row]):
    """One panel per task: each sweep's or run's test value (bars) and best val (ticks), published values
    of the same metric as lines."""
    from platform.plots import pyplot

    panels = sections(rows)
    fig, axes = pyplot().subplots(len(panels), 1, figsize=(8, 0.6 + 1.9 * max(1, len(panels))), squeeze=False)
    for ax, (task_name, objective, mine) in zip(axes[:, 0], panels):
        mine = mine[::-1]  # best at the top
        ax.barh([r.group for r in mine], [r.test for r in mine], color="tab:blue",  # NaN: not scored, no bar
                label="test (headline)")
        ax.plot([r.value for r in mine], range(len(mine)), "k|", markersize=12, label="best val")
        for k, ref in enumerate(r for r in references(task_name) if r.metric == objective):
            ax.axvline(ref.value, color=f"C{k + 1}", ls="--", lw=1,
                       label=f"{ref.value:.4g}: {ref.model[:40]} ({ref.data[:38]}...)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="lower right")
        ax.set_title(f"{task_name}: {objective} ({'higher' if mine[0].mode == 'max' else 'lower'} is better)",
                     fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def main(argv: list[str]) -> int:
    overrides = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    if len(overrides) != len(argv):
        raise config_lib.ConfigError(f"expected key=value arguments, e.g. mlflow.tracking_uri=sqlite:///mlflow.db "
                                     f"report.out=report; got {' '.join(argv)}")
    cfg = config_lib.build_from(ReportConfig, [{k: config_lib.load_yaml(v) if v else "" for k, v in overrides.items()}])
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    if not tracking.store_exists(uri):
        raise config_lib.ConfigError(f"mlflow.tracking_uri={uri}: no MLflow store there; point it at the store your "
                                     f"runs wrote to")
    client = tracking.MlflowClient(uri)
    if cfg.mlflow.experiment:
        experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
        if experiment is None:
            known = ", ".join(e.name for e in client.search_experiments())
            raise config_lib.ConfigError(f"mlflow.experiment={cfg.mlflow.experiment}: no such experiment in {uri}; "
                                         f"it has {known}")
        experiment_ids = [experiment.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    ui_url = cfg.report.ui_url or tracking.ui_base(uri) or "http://127.0.0.1:5000"
    rows, notes = collect(client, experiment_ids)
    os.makedirs(cfg.report.out, exist_ok=True)
    path = os.path.join(cfg.report.out, "report.md")
    with open(path, "w") as f:
        f.write(markdown(rows, ui_url, uri, notes))
    print(f"{path}: {len(rows)} rows over {len({r.task for r in rows})} tasks")
    if rows:
        png = os.path.join(cfg.report.out, "report.png")
        figure(rows).savefig(png, dpi=120)
        print(png)
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
