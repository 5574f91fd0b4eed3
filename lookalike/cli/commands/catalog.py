"""`lookalike catalog import|validate|show`: bring product images into the store and check catalogs."""
from __future__ import annotations

import argparse
from pathlib import Path

ORDER = 20

_URI_HELP = ("an s3:// URI, a local path, or a catalog name in the configured bucket "
             "(e.g. fashion-mnist-train = s3://$LOOKALIKE_S3_BUCKET/catalogs/fashion-mnist-train/catalog.jsonl)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("catalog", help="import product images as a catalog, validate or inspect one",
                       description="Catalogs are JSONL files of listings, one per line (listing_id, title, labels, "
                                   "metadata, and one or more photos in images), with their photos under "
                                   "catalogs/<name>/ in the store. Photos are uploaded first and catalog.jsonl "
                                   "last, so a catalog is never visible half-imported.")
    verbs = p.add_subparsers(dest="catalog_verb", metavar="ACTION")

    imp = verbs.add_parser("import", help="import Fashion-MNIST or a folder of your own images",
                           description="Import product images into the store as a catalog.")
    sources = imp.add_subparsers(dest="import_source", metavar="SOURCE")
    fm = sources.add_parser(
        "fashion-mnist", help="Debian's dataset-fashion-mnist: 60k train + 10k test product images",
        description="Turn Fashion-MNIST (Zalando product images, from Debian's dataset-fashion-mnist) into two "
                    "catalogs: fashion-mnist-train (60k) and fashion-mnist-test (10k, kept apart for evaluation). "
                    "Labels: fine_category (10 classes), category (tops, bottoms, dresses, outerwear, footwear, "
                    "bags) and a sparse derived `shade` on about 15% of rows. A full import takes a few minutes.")
    fm.add_argument("--limit", type=int, default=None, metavar="N",
                    help="import at most N rows per split, a seeded class-stratified slice (quick demos)")
    fm.add_argument("--split", choices=("train", "test", "both"), default="both", help="which split(s) (default both)")
    fm.add_argument("--seed", type=int, default=0, help="seed of the slice and of which rows carry `shade`")
    fm.add_argument("--workers", type=int, default=16, help="parallel uploads (default 16)")
    fm.set_defaults(func=_import_fashion_mnist)

    fo = sources.add_parser(
        "folder", help="your own folder of JPEG/PNG/WebP images",
        description="Import DIR as catalog NAME. Without a CSV each image is a listing, labelled by its sub-folder "
                    "(DIR/<label>/<image>, as task --task). With --labels-csv the CSV says which photos make each "
                    "listing: one row per photo (`listing_id,filename,title,<column>,…`, paths relative to DIR), "
                    "or every photo in a `filenames` cell separated by ';', or `listing_id,…` alone for "
                    "DIR/<listing_id>.<ext>. A `title` column is the listing's title; every other column is a "
                    "label to learn unless --label-columns / --metadata-columns say which are labels and which "
                    "are metadata to show (url, price, …). An empty cell is a missing value. Unreadable files "
                    "are skipped and each is reported by name, as is a listing left without a photo.")
    fo.add_argument("directory", type=Path, metavar="DIR", help="the folder of images")
    fo.add_argument("--name", required=True, help="catalog name: catalogs/NAME/ in the store")
    fo.add_argument("--labels-csv", type=Path, default=None, metavar="CSV",
                    help="the listings: their photos, title, labels and metadata (see above)")
    fo.add_argument("--label-columns", type=_columns, default=None, metavar="A,B",
                    help="CSV columns that are labels to learn (default: every column but the id, file and "
                         "title columns, and those of --metadata-columns)")
    fo.add_argument("--metadata-columns", type=_columns, default=None, metavar="A,B",
                    help="CSV columns that are metadata an app shows, e.g. title,url,price (default: none, or "
                         "every column not in --label-columns when that is given)")
    fo.add_argument("--task", default="category", help="task named by sub-folders (default category)")
    fo.add_argument("--source", choices=("catalog", "user_photo"), default="catalog",
                    help="catalog: sellers' photos (default); user_photo: shoppers' photos of their items")
    fo.add_argument("--workers", type=int, default=16, help="parallel uploads (default 16)")
    fo.set_defaults(func=_import_folder)

    em = sources.add_parser(
        "emoji", help="a colour, multi-view development catalog of emoji renders (not photographs)",
        description="Emoji concepts as listings (title: the Unicode name; labels: group, subgroup, and color where "
                    "the name states one), each with one render per design set as its photos: Fluent Emoji 3D, "
                    "Twemoji, OpenMoji (npm tarballs that ./install.sh puts in $LOOKALIKE_HOME/sources) and Noto "
                    "Color Emoji (Debian). These are renders, not photographs. The held-out set becomes the "
                    "catalog emoji-shopper (same listing ids, source user_photo) for evaluation; the rest the "
                    "catalog emoji. A full import takes a few minutes.")
    em.add_argument("--limit", type=int, default=None, metavar="N",
                    help="N listings spread over every emoji group (deterministic)")
    em.add_argument("--sets", nargs="+", default=None, metavar="SET",
                    help="design sets to use: fluent twemoji openmoji noto (default: all)")
    em.add_argument("--holdout-set", default="noto", metavar="SET",
                    help="the set held out as shoppers' photos (default noto)")
    em.add_argument("--groups", nargs="+", default=None, metavar="GROUP",
                    help="keep these Unicode groups only, e.g. 'Food & Drink' Objects")
    em.add_argument("--sources", type=Path, default=None, metavar="DIR",
                    help="where the npm tarballs are (default $LOOKALIKE_HOME/sources)")
    em.add_argument("--workers", type=int, default=4, help="parallel renders and uploads (default 4)")

    def import_emoji(args: argparse.Namespace) -> int:
        from lookalike.catalogs.emoji import import_command

        return import_command(args)

    em.set_defaults(func=import_emoji)
    imp.set_defaults(func=lambda args: (imp.print_help(), 2)[1])

    va = verbs.add_parser("validate", help="check every listing and photo of a catalog; exit 1 listing each problem",
                          description="Report every problem with its line number: bad JSON, missing fields, "
                                      "label values that are not strings, metadata values that are not strings, "
                                      "numbers or booleans, a photo listed twice, a listing id on two lines, "
                                      "conflicting labels, missing or unreadable photos, a listing with no "
                                      "readable photo, a task with a single class. Exit code 1 when bad.")
    va.add_argument("uri", metavar="URI", help=_URI_HELP)
    va.add_argument("--no-images", action="store_true", help="check rows only, do not read images (fast)")
    va.add_argument("--max-problems", type=int, default=1000, help="list at most this many problems (default 1000)")
    va.set_defaults(func=_validate)

    sh = verbs.add_parser("show", help="listings, photos, sources, tasks and label counts of a catalog",
                          description="Summarise a catalog: listings and photos, sources, metadata fields, and "
                                      "for each task its labelled photos and the count of each label.")
    sh.add_argument("uri", metavar="URI", help=_URI_HELP)
    sh.set_defaults(func=_show)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _columns(text: str) -> list[str]:
    columns = [c.strip() for c in text.split(",") if c.strip()]
    if not columns:
        raise argparse.ArgumentTypeError("name at least one column, e.g. category,color")
    return columns


