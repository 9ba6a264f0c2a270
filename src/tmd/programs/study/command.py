"""``tmd study``: train what is missing, then write the report; ``--dry-run`` lists, ``--report`` only reports."""

from __future__ import annotations

import shlex
from pathlib import Path

from tmd.programs.study.datasets import estimate_s, make_datasets
from tmd.programs.study.execute import task_payload
from tmd.programs.study.plan import Dataset, Run, Task, datasets_to_make, estimator, plan, read_records, select, tasks
from tmd.programs.study.report import write_report
from tmd.programs.study.schedule import Progress, minutes, run_tasks
from tmd.programs.study.spec import TEACHER, load_study


def dry_run(runs: list[Run], todo: list[Task], datasets: list[Dataset], records: Path, jobs: int) -> None:
    for dataset in datasets:
        print(f"{dataset.key}  pending  dataset {dataset.name:<20} ~{minutes(estimate_s(dataset, jobs))}")
    kinds = {t.run.key: t for t in todo}
    for run in runs:
        task = kinds.get(run.key)
        status = "done" if task is None else {"train": "pending", TEACHER: "pending", "weights": "weights"}[task.kind]
        estimate = "" if task is None else f"  ~{minutes(task.estimate_s)}"
        print(f"{run.key}  {status:<7}  {run.name:<28} seed {'-' if run.seed is None else run.seed}{estimate}")
    keys = {r.key for r in runs}
    recorded = len(keys) - sum(t.kind != "weights" for t in todo)
    print(
        f"{recorded} of {len(keys)} runs recorded in {records}; {len(todo)} tasks to run ('weights': a recorded "
        f"stage 1 retrained here for its weights), about {minutes(sum(t.estimate_s for t in todo) / jobs)} "
        f"with --jobs {jobs}" + (f", after {len(datasets)} dataset(s) to synthesize" if datasets else "")
    )


def main(args) -> int:
    """``tmd study`` (``tmd.programs.cli``): train what is missing, then write the report; ``--report`` only reports."""
    study, path = load_study(args.config)
    records, work = Path(args.records), Path(args.work)
    everything = plan(study, str(path))
    report = lambda: write_report(study, path, everything, records, readme=args.readme)  # noqa: E731
    if args.report:
        print(f"report written to {report()}")
        return 0
    runs = select(everything, args.only, study, args.seeds)
    todo = tasks(runs, records, work, estimator(study, read_records(records, [r.key for r in everything])))
    datasets = datasets_to_make(todo, work)
    if args.dry_run:
        dry_run(runs, todo, datasets, records, args.jobs)
        return 0
    if not make_datasets(datasets, work, args.jobs, args.threads or 1):
        return 1
    command = shlex.join(["tmd", *args.argv])
    payloads = {t.run.key: task_payload(t, study, records, work, command) for t in todo}
    failed = run_tasks(todo, payloads, work, args.jobs, args.threads or 1, Progress(todo, args.jobs))
    print(f"report written to {report()}" + (f"; {len(failed)} tasks failed (logs in {work})" if failed else ""))
    return 1 if failed else 0
