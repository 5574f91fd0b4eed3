"""The emoji development catalog: a colour, multi-view catalog of emoji RENDERS (not photographs).

Why this file is long: it is one importer from four sources of different formats (a WebP tarball, two
SVG tarballs, a colour font), each read, rasterised and framed the same way, plus the concept list and
its labels from Unicode's data; split, each part would be a few dozen lines that only this import uses.

Fashion-MNIST has one 28-px grey photo per listing; this catalog exercises what it cannot show: colour,
resolution and several photos per listing. Each listing is one emoji concept (one Unicode code point
sequence, e.g. `emoji-1f34e` "red apple"); its photos are the drawings of that concept by several design
sets, every one installed from a package registry:

    set        what                                  licence        where it comes from
    fluent     Microsoft Fluent Emoji 3D, 256-px WebP  MIT            npm `@lobehub/fluent-emoji-3d`
    twemoji    Twemoji, SVG                            CC-BY 4.0      npm `@discordapp/twemoji`
    openmoji   OpenMoji, colour SVG                    CC-BY-SA 4.0   npm `openmoji`
    noto       Noto Color Emoji, a colour font         OFL 1.1        Debian's `fonts-noto-color-emoji`

Names, groups and subgroups come from Unicode's `emoji-test.txt` (Debian's `unicode-data`). The npm
tarballs are fetched by install.sh with `npm pack` into `$LOOKALIKE_HOME/sources/` (or `--sources DIR`)
and read straight from the tarball; nothing is installed into node_modules.

Every render is framed the same way: trimmed to its drawing, scaled so the longer side fills 88% of a
256x256 canvas, centred, on white, RGB, PNG. The catalog then holds, per listing::

    {"listing_id": "emoji-1f34e", "title": "red apple",
     "labels": {"group": "Food & Drink", "subgroup": "food-fruit", "color": "red"},
     "metadata": {"kind": "render", "codepoints": "1F34E"},
     "images": [{"uri": "s3://…/catalogs/emoji/images/emoji-1f34e/fluent.png", "photo_id": "fluent",
                 "source": "catalog"}, …]}

- Concepts: the fully-qualified sequences of emoji-test.txt, in its order, without skin-tone variants
  (the one neutral render of each concept is kept) and without the `Component` group (bare skin tones and
  hair styles). A concept becomes a listing only when at least two catalog sets render it.
- `color` only where the name itself states a colour ("green book", "blue heart", "red apple"; "light
  blue heart" is blue, "grey"/"gray" is grey); a colour that names hair or something the subject holds
  ("man: red hair", "person with white cane") is not the subject's colour and gives none.
- Hold-out: one design set (noto unless told otherwise) is not in the catalog. It stands in for "the photos
  a shopper takes": a second catalog `emoji-shopper` with the same listing ids, one photo each, source
  `user_photo`, for evaluating search across a domain the catalog never saw. These are still renders.

Images are uploaded first, each catalog's JSONL last, so a catalog is never visible half-imported; images
already in the store are not rendered again.

Why one file: it is one importer read top to bottom (concepts and labels, one renderer per design set,
finding the sources, the import), each part small and used by no other module.
"""
from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from lookalike.core.settings import home
from lookalike.core.s3 import ObjectStore
from lookalike.catalogs.layout import attribution_key, catalog_key, image_key, images_prefix
from lookalike.catalogs.rows import CatalogError

log = logging.getLogger(__name__)

CATALOG_NAME = "emoji"
SHOPPER_CATALOG_NAME = "emoji-shopper"
DEFAULT_HOLDOUT = "noto"
SIZE = 256
MARGIN = 0.06  # of the canvas on each side: the drawing fills the middle 88%

EMOJI_TEST_PATHS = (Path("/usr/share/unicode/emoji/emoji-test.txt"),)
NOTO_FONT_PATHS = (Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),)
NOTO_BITMAP_SIZE = 109  # the one size of the font's CBDT colour bitmaps: any other size fails to load

SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
VARIATION_SELECTOR_16 = 0xFE0F


@dataclass(frozen=True)
class DesignSet:
    name: str        # the photo_id of its renders
    title: str
    license: str
    origin: str      # where it installs from, in words
    how_to_get: str  # the command that fetches it