def _import_fashion_mnist(args: argparse.Namespace) -> int:
    from lookalike.core.s3 import connect
    from lookalike.catalogs.importers import import_fashion_mnist

    store = connect()
    splits = ("train", "test") if args.split == "both" else (args.split,)
    uris = import_fashion_mnist(store, split_names=splits, limit=args.limit, seed=args.seed, workers=args.workers)
    for split, uri in uris.items():
        print(f"{split}: {uri}")
    return 0


def _import_folder(args: argparse.Namespace) -> int:
    from lookalike.core.s3 import connect
    from lookalike.catalogs.importers import import_folder

    store = connect()
    result = import_folder(store, args.directory, args.name, labels_csv=args.labels_csv, task=args.task,
                           source=args.source, label_columns=args.label_columns,
                           metadata_columns=args.metadata_columns, workers=args.workers)
    print(result)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from lookalike.catalogs.rows import validate_catalog
    from lookalike.catalogs.importers import resolve_catalog_uri

    uri = resolve_catalog_uri(args.uri)
    report = validate_catalog(uri, check_images=not args.no_images)
    print(f"{uri}: {report.summary(max_problems=args.max_problems)}")
    if report.ok:
        print("ok" + (" (images not checked)" if args.no_images else ""))
        return 0
    return 1


def _show(args: argparse.Namespace) -> int:
    from collections import Counter

    from lookalike.catalogs.rows import Catalog, validate_catalog
    from lookalike.catalogs.importers import resolve_catalog_uri

    uri = resolve_catalog_uri(args.uri)
    catalog = Catalog.open(uri, strict=False)
    listings = catalog.listings()
    print(f"{uri}: {len(listings)} listings, {len(catalog)} photos "
          f"(up to {max((len(p) for p in listings.values()), default=0)} per listing)")
    sources = Counter(row.source for row in catalog.rows)
    print("sources: " + ", ".join(f"{s} {n}" for s, n in sorted(sources.items())))
    fields = Counter(name for photos in listings.values() for name in photos[0].metadata)
    titled = sum(1 for photos in listings.values() if photos[0].title)
    print(f"titles: {titled} listings" + ("; metadata: " + ", ".join(f"{f} {n}" for f, n in sorted(fields.items()))
                                           if fields else ""))
    for task, vocab in catalog.tasks().items():
        counts = Counter(row.labels[task] for row in catalog.rows_with(task))
        total = sum(counts.values())
        print(f"task {task}: {total} labelled photos ({total / max(len(catalog), 1):.0%}), {len(vocab)} classes")
        for label in vocab:
            print(f"  {label}: {counts[label]}")
    bad = validate_catalog(uri, check_images=False).problems
    if bad:
        print(f"{len(bad)} problems (bad lines are not counted above): run `lookalike catalog validate {args.uri}`")
        return 1
    return 0
