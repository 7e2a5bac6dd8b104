"""The lock files bin/bootstrap installs from still fit pyproject.toml, and every pin is
hashed. Before, bootstrap installed whatever release satisfied the floors, unverified:
there was no lock to drift from, so this failed for want of one."""

from __future__ import annotations

import pathlib
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[2]
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def wanted(dev: bool) -> list[Requirement]:
    """What a lock must satisfy: the build requirements, the runtime ones, with dev the
    dev and otel extras (the suite tests tracing)."""
    data = pyproject()
    build = data["build-system"]
    project = data["project"]
    assert isinstance(build, dict) and isinstance(project, dict)
    specs: list[str] = [*build["requires"], *project["dependencies"]]
    if dev:
        extras = project["optional-dependencies"]
        specs += [*extras["dev"], *extras["otel"]]
    return [Requirement(s) for s in specs]


def entries(lock: str) -> list[tuple[Requirement, list[str]]]:
    """Each requirement of a lock with its hash options (continuation lines joined)."""
    text = (ROOT / "requirements" / lock).read_text()
    lines = [line.split("#", 1)[0].strip() for line in text.replace("\\\n", " ").splitlines()]
    found: list[tuple[Requirement, list[str]]] = []
    for line in filter(None, lines):
        spec, _, options = line.partition(" --")
        assert not spec.startswith("-"), f"{lock}: only pinned requirements belong here: {line}"
        found.append((Requirement(spec), HASH.findall("--" + options)))
    return found


def pins(lock: str) -> dict[NormalizedName, list[Version]]:
    found: dict[NormalizedName, list[Version]] = {}
    for req, _ in entries(lock):
        (spec,) = req.specifier
        found.setdefault(canonicalize_name(req.name), []).append(Version(spec.version))
    return found


@pytest.mark.parametrize("lock", ["runtime.lock", "dev.lock"])
def test_every_requirement_is_pinned_exactly_with_a_hash(lock: str) -> None:
    found = entries(lock)
    assert found, f"{lock} pins nothing"
    for req, hashes in found:
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{lock}: {req} is not a pin"
        assert hashes, f"{lock}: {req} has no --hash=sha256: (bootstrap uses --require-hashes)"


@pytest.mark.parametrize(("lock", "dev"), [("runtime.lock", False), ("dev.lock", True)])
def test_the_lock_satisfies_pyproject(lock: str, dev: bool) -> None:
    found = pins(lock)
    for req in wanted(dev):
        versions = found.get(canonicalize_name(req.name))
        assert versions, f"{req.name} is in pyproject.toml but not in {lock}: run bin/lock"
        for version in versions:
            assert req.specifier.contains(version, prereleases=True), (
                f"{lock} pins {req.name}=={version}, pyproject.toml wants {req}: run bin/lock"
            )


def test_dev_keeps_the_runtime_pins() -> None:
    runtime, dev = pins("runtime.lock"), pins("dev.lock")
    moved = {name: (v, dev.get(name)) for name, v in runtime.items() if dev.get(name) != v}
    assert not moved, f"dev.lock tests other versions than runtime.lock installs: {moved}"
