"""The work of each pipeline step, as plain functions over local folders and the store.

`pipelines/components.py` wraps each of these in a KFP component; keeping the work here means it is
tested without KFP, and the components stay a few lines each. Artifacts arrive as objects with a
`.path` (a local file or folder, downloaded by the KFP launcher on a cluster) and a `.metadata` dict;
metrics artifacts also have `log_metric` / `log_confusion_matrix`.

    runner.py       run_step (one marked line per failure), StepError / GateFailed, device, metrics I/O
    catalog.py      prepare: validate a catalog and split it (held_out: the stable hash split)
    model.py        train, fetch and publish a model version
    evaluation.py   measure a model on held-out rows beside the ImageNet baseline; confusion matrices
    report.py       the evaluation's self-contained HTML report
    gates.py        the model and index gates: pass, or fail saying what to do
    embed.py        embed catalog images through the serving preprocessing
    index.py        build, evaluate, update and publish the FAISS index
    changes.py      an update's change set, applied again when another run published first
    sharded.py      the sharded version published beside the index (`index_shards`)

Every failure a user can fix raises an error of the `lookalike.core.errors` family (`StepError`, a catalog,
store or artifact error) with a message that says what to do; `run_step` prints it on one marked line,
so a local run shows the user the message of the step that failed instead of a stack trace.
"""
from lookalike.pipelines.steps.runner import STEP_FAILED, GateFailed, StepError, run_step

__all__ = ["STEP_FAILED", "GateFailed", "StepError", "run_step"]
