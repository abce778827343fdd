"""The study driver: one Ray Tune experiment per grid (or per size for an hparams study), then the
points table, the scaling-law fit and plots, logged to the study's MLflow run."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from orchestration.launch.checkpoint_store import delete_tree
from orchestration.studies.points import best_hparams, points_from_rows
from orchestration.studies.scaling_report import analyze, format_report
from orchestration.studies.spec import StudySpec, grid_size, param_space
from orchestration.studies.table import write_points
from orchestration.studies.trial import run_trial
from pipeline.storage import url_join

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyResult:
    """What a finished study produced."""

    table: pa.Table
    table_path: Path
    files: dict[str, Path]
    summary: dict[str, Any]
    study_run_id: str | None
    errored_trials: list[str]
    complete: bool  # False when the sweep was interrupted (resume with --resume)


def _tuner(spec: StudySpec, study_run_id: str | None, resume: bool, name: str, variant: str | None) -> Any:
    from ray import tune

    trainable = tune.with_resources(run_trial, {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial})
    path = url_join(spec.storage_path, name)
    if tune.Tuner.can_restore(path):
        if not resume:
            raise FileExistsError(
                f"study {spec.name!r} already exists at {path}; pass --resume to continue it "
                "(finished trials are kept) or choose another --name"
            )
        log.info("restoring study %s from %s", spec.name, path)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=param_space(spec, study_run_id, variant))
    scheduler, num_samples = None, 1
    if spec.study == "hparams":
        from ray.tune.schedulers import ASHAScheduler

        steps = max(spec.steps)
        first_eval = max(1, steps // spec.evals_per_trial)
        scheduler = ASHAScheduler(time_attr="step", max_t=steps, grace_period=first_eval, reduction_factor=2)
        num_samples = spec.num_samples
    return tune.Tuner(
        trainable,
        param_space=param_space(spec, study_run_id, variant),
        # reuse_actors: a worker process runs trial after trial, so torch / DeepSpeed are imported
        # once per worker, not once per trial (each trial still builds its own model and engine).
        tune_config=tune.TuneConfig(metric="eval_loss", mode="min", scheduler=scheduler, num_samples=num_samples,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=spec.storage_path,
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures)),
    )


def _export_project_path() -> None:
    """Put the project root on PYTHONPATH so the workers of a local Ray instance started by this
    driver import it too (a cluster gets the code from ``ray job submit --working-dir .``)."""
    root = str(Path(__file__).resolve().parents[2])
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


def check_existing_study(spec: StudySpec, resume: bool) -> None:
    """A study already on storage needs --resume (FileExistsError), and --resume needs the settings it
    started with (ValueError). Reads Tune's saved state and ``study.json``; starts nothing."""
    from ray import tune

    existing = [n for n, _ in spec.experiments() if tune.Tuner.can_restore(url_join(spec.storage_path, n))]
    if existing and not resume:
        raise FileExistsError(
            f"study {spec.name!r} already exists at {url_join(spec.storage_path, existing[0])}; pass --resume "
            "to continue it (finished trials are kept) or choose another --name"
        )
    state_file = spec.analysis_dir / "study.json"
    if resume and state_file.exists():
        try:
            saved = json.loads(state_file.read_text())["spec"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{state_file} is not a study state file ({type(e).__name__}: {e})") from None
        _check_same_study(spec, saved)


def _check_same_study(spec: StudySpec, saved: Mapping[str, Any]) -> None:
    """A resumed study must keep the grid and recipe it started with (``StudySpec.grid_hash``)."""
    diff = spec.changed_settings(StudySpec.from_dict(saved))
    if diff:
        raise ValueError(f"study {spec.name!r} was started with different settings ({', '.join(diff)}); "
                         "resume it with the command that started it")


def _study_run(spec: StudySpec, state_file: Path, resume: bool) -> str:
    """The study's MLflow run: reused on resume (id kept in ``study.json``), else created."""
    from orchestration import tracking

    previous = None
    if resume and state_file.exists():
        saved = json.loads(state_file.read_text())
        _check_same_study(spec, saved["spec"])
        previous = saved["study_run_id"]
    run_id, resumed = tracking.resume_or_start_run(
        spec.experiment, run_name=spec.name, existing=previous, uri=spec.tracking_uri or None,
        tags={"vitscale.study": spec.name, "vitscale.kind": spec.study, "vitscale.git_commit": tracking.git_commit()},
    )
    if not resumed:
        params = {**tracking.flatten({"study": spec.to_dict()}), "trials": grid_size(spec)}
        tracking.log_params_once(run_id, params, uri=spec.tracking_uri or None)
    return run_id


def tracked_spec(spec: StudySpec, tracking: bool) -> StudySpec:
    """``spec`` with its tracking URI resolved once, here, so every trial logs to the same store;
    without a password, since Tune writes the spec into every trial's ``params.json`` (and it goes
    into ``study.json``): each process takes the password from its own environment."""
    from orchestration import tracking as tr

    uri = spec.tracking_uri or (tr.tracking_uri() if tracking else "")
    return dataclasses.replace(spec, tracking_uri=tr.public_uri(uri) if uri else "")


def run_study(spec: StudySpec, *, resume: bool = False, ray_address: str | None = None,
              tracking: bool = True) -> StudyResult:
    """Run (or resume) the study on Ray Tune, then write and log its table, fit and plots."""
    from orchestration.launch import cluster

    check_existing_study(spec, resume)
    spec = tracked_spec(spec, tracking)
    spec.analysis_dir.mkdir(parents=True, exist_ok=True)
    state_file = spec.analysis_dir / "study.json"
    run_id = _study_run(spec, state_file, resume) if tracking else None
    state_file.write_text(json.dumps({"study_run_id": run_id, "spec": spec.to_dict()}, indent=2))
    _export_project_path()
    log.info("Ray: %s", cluster.connect_ray(ray_address))
    status = "FAILED"
    try:
        rows, errored, complete, n_done = _run_tune(spec, run_id, resume)
        result = _analyze(spec, points_from_rows(rows, (spec.metric,)), run_id, errored, complete, n_done)
        if complete and not spec.keep_checkpoints:  # early-stopped trials leave theirs behind
            delete_tree(spec.trials_root)
        status = "KILLED" if not complete else "FINISHED" if not errored else "FAILED"
        return result
    finally:
        if run_id is not None:
            from orchestration import tracking as tr

            tr.end_run(run_id, status, uri=spec.tracking_uri or None)


def _run_tune(spec: StudySpec, run_id: str | None, resume: bool) -> tuple[list[dict[str, Any]], list[str], bool, int]:
    """Fit every Tune experiment of the study: (result rows, errored trials, complete, trials terminated)."""
    rows: list[dict[str, Any]] = []
    errored: list[str] = []
    n_done = 0
    for name, variant in spec.experiments():
        grid = _tuner(spec, run_id, resume, name, variant).fit()
        done, n = _all_trials_done(url_join(spec.storage_path, name))
        n_done += n
        for res in grid:
            trial = res.metrics.get("trial") if res.metrics else None
            if res.error is not None:
                errored.append(str(trial or res.path))
                # The cause on the line itself (a Ray error's message ends with it), then the whole error.
                cause = next((ln for ln in reversed(str(res.error).splitlines()) if ln.strip()), "?")
                log.warning("trial %s failed: %s\n%s", trial or res.path, cause.strip(), res.error)
            if res.metrics_dataframe is not None:
                rows.extend(res.metrics_dataframe.to_dict("records"))
        if not done:  # interrupted (Ctrl-C): leave the remaining experiments to --resume
            return rows, errored, False, n_done
        _close_stale_trial_runs(spec, run_id)
    return rows, errored, True, n_done


def _close_stale_trial_runs(spec: StudySpec, study_run_id: str | None) -> None:
    """Every trial of a finished Tune experiment has ended; a trial run still RUNNING was stopped
    (ASHA) and its actor removed before it could end its own run (seen under load): end it KILLED."""
    if study_run_id is None:
        return
    from orchestration import tracking as tr

    client = tr.client(spec.tracking_uri or None)
    experiment_id = client.get_run(study_run_id).info.experiment_id
    stale = client.search_runs([experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{study_run_id}' and attributes.status = 'RUNNING'"))
    for run in stale:
        if "vitscale.trial" in run.data.tags:
            client.set_terminated(run.info.run_id, "KILLED")


def _analyze(spec: StudySpec, table: pa.Table, run_id: str | None, errored: list[str], complete: bool,
             n_done: int) -> StudyResult:
    """Write the points table (+ best hparams), fit and plot it, log it all to the study's run."""
    out = spec.analysis_dir
    table_path = write_points(table, out / "points.parquet")
    files: dict[str, Path] = {"points": table_path}
    summary: dict[str, Any] = {"trials": grid_size(spec), "terminated": n_done,
                               "errored": errored, "points": table.num_rows, "complete": complete}
    if spec.study == "hparams":
        best = best_hparams(table)
        files["best_hparams"] = out / "best_hparams.json"
        files["best_hparams"].write_text(json.dumps(best, indent=2))
        summary["best_hparams"] = best
    if table.num_rows:
        # A hparams study mixes learning rates: its frontier is not a scaling law, only plot it.
        report = analyze(table, out, metric=spec.metric, n_boot=spec.n_boot, strict=False,
                         drop_nonfinite=True, fit_law=spec.study == "scaling")
        files.update(report.files)
        summary["fit"] = report.summary
        log.info("%s", format_report(report))
    if run_id is not None:
        _log_study(spec, run_id, files, summary)
    return StudyResult(table, table_path, files, summary, run_id, errored, complete)


def _all_trials_done(experiment_path: str) -> tuple[bool, int]:
    """(every trial terminated or errored, number terminated), from the saved experiment state.

    After Ctrl-C, ``Tuner.fit`` returns normally; the state it saved (unfinished trials
    PENDING, to be resumed) is the reliable record of what is left to do.
    """
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(experiment_path).trials
    done = sum(t.status == "TERMINATED" for t in trials)
    return all(t.status in ("TERMINATED", "ERROR") for t in trials), done


def _log_study(spec: StudySpec, run_id: str, files: Mapping[str, Path], summary: Mapping[str, Any]) -> None:
    from orchestration import tracking

    sink = tracking.MLflowSink(run_id, uri=spec.tracking_uri or None, system_metrics=False)
    for path in files.values():
        if Path(path).exists():
            sink.log_artifact(str(path), "study")
    fit = summary.get("fit", {}).get("frontier_fit")
    if fit:
        metrics = {f"law.{k}": v for k, v in fit["params"].items()}
        metrics["law.rmse_log"] = fit["rmse_log"]
        hold = fit.get("holdout") or {}
        if hold.get("law") is not None:
            metrics["law.holdout_mean_abs_rel_error"] = hold["mean_abs_rel_error"]
        sink.log_metrics(metrics, 0)
        sink.set_tags({"vitscale.law": fit["law"]})
    sink.log_metrics({"study.points": float(summary.get("points", 0)),
                      "study.errored_trials": float(len(summary.get("errored", [])))}, 0)
    sink.close()
