"""`lookalike manifests validate|render|alerts|dev-secrets|pin-image`: the Kustomize overlays, rendered and
checked offline; the alerts and dashboard generated; the dev credentials generated; production's images pinned."""
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
                                   "admission rules and the rollout annotations, PrometheusRule against its CRD, "
                                   "the autoscaling plan and least privilege (credentials, digests, "
                                   "NetworkPolicies, RBAC). No cluster needed.")
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
    gen = verbs.add_parser("alerts", help="write the alerts and the dashboard into manifests/monitoring",
                           description="Generates prometheusrule.yaml (the Prometheus Operator's kind), rules.yml "
                                       "(the same rules for a plain Prometheus) and dashboard.json (Grafana) from "
                                       "lookalike/deploy/alerts.py and dashboard.py.")
    gen.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed file is stale")
    _add_root(gen)
    gen.set_defaults(func=_alerts)
    dev = verbs.add_parser("dev-secrets", help="generate the dev overlays' store credentials (random, git-ignored)",
                           description="Writes one random S3 key per unit (MinIO root, serving, pipelines) into "
                                       "overlays/dev*/credentials/*.env, which the dev overlays' secretGenerators "
                                       "read; existing keys are kept unless --rotate.")
    dev.add_argument("--rotate", action="store_true", help="replace every key (re-apply both dev overlays after)")
    _add_root(dev)
    dev.set_defaults(func=_dev_secrets)
    pin = verbs.add_parser("pin-image", help="pin one of an overlay's images by digest",
                           description="Edits the overlay's kustomization.yaml `images:` entry for NAME to "
                                       "REGISTRY/NAME@sha256:DIGEST (a digest, never a tag).")
    pin.add_argument("image", metavar="NAME=REGISTRY/NAME@sha256:DIGEST")
    pin.add_argument("--overlay", default="production", metavar="NAME_OR_DIR", help="default production")
    _add_root(pin)
    pin.set_defaults(func=_pin_image)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _add_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifests", type=Path, default=None, metavar="DIR",
                        help="the Kustomize tree (default: $LOOKALIKE_MANIFESTS or this checkout's manifests/)")


def _ensure_dev_credentials(root: Path | None) -> None:
    """The dev overlays render only with their generated keys: write any that are missing, and say so."""
    from lookalike.deploy import manifest_check as mc
    from lookalike.deploy.dev_credentials import write_dev_credentials

    for path in write_dev_credentials(root or mc.manifests_dir()):
        print(f"generated dev credentials: {path}", flush=True)


def _validate(args: argparse.Namespace) -> int:
    from lookalike.deploy import manifest_check as mc

    _ensure_dev_credentials(args.manifests)
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

    _ensure_dev_credentials(args.manifests)
    print(mc.render_text(args.overlay, args.manifests), end="")
    return 0


def _alerts(args: argparse.Namespace) -> int:
    from lookalike.deploy import alerts, dashboard
    from lookalike.deploy import manifest_check as mc

    folder = (args.manifests or mc.manifests_dir()) / "monitoring"
    files = {folder / "prometheusrule.yaml": alerts.dump(alerts.prometheus_rule()),
             folder / "rules.yml": alerts.dump(alerts.rules_file()), folder / "dashboard.json": dashboard.render()}
    stale = [path for path, text in files.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"stale: {path} (run `lookalike manifests alerts`)")
        return 1 if stale else 0
    for path in stale:
        path.write_text(files[path])
        print(f"wrote {path}")
    print(f"{len(alerts.ALERTS)} alerts, {len(dashboard.queries())} dashboard queries; {len(stale)} files changed")
    return 0


def _dev_secrets(args: argparse.Namespace) -> int:
    from lookalike.deploy import manifest_check as mc
    from lookalike.deploy.dev_credentials import write_dev_credentials

    written = write_dev_credentials(args.manifests or mc.manifests_dir(), rotate=args.rotate)
    for path in written:
        print(f"wrote {path}")
    print(f"{len(written)} credential files written" + ("" if written else " (all present; --rotate replaces them)"))
    return 0


def _pin_image(args: argparse.Namespace) -> int:
    from lookalike.deploy import manifest_check as mc
    from lookalike.deploy.images import pin_image

    name, sep, pinned = args.image.partition("=")
    if not sep:
        raise mc.ManifestError(f"{args.image!r}: expected NAME=REGISTRY/NAME@sha256:DIGEST")
    path = mc.overlay_path(args.overlay, args.manifests) / "kustomization.yaml"
    print(pin_image(path, name, pinned), end="")
    return 0
