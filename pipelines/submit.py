"""Send a pipeline to a real Kubeflow Pipelines endpoint: one run, or a recurring run on a cron schedule.

The pipeline is compiled fresh from `lookalike.pipelines.definitions` (the same YAML `lookalike pipeline compile`
writes), so what runs is what the code says. The tasks find the store through the `lookalike-settings`
ConfigMap and the `lookalike-s3` Secret of the run's namespace (see manifests/base).
"""
from __future__ import annotations

import tempfile
import warnings
from typing import Any

from lookalike.core.errors import LookalikeError


class SubmitError(LookalikeError):
    """The endpoint could not take the run; the message says what to check."""


def kfp_cron(schedule: str) -> str:
    """A cron expression in KFP's 6-field form (seconds first); a standard 5-field one gets `0` seconds."""
    fields = schedule.split()
    if len(fields) == 5:
        return "0 " + " ".join(fields)
    if len(fields) == 6:
        return " ".join(fields)
    raise SubmitError(f"--schedule {schedule!r} is not a cron expression: use 5 fields (minute hour day month "
                      f"weekday, e.g. '0 3 * * *' for 03:00 daily) or KFP's 6 with seconds first")


def submit(name: str, host: str, params: dict[str, Any] | None = None, *, schedule: str | None = None,
           experiment: str = "lookalike", namespace: str | None = None, run_name: str | None = None,
           token: str | None = None) -> str:
    """Create a run (or, with `schedule`, a recurring run) of pipeline `name`; return a line saying what was made."""
    from lookalike.pipelines.compile import compile_pipeline

    cron = kfp_cron(schedule) if schedule else None
    with tempfile.TemporaryDirectory(prefix="lookalike-submit-") as tmp:
        package = compile_pipeline(name, tmp)
        client = _client(host, namespace, token)
        try:
            if cron is None:
                result = client.create_run_from_pipeline_package(
                    str(package), arguments=params or {}, run_name=run_name, experiment_name=experiment,
                    namespace=namespace)
                return f"created run {result.run_id} of {name} on {host}"
            exp = client.create_experiment(name=experiment, namespace=namespace)
            job = client.create_recurring_run(
                experiment_id=exp.experiment_id, job_name=run_name or f"lookalike-{name}",
                cron_expression=cron, params=params or {}, pipeline_package_path=str(package),
                max_concurrency=1, no_catchup=True, enabled=True)
            return f"created recurring run {job.recurring_run_id} of {name} on {host} (cron '{cron}')"
        except Exception as exc:  # noqa: BLE001 - the endpoint's failures become one clear line
            raise SubmitError(_explain(exc, host)) from None


def _client(host: str, namespace: str | None, token: str | None):
    import logging

    import kfp

    # kfp's client retries a dead host three times, each with a warning; the one error line says it all.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token)
    except Exception as exc:  # noqa: BLE001
        raise SubmitError(_explain(exc, host)) from None


def _explain(exc: Exception, host: str) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    status = getattr(exc, "status", None)
    if status in (401, 403):
        return (f"{host} refused the request ({status}): pass --token, or log in the way your Kubeflow "
                f"requires (kfp's credentials discovery)")
    if status == 404:
        return f"{host} has no Kubeflow Pipelines API at that path (404): check --host"
    if "Connection refused" in text or "Max retries" in text or "Failed to establish" in text \
            or "Name or service not known" in text or type(exc).__name__ in ("MaxRetryError", "ConnectionError"):
        return (f"cannot reach the Kubeflow Pipelines API at {host}: check --host (for example "
                f"`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80` and --host http://localhost:8080)")
    return f"the Kubeflow Pipelines API at {host} refused the run: {text}"

