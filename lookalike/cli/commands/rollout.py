"""`lookalike rollout set|canary|promote|rollback|status`: move traffic between model versions."""
from __future__ import annotations

import argparse
from pathlib import Path

ORDER = 80


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollout", help="canary a new model version, promote it or roll it back",
                       description="Each step rewrites manifests/overlays/OVERLAY/rollout.yaml (commit it for "
                                   "GitOps) after rendering and validating the overlay; with --apply it also "
                                   "patches the live InferenceService through your kubeconfig. A canary "
                                   "changes the predictor's model (and index) version and sets "
                                   "canaryTrafficPercent: KServe splits traffic between the new revision and "
                                   "the last one that had 100%.",
                       epilog="Typical: rollout canary --model-version V --percent 10 --apply; watch; "
                              "rollout canary --model-version V --percent 50 --apply; rollout promote --apply "
                              "(or rollout rollback --apply).")
    verbs = p.add_subparsers(dest="rollout_verb", metavar="ACTION")

    st = verbs.add_parser("set", help="serve a version on all traffic at once (first deploy)",
                          description="Make MODEL_VERSION the stable version with no traffic split. For the first "
                                      "deploy, or a deliberate switch; the replaced version is kept for rollback.")
    _version_args(st)
    _common(st)
    st.set_defaults(func=_set)

    ca = verbs.add_parser("canary", help="send a percentage of traffic to a new model version",
                          description="Start a canary of MODEL_VERSION at PERCENT%% of traffic, or move the split "
                                      "of the running canary (same version, another --percent).")
    _version_args(ca)
    ca.add_argument("--percent", type=int, required=True, help="share of traffic for the new version, 0-100")
    _common(ca)
    ca.set_defaults(func=_canary)

    pr = verbs.add_parser("promote", help="give the canary all traffic",
                          description="The canary becomes the stable version: canaryTrafficPercent is removed.")
    _common(pr)
    pr.set_defaults(func=_promote)

    rb = verbs.add_parser("rollback", help="go back to the previous version",
                          description="During a canary: the previous version again, with 0%% to the newest "
                                      "revision, so traffic returns at once to the last fully rolled-out one. "
                                      "After a promote: the previous version is rolled out again.")
    _common(rb)
    rb.set_defaults(func=_rollback)

    ss = verbs.add_parser("status", help="what the manifest says, and with --live what the cluster reports")
    _common(ss, apply_help="also ask the cluster: readiness, URL and the predictor's traffic per revision")
    ss.add_argument("--live", dest="apply", action="store_true", help="same as --apply")
    ss.set_defaults(func=_status)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _version_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-version", required=True, help="a published model version (`lookalike store ls`)")
    parser.add_argument("--index-version", default=None,
                        help="an index version built for that model (default: the one its production index alias "
                             "names now, read from the store): the manifest pins it, so every pod serves the same "
                             "index and a rollback restores it (a new index can be canaried with the same "
                             "--model-version)")


def _common(parser: argparse.ArgumentParser, apply_help: str | None = None) -> None:
    parser.add_argument("--overlay", default="dev", metavar="NAME_OR_DIR",
                        help="overlay under manifests/overlays, or a kustomization folder (default dev)")
    parser.add_argument("--manifests", type=Path, default=None, metavar="DIR",
                        help="the Kustomize tree (default: $LOOKALIKE_MANIFESTS or this checkout's manifests/)")
    parser.add_argument("--apply", action="store_true",
                        help=apply_help or "also patch the live InferenceService (kubeconfig: --kubeconfig, "
                                           "KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file for --apply")
    parser.add_argument("--context", default=None, help="kubeconfig context for --apply")


def _step(args: argparse.Namespace, transition) -> int:
    from lookalike.deploy import rollout
    from lookalike.deploy.manifest_check import find_object

    before = rollout.read_state(args.overlay, args.manifests)
    after = transition(before)
    report = rollout.write_state(args.overlay, after, args.manifests)
    print(f"{rollout.rollout_file(args.overlay, args.manifests)}: {after.describe()}")
    for warning in report.warnings:
        print(f"  {warning}")
    if args.apply:
        isvc = find_object(report.objects, "InferenceService", rollout.ISVC_NAME)
        try:
            rollout.apply_patch(isvc, kubeconfig=args.kubeconfig, context=args.context)
        except rollout.RolloutError as exc:
            raise rollout.RolloutError(f"{exc}. The manifest is updated; apply it later with `kubectl apply -k` "
                                       f"or this command again") from None
        meta = isvc["metadata"]
        print(f"patched InferenceService {meta.get('namespace')}/{meta['name']}; watch it with "
              f"`lookalike rollout status --live --overlay {args.overlay}`")
    else:
        print("manifest only: commit it for GitOps, or re-run with --apply to patch the cluster")
    return 0


def _set(args: argparse.Namespace) -> int:
    from lookalike.deploy import rollout

    index = rollout.pin_index(args.model_version, args.index_version)
    return _step(args, lambda s: rollout.set_version(s, args.model_version, index))


def _canary(args: argparse.Namespace) -> int:
    from lookalike.deploy import rollout

    index = rollout.pin_index(args.model_version, args.index_version)
    return _step(args, lambda s: rollout.canary(s, args.model_version, args.percent, index))


def _promote(args: argparse.Namespace) -> int:
    from lookalike.deploy import rollout

    return _step(args, rollout.promote)


def _rollback(args: argparse.Namespace) -> int:
    from lookalike.deploy import rollout

    return _step(args, rollout.rollback)


def _status(args: argparse.Namespace) -> int:
    from lookalike.deploy import rollout
    from lookalike.deploy.manifest_check import find_object, render

    isvc = find_object(render(args.overlay, args.manifests), "InferenceService", rollout.ISVC_NAME)
    state = rollout.RolloutState.from_isvc(isvc)
    meta = isvc["metadata"]
    print(f"manifest ({rollout.rollout_file(args.overlay, args.manifests)}): {state.describe()}")
    if state.previous_model_version:
        print(f"  rollback target: model {state.previous_model_version} index {state.previous_index_version}")
    if not args.apply:
        return 0
    live = rollout.live_status(meta["name"], meta.get("namespace", "default"),
                               kubeconfig=args.kubeconfig, context=args.context)
    print(f"cluster ({meta.get('namespace')}/{meta['name']}): ready={live['ready']} url={live['url']}"
          + (f" ({live['reason']})" if live["reason"] and live["ready"] != "True" else ""))
    if live["state"] is not None:
        print(f"  live spec: {live['state'].describe()}")
        if live["state"] != state:
            print("  DIFFERS from the manifest: apply it (`kubectl apply -k` or a rollout step with --apply)")
    for entry in live["traffic"]:
        tags = ", ".join(t for t in (entry.get("tag"), "latest" if entry.get("latestRevision") else None) if t)
        print(f"  {entry.get('percent', 0):>3}% -> {entry.get('revisionName')}" + (f" ({tags})" if tags else ""))
    return 0
