"""`lookalike demo`: the main job on the embedded defaults, from an empty machine to measured search."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = 5


def register(sub: argparse._SubParsersAction) -> None:
    from lookalike.app.demo import DemoSettings

    d = DemoSettings()
    p = sub.add_parser(
        "demo", help="the whole flow on one machine: store, catalog, train-and-index, serving, queries",
        description="Start the embedded S3 store, import a Fashion-MNIST catalog, run the train-and-index "
                    "pipeline locally (kfp.local), start the transformer and predictor (KServe v2), send "
                    "simulated phone photos of held-out listings, and print and write (HTML) what came back "
                    "with the measured recall@10 beside the ImageNet-pretrained baseline's. The defaults "
                    "finish in about 15 minutes on 2 CPU cores; the flags scale it up.")
    p.add_argument("--rows", type=int, default=d.rows,
                   help=f"catalog rows imported from Fashion-MNIST (class-stratified; default {d.rows}, up to 60000)")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input side in pixels (default: the training default)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    p.add_argument("--samples-per-task", type=int, default=None,
                   help="rows of every task in each balanced training batch (default: the training default)")
    p.add_argument("--queries", type=int, default=d.queries,
                   help=f"simulated phone photos sent through the served stack (default {d.queries})")
    p.add_argument("--holdout", type=float, default=d.holdout_fraction,
                   help=f"share of listings held out of training (default {d.holdout_fraction})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the slice, split, training and photos")
    p.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other training setting (repeatable; values as JSON where they parse)")
    p.add_argument("--out", type=Path, default=None,
                   help="where demo.html and result.json go (default $LOOKALIKE_HOME/demo)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import signal
    import time

    from lookalike.cli.main import CommandError
    from lookalike.app.demo import DemoSettings, run_demo
    from lookalike.pipelines.local import PipelineFailed

    options = {}
    for pair in args.train_option:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CommandError(f"--train-option {pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    if args.rows < 50:
        raise CommandError("--rows must be at least 50: the held-out share needs listings to query")
    settings = DemoSettings(rows=args.rows, image_size=args.image_size, steps=args.steps,
                            samples_per_task=args.samples_per_task, queries=args.queries, holdout_fraction=args.holdout,
                            seed=args.seed, train_options=options)
    def _terminate(signum, frame):  # stop the servers and the store in order, as on Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    try:
        result = run_demo(settings, out_dir=args.out)
    except PipelineFailed as exc:
        raise CommandError(str(exc)) from None
    total = time.perf_counter() - started
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    print(f"\ndemo finished in {total / 60:.1f} min ({steps}); open {result.html}")
    return 0
