"""`mlops-assets`: the commands Dagster does not cover (spec infer, simulate, ingest, train, status, rollback, trace).

Bad arguments exit with status 2 and a message that names the argument; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mlops_assets import constants as c
from mlops_assets.core.redaction import redact_text

if TYPE_CHECKING:
    from mlops_assets.settings import Settings


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1), got {value}")
    return value


def _cmd_spec_infer(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from mlops_assets.core.spec_infer import infer_spec, read_table_file

    frame = read_table_file(args.file)
    name = args.name or Path(args.file).stem
    inferred = infer_spec(frame, args.label, args.positive, name=name, max_int_categories=args.max_int_categories,
                          max_string_categories=args.max_string_categories, observed_ranges=args.observed_ranges)
    text = json.dumps(inferred.as_dict(), indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    report = sys.stderr if not args.out else sys.stdout
    spec = inferred.spec
    print(f"inferred {len(spec.features)} features of {Path(args.file).name} ({len(frame)} rows): "
          f"{len(spec.categorical_features)} categorical, {len(spec.numeric_features)} numeric; label "
          f"{spec.label!r} in {list(spec.label_values)}, positive {spec.positive_class!r}", file=report)
    for column, why in inferred.notes.items():
        print(f"  {column}: {why}", file=report)
    for column, why in inferred.untyped.items():
        print(f"  NOT TYPED {column}: {why}", file=report)
    if args.out:
        print(f"wrote {args.out}: review it, then export MLOPS_DATASET_SPEC={args.out}", file=report)
    # Columns left out: the spec is written, but the file itself would not pass its contract.
    return 3 if inferred.untyped else 0


def _cmd_simulate_data(args: argparse.Namespace) -> int:
    from mlops_assets.core.dataset_spec import load_spec
    from mlops_assets.tools.simulator import SimulationConfig, parse_drift, simulate_records, write_batch

    settings = _dataset_settings(args)
    spec = load_spec(args.spec or settings.dataset_spec_path)
    drift = parse_drift(args.drift)
    config = SimulationConfig(
        n_rows=args.rows,
        seed=args.seed,
        duplicate_share=args.duplicate_share,
        conflict_share=args.conflict_share,
        drift=drift,
    )
    frame = simulate_records(spec, config)
    target = write_batch(frame, args.out or settings.landing_url, fmt=args.format, name=args.name)
    print(f"wrote {len(frame)} records ({spec.name}, seed {args.seed}) to {target}")
    return 0


def _no_dagster_home(command: str) -> bool:
    import os

    if os.environ.get("DAGSTER_HOME"):
        return False
    print(f"mlops-assets {command}: DAGSTER_HOME is not set; point it at the Dagster instance "
          "(make sets data/dagster_home)", file=sys.stderr)
    return True


def _cmd_ingest(args: argparse.Namespace) -> int:
    import dagster as dg

    if _no_dagster_home("ingest"):
        return 2
    with dg.DagsterInstance.get() as instance:
        return _ingest(instance, _dataset_settings(args))[0]


def _names(settings: Settings) -> Any:
    """The DatasetNames of the data set `settings` are of."""
    from mlops_assets.defs.datasets import DatasetNames

    return DatasetNames(settings.dataset_name)


def _ingest(instance: Any, settings: Settings) -> tuple[int, int]:
    """Each new landed file of the data set `settings` are of as a raw_batches partition on
    `instance`: (exit code, files ingested now)."""
    from mlops_assets.ingestion.batches import accepted_batches, hash_landed_files

    names = _names(settings)
    by_hash = hash_landed_files(settings.landing_url)
    done = instance.get_materialized_partitions(names.key("raw_batches")) if by_hash else set()
    if set(by_hash) - done:
        # Only new files pay for loading the definitions (most of this command's time).
        from mlops_assets.definitions import defs
        from mlops_assets.defs.ingestion.assets import INGEST_JOB, ingest_landed_on_instance

        job = defs.resolve_job_def(names.name(INGEST_JOB))
        files = [(f.status, f.sha256, f.file_name, f.detail) for f in
                 ingest_landed_on_instance(instance, job, settings.landing_url, names)]
    else:
        files = [("already_ingested", sha, landed.name, "") for sha, landed in by_hash.items()]
    for status, sha, name, detail in files:
        print(redact_text(f"{status:<16} {sha[:16]}  {name}" + (f"  {detail}" if detail else "")))
    batches = accepted_batches(settings.batches_url)
    ingested_now = sum(1 for f in files if f[0] != "already_ingested")
    if any(f[0] == "failed" for f in files):
        print("mlops-assets ingest: some raw_batches runs failed (see above and the Dagster UI)", file=sys.stderr)
        return 1, ingested_now
    if not batches:
        print(redact_text(f"mlops-assets ingest: no accepted batch; drop CSV or Parquet files into "
                          f"{settings.landing_url}"), file=sys.stderr)
        return 1, ingested_now
    print(f"{len(files)} landed file(s) are raw_batches partitions; {len(batches)} accepted batch(es), "
          f"{sum(b.rows for b in batches)} rows")
    return 0, ingested_now


def _run_config(config_files: Sequence[str], config_json: str | None) -> dict[str, Any]:
    """Run config from `-c` YAML files (merged, later ones win) or `--config-json`, as `dagster asset materialize`."""
    import dagster as dg

    if config_files and config_json:
        raise ValueError("give -c/--config or --config-json, not both")
    if config_json:
        try:
            parsed = json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config-json is not JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ValueError(f"--config-json must be a JSON object, got {type(parsed).__name__}")
        return parsed
    if not config_files:
        return {}
    try:
        return dict(dg.config_from_files(list(config_files)))
    except dg.DagsterInvariantViolationError as exc:
        raise ValueError(f"-c/--config: {exc}") from exc


def _first_line(step_failure: Any) -> str:
    error = getattr(step_failure.step_failure_data, "error", None)
    return redact_text((error.message if error is not None else "failed").strip().splitlines()[0])


def _cmd_train(args: argparse.Namespace) -> int:
    import dagster as dg

    if _no_dagster_home("train"):
        return 2
    with dg.DagsterInstance.get() as instance:
        return _train(args, instance, _dataset_settings(args))[0]


def _train(args: argparse.Namespace, instance: Any, settings: Settings) -> tuple[int, bool]:
    """Materialize the selection (of the data set `settings` are of) as a run of its training job on
    `instance`, launched only if something in it is stale: (exit code, whether a run was launched)."""
    import dagster as dg

    from mlops_assets.definitions import defs
    from mlops_assets.defs.ingestion.assets import TRAINING_JOB, TRAINING_ONWARD

    names = _names(settings)
    selection = [name.strip() for name in args.select.split(",") if name.strip()]
    graph = defs.resolve_asset_graph()
    unknown = [name for name in selection if not graph.has(names.key(name))]
    if unknown:
        print(f"mlops-assets train: --select names no asset: {', '.join(unknown)}", file=sys.stderr)
        return 2, False
    in_job = TRAINING_ONWARD.resolve(graph)
    outside = [name for name in selection if dg.AssetKey(name) not in in_job]  # the primary's graph: the same shape
    if outside:
        print(f"mlops-assets train: --select names assets outside the {TRAINING_JOB} job (raw_dataset and what "
              f"follows it, up to deployment): {', '.join(outside)}", file=sys.stderr)
        return 2, False
    try:
        run_config = _run_config(args.config, args.config_json)
    except ValueError as exc:
        print(f"mlops-assets train: {exc}", file=sys.stderr)
        return 2, False
    try:
        return _train_if_stale(instance, _training_job(settings.dataset_name), selection, graph, run_config,
                               args.force, settings.batches_url, names)
    except dg.DagsterInvalidConfigError as exc:  # the run config does not fit the job's config schema
        print(f"mlops-assets train: {exc}", file=sys.stderr)
        return 2, False


def _training_job(dataset: str | None) -> Any:
    """The data set's training job as a reconstructable target (step processes import it again)."""
    import dagster as dg

    from mlops_assets.definitions import training_job

    if dataset is None:
        return dg.reconstructable(training_job)
    return dg.build_reconstructable_job("mlops_assets.definitions", "dataset_training_job",
                                        reconstructable_kwargs={"dataset": dataset})


