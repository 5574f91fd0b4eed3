"""`lookalike store up|status|ls`: the embedded S3 server and a look inside the store."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from lookalike.cli.commands import stop_on_sigterm
from lookalike.core.settings import home


ORDER = 10


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="run the embedded S3 server, or look inside the store",
                       description="The object store: `up` starts a real S3 server on loopback (rclone), "
                                   "disk-backed so artifacts survive a restart; `status` checks the configured "
                                   "store; `ls` lists published models, indexes and catalogs.")
    verbs = p.add_subparsers(dest="store_verb", metavar="ACTION")
    up = verbs.add_parser("up", help="start the embedded S3 server in the foreground (Ctrl-C stops it)",
                          description="Start `rclone serve s3` on 127.0.0.1, serving DATA_DIR. Prints the "
                                      "endpoint and the LOOKALIKE_S3_* variables to export.")
    up.add_argument("--data-dir", type=Path, default=None,
                    help="where objects live on disk (default: $LOOKALIKE_HOME/s3, LOOKALIKE_HOME=.lookalike)")
    up.add_argument("--port", type=int, default=9000, help="port on 127.0.0.1 (default 9000)")
    up.add_argument("--access-key", default=None, help="access key (default: $LOOKALIKE_S3_ACCESS_KEY or lookalike)")
    up.add_argument("--secret-key", default=None,
                    help="secret key (default: $LOOKALIKE_S3_SECRET_KEY or lookalike-secret)")
    up.set_defaults(func=_up)
    st = verbs.add_parser("status", help="check that the configured store answers and the bucket exists")
    st.set_defaults(func=_status)
    ls = verbs.add_parser("ls", help="list catalogs, model versions, aliases and index versions")
    ls.set_defaults(func=_ls)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _up(args: argparse.Namespace) -> int:
    from lookalike.core.s3 import S3Settings
    from lookalike.core.store_server import EmbeddedS3Server

    env = S3Settings.from_env()
    server = EmbeddedS3Server(
        args.data_dir or home() / "s3", port=args.port,
        access_key=args.access_key or env.access_key, secret_key=args.secret_key or env.secret_key,
        bucket=env.bucket)
    settings = server.start()
    print(f"S3 server up at {settings.url}, bucket {settings.bucket!r}, data in {server.data_dir}")
    print("Use it from another shell with:")
    for key, value in settings.to_env().items():
        print(f"  export {key}={value}")
    print("Ctrl-C stops it.", flush=True)
    stop = stop_on_sigterm()
    try:
        while not stop.is_set() and server.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        print("S3 server stopped; objects stay in", server.data_dir)
    return 0


def _status(args: argparse.Namespace) -> int:
    from lookalike.core.s3 import connect

    store = connect()
    print(f"ok: {store.settings.url} bucket {store.bucket!r} answers")
    return 0


def _ls(args: argparse.Namespace) -> int:
    from lookalike.core.artifacts import index_repo, model_repo
    from lookalike.core.s3 import connect

    store = connect()
    catalogs = sorted({k.split("/")[1] for k in store.iter("catalogs/", recursive=False)
                       if k.count("/") >= 1 and k.split("/")[1]})
    print("catalogs:", ", ".join(catalogs) or "none")
    models = model_repo(store)
    aliases = models.aliases()
    for version in models.versions():
        tags = [a for a, v in aliases.items() if v == version]
        indexes = index_repo(store, version).versions()
        shown_tags = "  [" + ", ".join(tags) + "]" if tags else ""
        print(f"model {version}{shown_tags}  indexes: {', '.join(indexes) or 'none'}")
    if not models.versions():
        print("models: none")
    return 0
