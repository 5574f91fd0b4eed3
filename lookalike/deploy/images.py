"""Pin an overlay's images by digest: the `images:` list of its kustomization.yaml, edited in place (its
comments kept), so `lookalike manifests pin-image` is the one way production's images move."""
from __future__ import annotations

import re
from pathlib import Path

from lookalike.deploy.policy_check import qualified
from lookalike.deploy.problems import ManifestError

_PINNED = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._/:-]*?)@(?P<digest>sha256:[0-9a-f]{64})$")


def pin_image(kustomization: Path, name: str, pinned: str) -> str:
    """Point image `name` (as the base names it, e.g. lookalike/predictor) at `pinned`, a fully qualified
    REGISTRY/NAME@sha256:DIGEST; return the entry's new text. Refuses a tag or a bare name."""
    match = _PINNED.match(pinned)
    if not match or not qualified(match["name"]):
        raise ManifestError(f"{pinned!r} is not REGISTRY/NAME@sha256:<64 hex digits> (a digest, not a tag: the "
                            f"one `docker push` printed, or `docker buildx imagetools inspect IMAGE:TAG`)")
    lines = kustomization.read_text().splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip() in (f"  - name: {name}", f"- name: {name}")
                     and any(x.startswith("images:") for x in lines[:i]))
    except StopIteration:
        raise ManifestError(f"{kustomization} has no images entry named {name!r}") from None
    indent = lines[start][:len(lines[start]) - len(lines[start].lstrip())] + "  "
    end = start + 1
    while end < len(lines) and lines[end].startswith(indent) and not lines[end].lstrip().startswith("- "):
        end += 1
    entry = [lines[start], f"{indent}newName: {match['name']}\n", f"{indent}digest: {match['digest']}\n"]
    kustomization.write_text("".join(lines[:start] + entry + lines[end:]))
    return "".join(entry)