def _train_if_stale(instance: Any, job: Any, selection: list[str], graph: Any, run_config: dict[str, Any],
                    force: bool, batches_url: str, names: Any) -> tuple[int, bool]:
    import dagster as dg

    from mlops_assets.defs.training.staleness import training_staleness

    found = training_staleness(instance, graph, selection, run_config, batches_url, names)
    if not found.stale and not force:
        print(f"mlops-assets train: skipped, no run launched: {found.summary()}")
        return 0, False
    print("mlops-assets train: " + ("--force" if not found.stale else "launching a run, " + found.summary()))
    # A run of the training job on the instance, as the sensors launch (its name keeps them from
    # starting a second training run meanwhile); the executor is the run config's.
    with dg.execute_job(job, instance, run_config=run_config,
                        asset_selection=[names.key(name) for name in selection], raise_on_error=False) as result:
        if not result.success:
            failures = result.get_step_failure_events()
            # "Steps failed: [...]" as `dagster asset materialize` says it (scripts look for it).
            print(f"mlops-assets train: run {result.run_id} failed. Steps failed: "
                  f"{[str(step.step_key) for step in failures]}; "
                  + "; ".join(f"{step.step_key}: {_first_line(step)}" for step in failures)
                  + "; see the Dagster UI", file=sys.stderr)
            return 1, True
        print(f"mlops-assets train: run {result.run_id} succeeded")
    return 0, True