DESIGN_SETS: dict[str, DesignSet] = {s.name: s for s in (
    DesignSet("fluent", "Microsoft Fluent Emoji 3D", "MIT", "npm package @lobehub/fluent-emoji-3d",
              "npm pack @lobehub/fluent-emoji-3d@1.1.0 --pack-destination {sources}"),
    DesignSet("twemoji", "Twemoji", "CC-BY-4.0", "npm package @discordapp/twemoji",
              "npm pack @discordapp/twemoji@16.0.1 --pack-destination {sources}"),
    DesignSet("openmoji", "OpenMoji", "CC-BY-SA-4.0", "npm package openmoji",
              "npm pack openmoji@17.0.0 --pack-destination {sources}"),
    DesignSet("noto", "Noto Color Emoji", "OFL-1.1", "Debian package fonts-noto-color-emoji",
              "apt-get install fonts-noto-color-emoji"),
)}

# The npm sets: the tarball `npm pack` writes, and where in it the images are.
_NPM_TARBALLS = {
    "fluent": ("lobehub-fluent-emoji-3d-*.tgz", "package/assets/", ".webp"),
    "twemoji": ("discordapp-twemoji-*.tgz", "package/dist/svg/", ".svg"),
    "openmoji": ("openmoji-*.tgz", "package/color/svg/", ".svg"),
}

# The colour words a name may state, and the label each gives.
COLOR_WORDS = {"red": "red", "orange": "orange", "yellow": "yellow", "green": "green", "blue": "blue",
               "purple": "purple", "brown": "brown", "black": "black", "white": "white", "pink": "pink",
               "grey": "grey", "gray": "grey"}
_COLOR_RE = re.compile(r"\b(" + "|".join(COLOR_WORDS) + r")\b")
# A colour of something else than the subject: "man: red hair", "person with white cane".
_NOT_THE_SUBJECTS = re.compile(r"\b(" + "|".join(COLOR_WORDS) + r")\s+hair\b|\bwith\b.*")


def default_sources_dir() -> Path:
    """Where install.sh puts the npm tarballs: $LOOKALIKE_HOME/sources (LOOKALIKE_HOME=.lookalike)."""
    return home() / "sources"


# ---- concepts and labels ---------------------------------------------------------------------------

def color_of(name: str) -> str | None:
    """The colour a CLDR name states ("red apple" → red), or None ("grapes", "man: red hair")."""
    text = _NOT_THE_SUBJECTS.sub(" ", name.lower())
    found = _COLOR_RE.search(text)
    return COLOR_WORDS[found.group(1)] if found else None


def sequence_key(codepoints: Iterable[int]) -> str:
    """Lower-case hex code points joined by '-', without U+FE0F (design sets disagree on keeping it)."""
    return "-".join(f"{c:x}" for c in codepoints if c != VARIATION_SELECTOR_16)


@dataclass(frozen=True)
class Concept:
    codepoints: tuple[int, ...]  # the fully-qualified sequence
    name: str                    # Unicode's CLDR short name, e.g. "red apple"
    group: str
    subgroup: str

    @property
    def key(self) -> str:
        return sequence_key(self.codepoints)

    @property
    def listing_id(self) -> str:
        return f"emoji-{self.key}"

    @property
    def text(self) -> str:
        return "".join(map(chr, self.codepoints))

    @property
    def color(self) -> str | None:
        return color_of(self.name)

    def labels(self) -> dict[str, str]:
        labels = {"group": self.group, "subgroup": self.subgroup}
        if self.color:
            labels["color"] = self.color
        return labels

    def metadata(self) -> dict[str, str]:
        return {"kind": "render", "codepoints": " ".join(f"{c:04X}" for c in self.codepoints)}


_TEST_LINE = re.compile(r"^([0-9A-Fa-f ]+?)\s*;\s*([a-z-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(.+?)\s*$")


def read_emoji_test(path: str | Path) -> list[Concept]:
    """The concepts of Unicode's emoji-test.txt, in its order: fully-qualified sequences only, no
    skin-tone variants, no `Component` group."""
    concepts, group, subgroup = [], "", ""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            match = _TEST_LINE.match(line)
            if not match or match.group(2) != "fully-qualified" or group == "Component":
                continue
            codepoints = tuple(int(c, 16) for c in match.group(1).split())
            if SKIN_TONES.intersection(codepoints):
                continue
            concepts.append(Concept(codepoints, match.group(3), group, subgroup))
    if not concepts:
        raise CatalogError(f"{path} holds no emoji: is it Unicode's emoji-test.txt?")
    return concepts


