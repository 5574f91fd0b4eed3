"""`lookalike pipeline compile|run|submit`: the Kubeflow pipelines, compiled, run here, or sent to a cluster.

A parameter that does not parse and a run that fails raise errors of the `lookalike.core.errors` family
(`InputError`, `lookalike.pipelines.local.PipelineFailed`), which the command line prints as one line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lookalike.core.errors import InputError

ORDER = 40

PIPELINE_NAMES = ("train", "index", "update", "train-and-index")
_SUMMARIES = {
    "train": "fine-tune the model on a catalog, evaluate it, publish it if it passes the gates",
    "index": "embed a catalog with a published model, build the IVF index, publish it if it passes the gates",
    "update": "add new listings to / remove delisted ones from the published index, publish a new version",
    "train-and-index": "train and index in one run; publish the model and its index together",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="compile, run locally, or submit the Kubeflow pipelines",
                       description="The Kubeflow pipelines (" + ", ".join(PIPELINE_NAMES) + "). `compile` writes "
                                   "their IR YAML, `run NAME --local` runs one on this machine with kfp.local "
                                   "against the configured store, `submit NAME --host URL` sends one to a Kubeflow "
                                   "Pipelines endpoint (optionally on a schedule).")
    verbs = p.add_subparsers(dest="pipeline_verb", metavar="ACTION")

    comp = verbs.add_parser("compile", help="write the IR YAML of every pipeline",
                            description="Compile every pipeline to Kubeflow IR YAML (the checked-in copies live "
                                        "in pipelines/compiled/).")
    comp.add_argument("--out", type=Path, default=None, help="output folder (default: pipelines/compiled/)")
    comp.set_defaults(func=_compile)

    run = verbs.add_parser("run", help="run a pipeline on this machine (kfp.local)",
                           description="Run a pipeline on this machine with kfp.local's SubprocessRunner, against "
                                       "the store the LOOKALIKE_S3_* variables point at (start one with `lookalike "
                                       "store up`). Set parameters with --param KEY=VALUE; `lookalike pipeline run "
                                       "NAME --help` lists them. Catalogs go by name as on the rest of the command "
                                       "line (catalog_uri=fashion-mnist-train) or by URI; models by version or "
                                       "alias (model_ref=candidate).", add_help=False)
    run.add_argument("name", nargs="?", choices=PIPELINE_NAMES, metavar="NAME",
                     help="pipeline: " + ", ".join(PIPELINE_NAMES))
    run.add_argument("-h", "--help", action="store_true", help="show this help (with NAME: its parameters)")
    run.add_argument("--local", action="store_true",
                     help="run here with kfp.local (the default and only mode of `run`; use `submit` for a cluster)")
    run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="a pipeline parameter (repeatable); values are parsed as the parameter's type, "
                          "dicts and lists as JSON")
    run.add_argument("--root", type=Path, default=None,
                     help="local pipeline root for artifacts (default: $LOOKALIKE_HOME/pipeline-runs)")
    run.add_argument("--cache", action="store_true", help="reuse outputs of cached steps from earlier local runs")
    run.add_argument("--show-executor-logs", action="store_true", help="show kfp's executor logs as well")
    run.set_defaults(func=_run, parser=run)

    sb = verbs.add_parser("submit", help="create a run (or a recurring run) on a Kubeflow Pipelines endpoint",
                          description="Upload the compiled pipeline to a Kubeflow Pipelines endpoint and create a "
                                      "run, or with --schedule a recurring run. The tasks read S3 settings from the "
                                      "lookalike-settings ConfigMap and lookalike-s3 Secret in the run's namespace "
                                      "(manifests/base).", add_help=False)
    sb.add_argument("name", nargs="?", choices=PIPELINE_NAMES, metavar="NAME",
                    help="pipeline: " + ", ".join(PIPELINE_NAMES))
    sb.add_argument("-h", "--help", action="store_true", help="show this help (with NAME: its parameters)")
    sb.add_argument("--host", help="Kubeflow Pipelines API endpoint, e.g. http://localhost:8080")
    sb.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a pipeline parameter (repeatable); dicts and lists as JSON")
    sb.add_argument("--schedule", metavar="CRON",
                    help="create a recurring run on this cron schedule instead of one run: 5 fields "
                         "(min hour day month weekday) or KFP's 6 (with seconds first)")
    sb.add_argument("--experiment", default="lookalike", help="experiment name (default lookalike)")
    sb.add_argument("--namespace", default=None, help="Kubernetes namespace (multi-user Kubeflow)")
    sb.add_argument("--run-name", default=None, help="name of the run or recurring run (default: generated)")
    sb.add_argument("--token", default=None, help="bearer token for the endpoint (default: kfp's own discovery)")
    sb.set_defaults(func=_submit, parser=sb)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _help(args: argparse.Namespace) -> int:
    args.parser.print_help()
    if args.name:
        print()
        print(describe_parameters(args.name))
    else:
        print("\npipelines:")
        for name in PIPELINE_NAMES:
            print(f"  {name:<16} {_SUMMARIES[name]}")
    return 0


def describe_parameters(name: str) -> str:
    """The parameters of pipeline `name`, their types, defaults and descriptions."""
    from lookalike.pipelines.definitions import PIPELINES

    spec = PIPELINES[name].component_spec
    lines = [f"pipeline {name}: {_SUMMARIES[name]}", "parameters (--param KEY=VALUE):"]
    for key, inp in (spec.inputs or {}).items():
        default = "required" if not inp.optional else f"default {json.dumps(inp.default)}"
        lines.append(f"  {key} ({inp.type}, {default})")
        if inp.description:
            lines.append(f"      {inp.description}")
    return "\n".join(lines)


def parse_params(name: str, pairs: list[str]) -> dict:
    """KEY=VALUE strings → typed values, by the pipeline's declared parameter types; InputError for a
    pair that is not KEY=VALUE, a parameter the pipeline lacks or a value of the wrong type."""
    from lookalike.pipelines.definitions import PIPELINES

    inputs = PIPELINES[name].component_spec.inputs or {}
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise InputError(f"--param {pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in inputs:
            raise InputError(f"pipeline {name} has no parameter {key!r}; parameters: {', '.join(inputs)}")
        out[key] = _coerce(key, value, inputs[key].type)
    return out


def _coerce(key: str, value: str, kind: str):
    try:
        if kind == "Integer":
            return int(value)
        if kind == "Float":
            return float(value)
        if kind == "Boolean":
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes")
        if kind in ("Dict", "List"):
            parsed = json.loads(value)
            if not isinstance(parsed, dict if kind == "Dict" else list):
                raise ValueError(value)
            return parsed
    except (ValueError, json.JSONDecodeError):
        raise InputError(f"--param {key}={value!r}: expected a {kind.lower()}"
                         f"{' in JSON' if kind in ('Dict', 'List') else ''}") from None
    return value


def _compile(args: argparse.Namespace) -> int:
    from lookalike.pipelines.compile import COMPILED_DIR, compile_all

    for path in compile_all(args.out or COMPILED_DIR):
        print(f"wrote {path}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.help or not args.name:
        return _help(args) if args.help else (_help(args), 2)[1]
    from lookalike.pipelines.local import run_local

    params = parse_params(args.name, args.param)
    run = run_local(args.name, params, root=args.root, verbose=args.show_executor_logs, caching=args.cache)
    for key, value in run.outputs.items():
        print(f"{key}: {value}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    if args.help or not args.name:
        return _help(args) if args.help else (_help(args), 2)[1]
    from lookalike.cli.main import CommandError
    from lookalike.pipelines.submit import SubmitError, submit

    if not args.host:
        raise CommandError("--host is required: the Kubeflow Pipelines API endpoint, e.g. http://localhost:8080 "
                           "(`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`)")
    params = parse_params(args.name, args.param)
    try:
        result = submit(args.name, args.host, params, schedule=args.schedule, experiment=args.experiment,
                        namespace=args.namespace, run_name=args.run_name, token=args.token)
    except SubmitError as exc:
        raise CommandError(str(exc)) from None
    print(result)
    return 0