def _cmd_pipeline(args: argparse.Namespace) -> int:
    """`make pipeline`: ingest, train (only if stale), status, in one process and on one instance, so the
    imports, the definitions and the instance are paid once (an unchanged re-run is mostly that cost).

    When no file was new and nothing was stale, this command changed nothing in the registry: it says
    so and skips the status (whose MLflow import and store would be most of an unchanged re-run)."""
    import dagster as dg

    if _no_dagster_home("pipeline"):
        return 2
    from mlops_assets.settings import dataset_names, dataset_settings, load_settings

    settings = load_settings()
    # Every configured data set in turn, unless --dataset names one.
    datasets = [args.dataset] if args.dataset else dataset_names(settings)
    changed = False
    with dg.DagsterInstance.get() as instance:
        for dataset in datasets:
            if len(datasets) > 1:
                print(f"mlops-assets pipeline: data set {dataset}")
            own = dataset_settings(settings, dataset)
            code, ingested_now = _ingest(instance, own)
            if code != 0:
                return code
            code, launched = _train(args, instance, own)
            if code != 0:
                return code
            changed = changed or launched or bool(ingested_now)
    if len(datasets) > 1:
        for dataset in datasets:
            _cmd_status(argparse.Namespace(history=False, no_endpoint=False, endpoint=None, tracking_uri=None,
                                           model_name=None, json=False, dataset=dataset))
        return 0
    if not changed:
        print("mlops-assets pipeline: no new file and nothing stale, so the registry is as the last run left it; "
              "`mlops-assets status` shows the champion and the endpoint")
        return 0
    return _cmd_status(argparse.Namespace(history=False, no_endpoint=False, endpoint=None, tracking_uri=None,
                                          model_name=None, json=False, dataset=args.dataset))


def _dataset_settings(args: argparse.Namespace) -> Settings:
    """The settings of the data set `--dataset` names (default: the primary, the only one unless
    MLOPS_DATASETS lists several)."""
    from mlops_assets.settings import dataset_settings, load_settings

    return dataset_settings(load_settings(), getattr(args, "dataset", None))


