"""Maps the rooms into the one import name `lookalike` (everything else is in pyproject.toml).

The design card's folders keep their place at the top of the tree and install as subpackages:
`transformer/` is `lookalike.transformer`, `training/` is `lookalike.training`, and so on; the rest of
the namespace (core, catalogs, serving, cli, app, deploy) lives in `lookalike/` itself. A container image
copies only the rooms it runs (the transformer's has no `training/` nor `predictor/`), so the packages are
found among the folders present rather than listed.
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOMS = {
    "lookalike": "lookalike",
    "lookalike.transformer": "transformer",
    "lookalike.training": "training",
    "lookalike.predictor": "predictor",
    "lookalike.pipelines": "pipelines",
}
HERE = Path(__file__).parent
present = {name: folder for name, folder in ROOMS.items() if (HERE / folder / "__init__.py").is_file()}
packages = [name for name in present]
for name, folder in present.items():
    packages += [f"{name}.{sub}" for sub in find_packages(str(HERE / folder))]

setup(package_dir=present, packages=packages)
