"""`lookalike manifests validate|render`: the Kustomize overlays, rendered and checked offline."""
from __future__ import annotations

import argparse
from pathlib import Path

ORDER = 70


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("manifests", help="render the Kubernetes manifests, or validate them offline",
                       description="The Kustomize tree in manifests/ (base + overlays). `validate` renders each "
                                   "overlay with `kubectl kustomize` and checks every object: built-in kinds with "
                                   "kubernetes-validate --strict, KServe kinds against the KServe CRD schemas "
                                   "($LOOKALIKE_KSERVE_SCHEMAS, else manifests/schemas/kserve) plus KServe's "
                                   "admission rules and the rollout annotations. No cluster needed.")
    verbs = p.add_subparsers(dest="manifests_verb", metavar="ACTION")
    val = verbs.add_parser("validate", help="render and validate overlays (all of them by default)",
                           description="Exit status 1 when any overlay has an error; warnings (e.g. a Secret "
                                       "that must exist in the cluster) are printed but do not fail.")
    val.add_argument("--overlay", action="append", default=None, metavar="NAME_OR_DIR",
                     help="an overlay name under manifests/overlays or a kustomization folder; repeatable "
                          "(default: every overlay)")
    val.add_argument("--kubernetes-version", default=None,
                     help="Kubernetes release the built-in kinds are checked against (default: the newest "
                          "kubernetes-validate knows)")
    _add_root(val)
    val.set_defaults(func=_validate)
    ren = verbs.add_parser("render", help="print one overlay rendered (what `kubectl apply -k` would send)")
    ren.add_argument("--overlay", default="dev", metavar="NAME_OR_DIR", help="overlay to render (default dev)")
    _add_root(ren)
    ren.set_defaults(func=_render)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _add_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifests", type=Path, default=None, metavar="DIR",
                        help="the Kustomize tree (default: $LOOKALIKE_MANIFESTS or this checkout's manifests/)")


def _validate(args: argparse.Namespace) -> int:
    from lookalike.deploy import manifest_check as mc

    overlays = args.overlay or mc.list_overlays(args.manifests)
    if not overlays:
        raise mc.ManifestError(f"no overlays under {(args.manifests or mc.manifests_dir()) / 'overlays'}")
    failed = 0
    for overlay in overlays:
        report = mc.validate_overlay(overlay, args.manifests,
                                     kubernetes_version=args.kubernetes_version or mc.DEFAULT_KUBERNETES_VERSION)
        print("\n".join(report.lines()), flush=True)
        failed += not report.ok
    print(f"{len(overlays) - failed} of {len(overlays)} overlays valid (KServe schemas: {mc.kserve_schema_dir()})")
    return 1 if failed else 0


def _render(args: argparse.Namespace) -> int:
    from lookalike.deploy import manifest_check as mc

    print(mc.render_text(args.overlay, args.manifests), end="")
    return 0