def _add_dataset_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=None, metavar="NAME",
                        help="which data set, when MLOPS_DATASETS configures several (default: the first)")


def _cmd_datasets(args: argparse.Namespace) -> int:
    """The configured data sets, the primary first: name, registered model, endpoint (or names only)."""
    from mlops_assets.settings import dataset_names, dataset_settings, load_settings

    settings = load_settings()
    for name in dataset_names(settings):
        own = dataset_settings(settings, name)
        endpoint = own.serve_app_url + "/predict"
        print(name if args.names else f"{name}\t{own.model_name}\t{endpoint}\t{redact_text(own.landing_url)}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from mlops_assets.tools.status import champion_status, format_status, to_json

    settings = _dataset_settings(args)
    if args.history:
        return _print_history(args)
    endpoint = None if args.no_endpoint else (  # the data set's application, below its route prefix
        args.endpoint or settings.serve_app_url
    )
    status = champion_status(args.tracking_uri or settings.mlflow_tracking_uri,
                             args.model_name or settings.model_name, endpoint)
    print(to_json(status) if args.json else format_status(status))
    return 0 if status["champion"] is not None else 1  # scripts can tell "no champion yet"


def _print_history(args: argparse.Namespace) -> int:
    import json

    from mlflow import MlflowClient

    from mlops_assets.registry import governance

    settings = _dataset_settings(args)
    model_name = args.model_name or settings.model_name
    rows = governance.history_rows(MlflowClient(args.tracking_uri or settings.mlflow_tracking_uri), model_name)
    print(json.dumps(rows, indent=2) if args.json else governance.format_history(model_name, rows))
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    import json
    import os

    from mlops_assets.registry import governance

    settings = _dataset_settings(args)
    sources = governance.TraceSources(
        prediction_log_url=args.log_url or settings.prediction_log_url,
        tracking_uri=args.tracking_uri or settings.mlflow_tracking_uri,
        model_name=args.model_name or settings.model_name,
        batches_url=settings.batches_url,
    )
    instance = None
    if os.environ.get("DAGSTER_HOME"):  # the Dagster runs are checked in the instance it names
        import dagster as dg

        from mlops_assets.defs.registry.lookups import InstanceLookup

        instance = dg.DagsterInstance.get()
        sources.dagster = InstanceLookup(instance, _names(settings))  # the data set's own assets
    try:
        report = governance.trace(args.request_id, sources)
    except governance.RequestNotFound as exc:
        print(f"mlops-assets trace: {exc}", file=sys.stderr)
        return 1
    finally:
        if instance is not None:
            instance.dispose()
    print(json.dumps(report, indent=2, default=str) if args.json else governance.format_trace(report))
    return 0 if report["links_ok"] else 1


def _replica_env_vars(settings: Settings, tracking_uri: str) -> dict[str, str]:
    """The replicas' variables for a deploy from the CLI: the settings' data root, log, spec and registry."""
    from mlops_assets.deployment import rollout as dep

    return dep.replica_env_vars(tracking_uri=tracking_uri, data_url=settings.data_url,
                                prediction_log_url=settings.prediction_log_url,
                                dataset_spec_path=settings.dataset_spec_path,
                                tracking_uri_file=settings.mlflow_tracking_uri_file)


def _cmd_rollback(args: argparse.Namespace) -> int:

    from mlops_assets.core.dataset_spec import load_spec
    from mlops_assets.deployment import rollout as dep

    settings = _dataset_settings(args)
    target = dep.target_from_settings(settings, dashboard_url=args.dashboard_url, serve_url=args.endpoint)
    tracking_uri = args.tracking_uri or settings.mlflow_tracking_uri
    env_vars = _replica_env_vars(settings, tracking_uri)
    spec = load_spec(settings.dataset_spec_path)
    try:
        result = dep.rollback(target=target, tracking_uri=tracking_uri, spec=spec,
                              model_name=args.model_name or settings.model_name,
                              records=dep.simulated_sample(spec), env_vars=env_vars, actor=settings.actor)
    except (dep.DeploymentError, LookupError) as exc:
        # The registry and the endpoint are as they were: say why, exit 1.
        print(redact_text(f"mlops-assets rollback: failed: {exc}"), file=sys.stderr)
        return 1
    print(f"rolled back: version {result.live_version} is champion and live at {result.endpoint} "
          f"(replaced version {result.replaced_version})")
    return 0


def _cmd_serve_restore(args: argparse.Namespace) -> int:
    """Serve the registry's champion again when the Serve app is missing or serves another version."""

    from mlops_assets.core.dataset_spec import load_spec
    from mlops_assets.deployment import rollout as dep

    settings = _dataset_settings(args)
    target = dep.target_from_settings(settings, dashboard_url=args.dashboard_url, serve_url=args.endpoint)
    tracking_uri = args.tracking_uri or settings.mlflow_tracking_uri
    try:
        result = dep.restore_champion(target=target, tracking_uri=tracking_uri, spec=load_spec(settings.dataset_spec_path),
                                      model_name=args.model_name or settings.model_name,
                                      env_vars=_replica_env_vars(settings, tracking_uri),
                                      http_host=settings.serve_http_host)
    except LookupError as exc:  # no champion yet (a fresh platform): nothing to serve, not an error
        print(f"mlops-assets serve restore: {exc}")
        return 0
    except dep.DeploymentError as exc:
        print(f"mlops-assets serve restore: failed: {exc}", file=sys.stderr)
        return 1
    print(f"mlops-assets serve restore: {result.describe()}; endpoint {target.endpoint}")
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    """Promote or end the live shadow/canary release by hand (what the release sensor's runs do), or show it."""
    import json

    import httpx

    from mlops_assets.deployment import rollout as dep
    from mlops_assets.monitoring.alerts import send_alert

    settings = _dataset_settings(args)
    target = dep.target_from_settings(settings, dashboard_url=args.dashboard_url, serve_url=args.endpoint)
    if args.action == "status":
        try:
            live = dep.current_release(target)
        except httpx.HTTPError as exc:
            print(f"mlops-assets release status: the Ray dashboard at {target.dashboard_url} did not answer "
                  f"({type(exc).__name__}); is the Ray head up (make up)?", file=sys.stderr)
            return 1
        state = dep.release_state(target) or {}
        print(json.dumps({**live.to_user_config(), "ingress": state}, indent=2, default=str) if args.json else (
            f"release {live.release_id}: {live.strategy} of version {live.candidate_version} beside champion "
            f"{live.champion_version}" if live.active else "no release in progress"))
        return 0
    promote = args.action == "promote"
    reason = f"by hand ({args.reason})" if args.reason else "by hand"
    try:
        result = dep.finish_release(target=target, tracking_uri=args.tracking_uri or settings.mlflow_tracking_uri,
                                    model_name=args.model_name or settings.model_name, promote=promote,
                                    actor=settings.actor, reasons=[reason])
    except (dep.DeploymentError, LookupError) as exc:
        print(redact_text(f"mlops-assets release {args.action}: failed: {exc}"), file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"mlops-assets release {args.action}: the Ray dashboard at {target.dashboard_url} did not answer "
              f"({type(exc).__name__}); is the Ray head up (make up)?", file=sys.stderr)
        return 1
    release = result.release
    done = "promoted" if promote else "aborted"
    send_alert(f"release_{done}", f"release {release.release_id} {done} {reason}; version {result.champion_version} "
               f"answers every request", {"release_id": release.release_id, "candidate": release.candidate_version,
                                          "champion": result.champion_version},
               webhook_url=settings.alert_webhook_url)
    print(f"release {release.release_id} {done}: version {result.champion_version} is champion and answers every "
          f"request at {target.endpoint}")
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _cmd_simulate_traffic(args: argparse.Namespace) -> int:
    import time

    from mlops_assets.core.dataset_spec import load_spec
    from mlops_assets.settings import load_settings
    from mlops_assets.tools import traffic
    from mlops_assets.tools.simulator import parse_drift

    settings = load_settings()
    spec = load_spec(args.spec or settings.dataset_spec_path)
    base = args.endpoint or settings.serve_url
    config = traffic.TrafficConfig(
        endpoint=f"{base.rstrip('/')}/predict", token=settings.serving_token(),
        records=args.records, batch_size=args.batch_size, rate=args.rate, concurrency=args.concurrency,
        max_duration_s=args.max_duration, seed=args.seed, drift=parse_drift(args.drift),
    )
    if not 0.0 < args.label_share <= 1.0 or args.label_delay < 0:
        raise ValueError(f"--label-share must be in (0, 1] and --label-delay at least 0, got "
                         f"{args.label_share} and {args.label_delay}")
    records = traffic.traffic_records(spec, config)  # unknown drift features fail here, before any request
    result = traffic.send_traffic(spec, config, records)
    print(f"traffic to {config.endpoint}: {result.summary()}")
    if args.labels:
        if args.label_delay:
            time.sleep(args.label_delay)  # labels arrive later than predictions, as in production
        labels = traffic.labels_frame(result, share=args.label_share, seed=args.seed)
        out = args.labels_dir or settings.labels_url
        target = traffic.write_labels(labels, out)
        print(f"wrote {len(labels)} delayed labels to {target}")
    return 0 if result.requests_ok else 1


def _add_training_run_args(parser: argparse.ArgumentParser) -> None:
    """The options `train` and `pipeline` share: what to materialize, its run config, --force."""
    parser.add_argument("--select", required=True, help="comma-separated assets, as dagster asset materialize takes")
    parser.add_argument("-c", "--config", action="append", default=[], help="run config YAML file (repeatable)")
    parser.add_argument("--config-json", default=None, help="run config as JSON (instead of -c)")
    parser.add_argument("--force", action="store_true", help="launch the run even if nothing is stale")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlops-assets", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    spec_cmd = sub.add_parser("spec", help="dataset specifications")
    spec_sub = spec_cmd.add_subparsers(dest="what", required=True)
    infer = spec_sub.add_parser("infer", help="suggest a dataset spec (kinds, value sets, ranges, label values) "
                                              "from a CSV or Parquet file, for review; exit 3 if a column "
                                              "could not be typed")
    infer.add_argument("file", help="a CSV or Parquet file of the data")
    infer.add_argument("--label", required=True, help="the label column")
    infer.add_argument("--positive", required=True, help="the label value that is the positive class")
    infer.add_argument("--out", default=None, help="write the spec here (default: print it)")
    infer.add_argument("--name", default=None, help="data set name (default: the file's name)")
    infer.add_argument("--max-int-categories", type=_positive_int, default=10,
                       help="whole-number columns with at most this many values are categorical codes (default 10)")
    infer.add_argument("--max-string-categories", type=_positive_int, default=50,
                       help="text columns with more values are open categories (default 50)")
    infer.add_argument("--observed-ranges", action="store_true",
                       help="write each numeric column's observed min and max (default: only min 0 / max 1 bounds)")
    infer.set_defaults(func=_cmd_spec_infer)

    simulate = sub.add_parser("simulate", help="simulate raw data, or traffic and its delayed labels")
    sim_sub = simulate.add_subparsers(dest="what", required=True)
    data = sim_sub.add_parser("data", help="write N seeded records into the landing folder")
    _add_dataset_arg(data)
    data.add_argument("--rows", type=_positive_int, default=5000, help="records to write (default 5000)")
    data.add_argument("--seed", type=int, default=c.SIMULATOR_SEED, help="random seed")
    data.add_argument("--out", default=None, help="landing folder or fsspec URL (default: MLOPS_LANDING_URL)")
    data.add_argument("--format", choices=["csv", "parquet"], default="csv")
    data.add_argument("--name", default=None, help="file name (default: batch-<UTC time>.<format>)")
    data.add_argument("--duplicate-share", type=_share, default=None, help="share of exact duplicate rows")
    data.add_argument("--conflict-share", type=_share, default=None,
                      help="share of distinct feature vectors that also appear with the other label")
    data.add_argument("--drift", action="append", default=[], metavar="FEATURE=AMOUNT",
                      help="drift FEATURE by AMOUNT in [0, 1]: a categorical feature's share moves onto its rarest "
                           "value, a numeric one is scaled by 1 + 3*AMOUNT (repeatable)")
    data.add_argument("--spec", default=None, help="dataset spec JSON (default: MLOPS_DATASET_SPEC or phishing)")
    data.set_defaults(func=_cmd_simulate_data)

    traffic = sim_sub.add_parser("traffic", help="send bounded, rate-limited requests to the endpoint (token: MLOPS_API_TOKEN)")
    traffic.add_argument("--records", type=_positive_int, default=500, help="records to send in all (default 500)")
    traffic.add_argument("--batch-size", type=_positive_int, default=10, help="records per request (default 10)")
    traffic.add_argument("--rate", type=_positive_float, default=20.0, help="requests per second (default 20)")
    traffic.add_argument("--concurrency", type=_positive_int, default=2, help="parallel connections (default 2)")
    traffic.add_argument("--max-duration", type=_positive_float, default=120.0,
                         help="seconds after which nothing new is sent (default 120)")
    traffic.add_argument("--seed", type=int, default=c.SIMULATOR_SEED + 1, help="random seed of the records")
    traffic.add_argument("--drift", action="append", default=[], metavar="FEATURE=AMOUNT",
                         help="inject drift: a categorical FEATURE's share moves AMOUNT onto its rarest value, a "
                              "numeric one is scaled by 1 + 3*AMOUNT (repeatable)")
    traffic.add_argument("--endpoint", default=None,
                         help="serving URL (default: MLOPS_SERVE_URL, else the local Serve port)")
    traffic.add_argument("--labels", action="store_true",
                         help="then write the true labels of the answered records as delayed labels")
    traffic.add_argument("--label-share", type=_positive_float, default=1.0, help="share of records labelled (0, 1]")
    traffic.add_argument("--label-delay", type=float, default=0.0, help="seconds to wait before writing the labels")
    traffic.add_argument("--labels-dir", default=None, help="labels landing folder (default: MLOPS_LABELS_URL or data/labels)")
    traffic.add_argument("--spec", default=None, help="dataset spec JSON (default: MLOPS_DATASET_SPEC or phishing)")
    traffic.set_defaults(func=_cmd_simulate_traffic)

    ingest = sub.add_parser("ingest", help="make each landed file a partition of raw_batches and materialize "
                                           "the new ones on the Dagster instance (DAGSTER_HOME)")
    _add_dataset_arg(ingest)
    ingest.set_defaults(func=_cmd_ingest)

    train = sub.add_parser("train", help="materialize the training path (a run of the ingestion_onward job) only if "
                                         "something in it is stale: new raw batches, changed code or parameters")
    _add_training_run_args(train)
    _add_dataset_arg(train)
    train.set_defaults(func=_cmd_train)

    pipeline = sub.add_parser("pipeline", help="what make pipeline runs: ingest, train (only if stale), status, "
                                               "in one process")
    _add_training_run_args(pipeline)
    _add_dataset_arg(pipeline)
    pipeline.set_defaults(func=_cmd_pipeline)

    datasets = sub.add_parser("datasets", help="the configured data sets (MLOPS_DATASETS), the primary first: "
                                                "name, registered model, endpoint and landing folder")
    datasets.add_argument("--names", action="store_true", help="names only, one a line (for scripts)")
    datasets.set_defaults(func=_cmd_datasets)

    status = sub.add_parser("status", help="the champion model: version, metrics, data and feature versions, run")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument("--model-name", default=None, help="registered model (default: MLOPS_MODEL_NAME)")
    status.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI)")
    status.add_argument("--endpoint", default=None,
                        help="serving URL to health-check (default: MLOPS_SERVE_URL, else the local Serve port)")
    status.add_argument("--no-endpoint", action="store_true", help="skip the endpoint health check")
    status.add_argument("--history", action="store_true",
                        help="list who registered, promoted, demoted or rolled back which version, and when")
    _add_dataset_arg(status)
    status.set_defaults(func=_cmd_status)

    trace = sub.add_parser("trace", help="provenance of one prediction: version, run, gate, features, "
                                         "raw batches, Dagster runs, code (exit 1 if a link is broken)")
    trace.add_argument("request_id", help="the request_id of a /predict answer")
    trace.add_argument("--json", action="store_true", help="print JSON for scripts")
    trace.add_argument("--model-name", default=None, help="registered model (default: MLOPS_MODEL_NAME)")
    trace.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI)")
    trace.add_argument("--log-url", default=None,
                       help="prediction log (default: MLOPS_PREDICTION_LOG_URL, else <data>/predictions)")
    _add_dataset_arg(trace)
    trace.set_defaults(func=_cmd_trace)

    rollback = sub.add_parser("rollback", help="champion := previous-champion, redeployed to Ray Serve, in one step")
    rollback.add_argument("--model-name", default=None, help="registered model (default: MLOPS_MODEL_NAME)")
    rollback.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI)")
    rollback.add_argument("--dashboard-url", default=None,
                          help="Ray dashboard (default: MLOPS_RAY_DASHBOARD_URL, else the local head)")
    rollback.add_argument("--endpoint", default=None,
                          help="serving URL (default: MLOPS_SERVE_URL, else the local Serve port)")
    _add_dataset_arg(rollback)
    rollback.set_defaults(func=_cmd_rollback)

    release = sub.add_parser("release", help="the live shadow or canary release: promote it, abort it, or show it")
    release.add_argument("action", choices=["promote", "abort", "status"])
    release.add_argument("--reason", default=None, help="why, for the registry history and the alert")
    release.add_argument("--json", action="store_true", help="status as JSON")
    release.add_argument("--model-name", default=None, help="registered model (default: MLOPS_MODEL_NAME)")
    release.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI)")
    release.add_argument("--dashboard-url", default=None,
                         help="Ray dashboard (default: MLOPS_RAY_DASHBOARD_URL, else the local head)")
    release.add_argument("--endpoint", default=None,
                         help="serving URL (default: MLOPS_SERVE_URL, else the local Serve port)")
    _add_dataset_arg(release)
    release.set_defaults(func=_cmd_release)

    serve = sub.add_parser("serve", help="the Ray Serve application")
    serve_sub = serve.add_subparsers(dest="what", required=True)
    restore = serve_sub.add_parser("restore", help="deploy the registry's champion again if the Serve app is "
                                                   "missing or serves another version (aliases untouched)")
    restore.add_argument("--model-name", default=None, help="registered model (default: MLOPS_MODEL_NAME)")
    restore.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI)")
    restore.add_argument("--dashboard-url", default=None,
                         help="Ray dashboard (default: MLOPS_RAY_DASHBOARD_URL, else the local head)")
    restore.add_argument("--endpoint", default=None,
                         help="serving URL (default: MLOPS_SERVE_URL, else the local Serve port)")
    _add_dataset_arg(restore)
    restore.set_defaults(func=_cmd_serve_restore)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, KeyError, FileNotFoundError) as exc:
        # Known bad input: one clear line, no traceback.
        print(redact_text(f"mlops-assets {args.command}: error: {exc}"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
