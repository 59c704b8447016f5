"""An mkdocs hook: lays the package out as pip installs it, for the API reference.

mkdocstrings reads the sources with griffe, statically, and griffe finds a package by
its folders; it does not follow setuptools' `package_dir`, by which `transforms/` and
`pipelines/` are installed as `codeclm_beam.transforms` and `codeclm_beam.pipelines`.
So before the build, `build/docs-api/codeclm_beam/` is made of links: the core's files,
and each mapped package under its installed name, read from `setup.py` itself.
"""
import ast
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYOUT = os.path.join(ROOT, "build", "docs-api")


def package_dirs() -> dict:
    """`setup()`'s `package_dir`, as written in setup.py."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "package_dir":
            return ast.literal_eval(node.value)
    raise RuntimeError("setup.py has no package_dir")


def on_startup(**_):
    shutil.rmtree(LAYOUT, ignore_errors=True)
    mapping = package_dirs()
    package = os.path.join(LAYOUT, "codeclm_beam")
    os.makedirs(package)
    core = os.path.join(ROOT, mapping["codeclm_beam"])
    for name in os.listdir(core):
        if name != "__pycache__":
            os.symlink(os.path.join(core, name), os.path.join(package, name))
    for installed, folder in mapping.items():
        if installed != "codeclm_beam":
            sub = installed.split(".", 1)[1]
            os.symlink(os.path.join(ROOT, folder), os.path.join(package, sub))