# ---- rendering -------------------------------------------------------------------------------------

class RenderError(Exception):
    """One concept could not be drawn by one design set (blank, or not a single glyph)."""


def frame(drawing: Image.Image, size: int = SIZE, margin: float = MARGIN) -> Image.Image:
    """Trim a drawing with transparency to what is drawn, fit it in the middle of a white RGB square."""
    rgba = drawing.convert("RGBA")
    box = rgba.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if box is None:
        raise RenderError("the render is blank")
    rgba = rgba.crop(box)
    inner = size * (1 - 2 * margin)
    scale = inner / max(rgba.size)
    w, h = max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale))
    rgba = rgba.resize((w, h), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((size - w) // 2, (size - h) // 2))
    return canvas.convert("RGB")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Renderer:
    """One design set: which concepts it has, and a framed RGB render of one."""

    name: str
    version: str = ""

    def has(self, concept: Concept) -> bool:
        raise NotImplementedError

    def render(self, concept: Concept, size: int = SIZE) -> Image.Image:
        raise NotImplementedError


class PackageRenderer(Renderer):
    """A set of image files inside an npm tarball (WebP or SVG), keyed by their code point file names."""

    def __init__(self, name: str, tarball: Path, prefix: str, suffix: str):
        self.name, self.tarball = name, tarball
        self.version = tarball.name.removesuffix(".tgz").rsplit("-", 1)[-1]
        self.files: dict[str, bytes] = {}
        with tarfile.open(tarball, "r:gz") as tar:  # one pass: the images are a few tens of MB in all
            for member in tar:
                if member.isfile() and member.name.startswith(prefix) and member.name.endswith(suffix):
                    stem = member.name[len(prefix):-len(suffix)]
                    try:
                        key = sequence_key(int(part, 16) for part in stem.split("-"))
                    except ValueError:  # a set's own extras, not Unicode emoji
                        continue
                    self.files[key] = tar.extractfile(member).read()
        if not self.files:
            raise CatalogError(f"{tarball} holds no {suffix} files under {prefix}: is it the right package?")
        self.svg = suffix == ".svg"

    def has(self, concept: Concept) -> bool:
        return concept.key in self.files

    def render(self, concept: Concept, size: int = SIZE) -> Image.Image:
        data = self.files[concept.key]
        if self.svg:
            import resvg_py

            try:  # drawn at twice the size, then framed down: smoother edges than drawing at the size
                data = resvg_py.svg_to_bytes(svg_string=data.decode("utf-8"), width=2 * size, height=2 * size,
                                             skip_system_fonts=True)
            except ValueError as exc:
                raise RenderError(f"cannot rasterise the SVG: {exc}") from exc
        return frame(Image.open(io.BytesIO(bytes(data))), size)


class NotoRenderer(Renderer):
    """Noto Color Emoji drawn by Pillow (its CBDT bitmaps, 136x128 at size 109), framed up to `size`."""

    name = "noto"

    def __init__(self, font_path: Path):
        self.font = ImageFont.truetype(str(font_path), NOTO_BITMAP_SIZE)
        self.advance = self.font.getlength("\U0001F34E")
        self.lock = threading.Lock()  # one FreeType face: draw from one thread at a time

    def has(self, concept: Concept) -> bool:
        # A sequence the font does not ligate comes out as several glyphs side by side: not the concept.
        with self.lock:
            return self.font.getlength(concept.text) <= 1.5 * self.advance

    def render(self, concept: Concept, size: int = SIZE) -> Image.Image:
        with self.lock:
            left, top, right, bottom = self.font.getbbox(concept.text)
            canvas = Image.new("RGBA", (right - left + 8, bottom - top + 8), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((4 - left, 4 - top), concept.text, font=self.font, embedded_color=True)
        return frame(canvas, size)


# ---- sources ---------------------------------------------------------------------------------------

@dataclass
class EmojiSources:
    """What this machine has: Unicode's emoji list and a renderer per design set found."""

    emoji_test: Path | None
    renderers: dict[str, Renderer]
    missing: dict[str, str]  # design set (or "unicode-data") → how to get it
    sources_dir: Path

    def require_emoji_test(self) -> Path:
        if self.emoji_test is None:
            raise CatalogError("Unicode's emoji-test.txt is missing: " + self.missing["unicode-data"])
        return self.emoji_test


def _first_file(candidates: Iterable[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def _have_rasteriser() -> bool:
    try:
        import resvg_py  # noqa: F401
    except ImportError:
        return False
    return True


def _version_key(path: Path) -> tuple:
    version = path.name.removesuffix(".tgz").rsplit("-", 1)[-1]
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def find_sources(sources_dir: str | Path | None = None, sets: Sequence[str] | None = None) -> EmojiSources:
    """Look for Unicode's emoji list and each design set; say how to get whatever is missing.

    npm tarballs are looked for in `sources_dir` (default $LOOKALIKE_HOME/sources); the Debian files in
    their Debian places, or in `sources_dir` (emoji-test.txt, NotoColorEmoji.ttf) on other systems.
    """
    sources = Path(sources_dir) if sources_dir is not None else default_sources_dir()
    wanted = list(sets) if sets is not None else list(DESIGN_SETS)
    unknown = [s for s in wanted if s not in DESIGN_SETS]
    if unknown:
        raise CatalogError(f"unknown design set(s) {', '.join(unknown)}; choose from {', '.join(DESIGN_SETS)}")
    missing: dict[str, str] = {}
    emoji_test = _first_file([*EMOJI_TEST_PATHS, sources / "emoji-test.txt"])
    if emoji_test is None:
        missing["unicode-data"] = ("install Debian's unicode-data package (`apt-get install unicode-data`, "
                                   f"or run ./install.sh), or put Unicode's emoji-test.txt in {sources}/")
    renderers: dict[str, Renderer] = {}
    for name in wanted:
        spec = DESIGN_SETS[name]
        how = spec.how_to_get.format(sources=sources)
        if name == "noto":
            font = _first_file([*NOTO_FONT_PATHS, sources / "NotoColorEmoji.ttf"])
            if font is None:
                missing[name] = f"{spec.title} ({spec.origin}) is missing: `{how}` (or run ./install.sh)"
            else:
                renderers[name] = NotoRenderer(font)
            continue
        pattern, prefix, suffix = _NPM_TARBALLS[name]
        tarballs = sorted(sources.glob(pattern), key=_version_key)
        if suffix == ".svg" and not _have_rasteriser():
            missing[name] = (f"{spec.title} is SVG and the rasteriser resvg-py is not installed: "
                             "`pip install -e '.[training]'`")
        elif not tarballs:
            missing[name] = (f"{spec.title} ({spec.origin}) is missing from {sources}/: `{how}` "
                             f"(./install.sh does this when npm is on the PATH)")
        else:
            renderers[name] = PackageRenderer(name, tarballs[-1], prefix, suffix)
    return EmojiSources(emoji_test, renderers, missing, sources)


# ---- the import ------------------------------------------------------------------------------------

@dataclass
class EmojiImportResult:
    catalog_uri: str
    shopper_uri: str | None
    listings: int
    photos: dict[str, int]            # design set → photos in the catalog
    heldout_set: str
    heldout_photos: int
    labels: dict[str, Counter]        # group / subgroup / color → counts of listings
    seconds: float
    missing: dict[str, str] = field(default_factory=dict)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (listing id, set, why)

    def __str__(self) -> str:
        photos = ", ".join(f"{s} {n}" for s, n in self.photos.items())

        def counts(task: str, top: int | None = None) -> str:
            common = self.labels[task].most_common()
            text = ", ".join(f"{value} {n}" for value, n in common[:top])
            return text + (f", … ({len(common) - top} more)" if top is not None and len(common) > top else "")

        lines = [
            f"imported {self.listings} listings (renders, not photographs) into {self.catalog_uri}: "
            f"{sum(self.photos.values())} photos ({photos})",
            (f"held out {self.heldout_photos} {self.heldout_set} renders as shopper photos in {self.shopper_uri}"
             if self.shopper_uri else f"no shopper catalog: the held-out set {self.heldout_set} is missing"),
            f"labels: group on every listing ({counts('group')}); subgroup: {len(self.labels['subgroup'])} values "
            f"({counts('subgroup', 5)}); color on {sum(self.labels['color'].values())} listings "
            f"({counts('color') or 'none'})",
            f"took {self.seconds:.1f} s",
        ]
        if self.failed:
            lines.append(f"{len(self.failed)} renders failed and were left out, e.g. "
                         + "; ".join(f"{lid} {s}: {why}" for lid, s, why in self.failed[:3]))
        lines += [f"missing: {how}" for how in self.missing.values()]
        return "\n".join(lines)


def spread_over_groups(concepts: list, limit: int) -> list:
    """`limit` concepts taken in turn from each Unicode group (each group in Unicode's order), returned in
    Unicode's order: every group is represented as evenly as its size allows."""
    by_group: dict[str, list] = {}
    for c in concepts:
        by_group.setdefault(c.group, []).append(c)
    picked: set[int] = set()
    queues = [list(reversed(members)) for members in by_group.values()]
    while len(picked) < min(limit, len(concepts)):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.add(id(queue.pop()))
    return [c for c in concepts if id(c) in picked]


def import_emoji(store: ObjectStore, *, sources: EmojiSources | str | Path | None = None,
                 sets: Sequence[str] | None = None, holdout_set: str = DEFAULT_HOLDOUT, limit: int | None = None,
                 groups: Sequence[str] | None = None, size: int = SIZE, name: str = CATALOG_NAME,
                 shopper_name: str = SHOPPER_CATALOG_NAME, workers: int = 4, progress: bool = True,
                 skip_existing: bool = True) -> EmojiImportResult:
    """Render the emoji concepts with every design set found and import them as catalog `name`, the
    held-out set as `shopper_name` (see the module docstring for the layout and the labels).

    `sets` limits the design sets (default: all four); a set that is missing here is reported with how to
    get it and the others are imported, as long as two catalog sets remain. `groups` keeps Unicode groups
    by name ("Food & Drink"); `limit` keeps N listings spread over every group (`spread_over_groups`:
    deterministic, and a quick slice still has every group to learn, which a prefix of Unicode's order,
    all smileys, would not).
    """
    started = time.perf_counter()
    if limit is not None and limit <= 0:
        raise CatalogError(f"--limit must be positive, got {limit}")
    if holdout_set not in DESIGN_SETS:
        raise CatalogError(f"unknown held-out set {holdout_set!r}; choose from {', '.join(DESIGN_SETS)}")
    wanted = list(dict.fromkeys(sets if sets is not None else DESIGN_SETS))
    if holdout_set not in wanted:
        wanted.append(holdout_set)
    if not isinstance(sources, EmojiSources):
        sources = find_sources(sources, wanted)
    for how in sources.missing.values():
        log.warning("%s", how)
    concepts = read_emoji_test(sources.require_emoji_test())
    if groups:
        known = {c.group for c in concepts}
        unknown = [g for g in groups if g not in known]
        if unknown:
            raise CatalogError(f"unknown emoji group(s) {unknown}; Unicode's groups are {sorted(known)}")
        concepts = [c for c in concepts if c.group in groups]

    catalog_sets = [s for s in wanted if s != holdout_set and s in sources.renderers]
    if len(catalog_sets) < 2:
        raise CatalogError(
            f"a multi-view catalog needs two design sets besides the held-out {holdout_set}; found "
            f"{', '.join(catalog_sets) or 'none'}. " + " ".join(sources.missing.values()))
    renderers = sources.renderers
    holdout = renderers.get(holdout_set)
    chosen = [c for c in concepts if sum(renderers[s].has(c) for s in catalog_sets) >= 2]
    if limit is not None:
        chosen = spread_over_groups(chosen, limit)
    if not chosen:
        raise CatalogError("no emoji concept is drawn by two of the design sets found")

    store.check()  # nothing is rendered for a store that is down or refuses us
    rendered: dict[tuple[str, str], bool] = {}  # (listing id, set) → uploaded
    failed: list[tuple[str, str, str]] = []
    plan = [(s, name) for s in catalog_sets] + ([(holdout_set, shopper_name)] if holdout is not None else [])
    for set_name, catalog in plan:
        renderer = renderers[set_name]
        todo = [c for c in chosen if renderer.has(c)]
        present = set(store.iter(images_prefix(catalog))) if skip_existing else set()

        def job(concept: Concept, renderer=renderer, catalog=catalog, present=present
                ) -> tuple[Concept, str | None]:
            key = _image_key(catalog, concept, renderer.name)
            if key in present:
                return concept, None
            try:
                body = png_bytes(renderer.render(concept, size))
            except (RenderError, OSError, ValueError) as exc:
                return concept, str(exc)
            store.put_bytes(key, body, content_type="image/png")
            return concept, None

        for concept, why in _run(job, todo, workers, progress, desc=f"{set_name} → {catalog}"):
            rendered[(concept.listing_id, set_name)] = why is None
            if why is not None:
                failed.append((concept.listing_id, set_name, why))
    for lid, set_name, why in failed:
        log.warning("left out %s's %s render: %s", lid, set_name, why)

    listings, photos = [], Counter()
    for concept in chosen:
        have = [s for s in catalog_sets if rendered.get((concept.listing_id, s))]
        if len(have) < 2:
            continue
        photos.update(have)
        listings.append(_listing(store, name, concept, have, "catalog"))
    if not listings:
        raise CatalogError("no listing has two readable renders; nothing was published")
    kept = {row["listing_id"] for row in listings}
    shopper = [_listing(store, shopper_name, c, [holdout_set], "user_photo") for c in chosen
               if c.listing_id in kept and rendered.get((c.listing_id, holdout_set))]

    # The attribution the licences ask for, then each catalog's JSONL, last.
    store.put_bytes(attribution_key(name), _attribution(renderers, catalog_sets).encode(),
                    content_type="text/markdown")
    catalog_uri = _write_jsonl(store, name, listings)
    shopper_uri = None
    if shopper:
        store.put_bytes(attribution_key(shopper_name),
                        _attribution(renderers, [holdout_set]).encode(), content_type="text/markdown")
        shopper_uri = _write_jsonl(store, shopper_name, shopper)

    labels = {task: Counter(row["labels"][task] for row in listings if task in row["labels"])
              for task in ("group", "subgroup", "color")}
    return EmojiImportResult(catalog_uri, shopper_uri, len(listings), {s: photos[s] for s in catalog_sets},
                             holdout_set, len(shopper), labels, time.perf_counter() - started,
                             dict(sources.missing), failed)


def _image_key(catalog: str, concept: Concept, set_name: str) -> str:
    return image_key(catalog, concept.listing_id, set_name, ".png")


def _listing(store: ObjectStore, catalog: str, concept: Concept, sets: Sequence[str], source: str) -> dict:
    return {"listing_id": concept.listing_id, "title": concept.name, "labels": concept.labels(),
            "metadata": concept.metadata(),
            "images": [{"uri": store.uri(_image_key(catalog, concept, s)), "photo_id": s, "source": source}
                       for s in sets]}


def _write_jsonl(store: ObjectStore, catalog: str, listings: list[dict]) -> str:
    key = catalog_key(catalog)
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in listings).encode("utf-8")
    store.put_bytes(key, body, content_type="application/x-ndjson")
    return store.uri(key)


def _attribution(renderers: dict[str, Renderer], sets: Sequence[str]) -> str:
    lines = ["# Emoji renders (not photographs)", "",
             "Each image is a render of an emoji by one design set, framed on white at 256 px:", ""]
    for s in sets:
        spec, version = DESIGN_SETS[s], renderers[s].version
        lines.append(f"- `{s}`: {spec.title}{' ' + version if version else ''}, {spec.origin}, "
                     f"licence {spec.license}.")
    lines += ["", "Names, groups and subgroups: Unicode's emoji-test.txt (the Unicode license for data files).", ""]
    return "\n".join(lines)


def _run(job: Callable[[Concept], tuple[Concept, str | None]], concepts: list[Concept], workers: int,
         progress: bool, desc: str) -> Iterable[tuple[Concept, str | None]]:
    """Render and upload on a thread pool with a progress bar; a store failure stops everything."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(concepts), desc=desc, unit="img", disable=not progress) as bar:
        try:
            for result in pool.map(job, concepts):
                bar.update()
                yield result
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # no catalog follows a failed upload
            raise


def import_command(args) -> int:
    """`lookalike catalog import emoji`: the import on the configured store, then its summary."""
    from lookalike.core.s3 import connect

    result = import_emoji(connect(), sources=args.sources, sets=args.sets, holdout_set=args.holdout_set,
                          limit=args.limit, groups=args.groups, workers=args.workers)
    print(result, flush=True)
    return 0
