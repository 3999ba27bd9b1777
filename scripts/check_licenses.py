"""List the licence of every runtime dependency and fail on any outside the allow-list.

The tools do the generic work: pip installs ``requirements.txt`` into a fresh
virtualenv (the same set the Docker image gets, so everything in it but pip itself is
a runtime dependency), pip-licenses reads each package's licence declarations from its
installed metadata (``--from=all``), and license-expression parses SPDX expressions.
This script keeps only smart's own rules: which licences are allowed, and how the
non-SPDX declarations map onto them. pip-licenses reports up to three per package:

- ``License-Expression``: an SPDX expression (PEP 639), the most precise;
- ``License-Metadata``: the free-text ``License`` field, mapped through FREE_TEXT;
- ``License-Classifier``: trove classifiers, mapped through CLASSIFIERS. They name a
  family ("BSD License", "Apache Software License") without a version or variant.

Every declaration a package makes must be allowed, and it must make at least one.
An unknown free-text or classifier string fails the check until someone reads that
licence and adds a mapping here.

Policy (ALLOWED): permissive licences only, plus MPL-2.0. MPL-2.0 (certifi) is a
weak, file-level copyleft: its conditions bind only the MPL-covered files themselves,
which smart neither modifies nor links into anything of its own, and those files ship
as readable source inside the installed package, which satisfies the obligation to
make the Source Code Form available. GPL, LGPL and AGPL fail the check and need a
decision by a person.

Prints a Markdown document (the content of docs/LICENSES.md) on stdout, problems on
stderr; exits 1 if any package fails.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from license_expression import AND, OR, ExpressionError, LicenseExpression, get_spdx_licensing

ROOT = Path(__file__).resolve().parent.parent

ALLOWED = {
    "MIT",
    "MIT-0",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "BSD",  # classifier "BSD License": some BSD variant, all of them permissive
    "0BSD",
    "Apache-2.0",
    "Apache",  # classifier "Apache Software License": unversioned, permissive
    "ISC",
    "PSF-2.0",
    "Python-2.0",
    "Unlicense",
    "ZPL-2.1",  # Zope Public License 2.1: permissive, BSD-like (zope.interface/.event)
    "MPL-2.0",  # weak, file-level copyleft; see the module docstring
}

# Trove classifiers as pip-licenses prints them (the last segment).
CLASSIFIERS = {
    "MIT License": "MIT",
    "MIT No Attribution License (MIT-0)": "MIT-0",
    "BSD License": "BSD",
    "Apache Software License": "Apache",
    "ISC License (ISCL)": "ISC",
    "Python Software Foundation License": "PSF-2.0",
    "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
    "Zope Public License": "ZPL-2.1",
    "The Unlicense (Unlicense)": "Unlicense",
    "GNU General Public License v2 (GPLv2)": "GPL-2.0",
    "GNU General Public License v3 (GPLv3)": "GPL-3.0",
    "GNU Lesser General Public License v3 (LGPLv3)": "LGPL-3.0",
}

# Free-text License fields that are not SPDX ids. Add one only after reading the
# package's licence file (protobuf's LICENSE is the 3-clause BSD text).
FREE_TEXT = {
    "3-Clause BSD License": "BSD-3-Clause",  # protobuf
    "BSD License": "BSD",
    "Apache 2.0": "Apache-2.0",
    "Apache License 2.0": "Apache-2.0",
    "Apache License, Version 2.0": "Apache-2.0",
    "ZPL 2.1": "ZPL-2.1",
    "PSF": "PSF-2.0",
}

UNKNOWN = "UNKNOWN"
# Free text that could be an expression; anything else (a whole licence pasted into the
# field) is not parsed at all.
SPDX_LIKE = re.compile(r"[A-Za-z0-9.+() -]+")
# In the fresh virtualenv, everything but these came from the requirements.
NOT_RUNTIME = ("pip", "setuptools", "wheel")

_LICENSING = get_spdx_licensing()


class LicenceError(ValueError):
    """A declaration that cannot be understood; the message says which."""


@dataclass(frozen=True)
class Verdict:
    name: str
    version: str
    licence: str
    declared: str
    problems: tuple[str, ...]


def spdx_allowed(expression: str) -> bool:
    """Whether an SPDX expression is allowed: AND needs every side allowed, OR one.

    Not validated against the SPDX list: the classifier families ("BSD", "Apache")
    are symbols of their own here. An exception (``WITH``) only grants permissions.
    """
    try:
        parsed = _LICENSING.parse(expression)
    except ExpressionError as error:
        raise LicenceError(f"malformed SPDX expression {expression!r}: {error}") from None
    if parsed is None:
        raise LicenceError(f"empty SPDX expression {expression!r}")
    return _allowed(parsed)


def _allowed(node: LicenseExpression) -> bool:
    if isinstance(node, AND):
        return all(_allowed(part) for part in node.args)
    if isinstance(node, OR):
        return any(_allowed(part) for part in node.args)
    symbol = getattr(node, "license_symbol", node)  # "X WITH exception" -> X
    return str(symbol.key) in ALLOWED


def judge(entry: dict[str, str]) -> Verdict:
    """Resolve one pip-licenses entry: every declaration made must be allowed."""
    try:
        return _judge(entry)
    except LicenceError as error:
        return Verdict(entry["Name"], entry["Version"], UNKNOWN, "", (str(error),))


def _judge(entry: dict[str, str]) -> Verdict:
    expression = entry.get("License-Expression", UNKNOWN)
    metadata = entry.get("License-Metadata", UNKNOWN)
    classifiers = entry.get("License-Classifier", UNKNOWN)
    declared: list[str] = []
    problems: list[str] = []
    resolved: list[str] = []

    if expression != UNKNOWN:
        declared.append(f"expression: {expression}")
        resolved.append(expression)
        if not spdx_allowed(expression):
            problems.append(f"licence expression {expression!r} is not allowed")
    if metadata != UNKNOWN:
        declared.append(f"metadata: {metadata}")
        spdx = FREE_TEXT.get(metadata, metadata)
        try:
            if not SPDX_LIKE.fullmatch(spdx):
                raise LicenceError(spdx)
            allowed = spdx_allowed(spdx)
        except LicenceError:
            problems.append(f"License field {metadata[:60]!r}: not SPDX, not in FREE_TEXT")
        else:
            resolved.append(spdx)
            if not allowed:
                problems.append(f"License field {metadata[:60]!r} is not allowed")
    if classifiers != UNKNOWN:
        declared.append(f"classifier: {classifiers}")
        for classifier in classifiers.split("; "):
            family = CLASSIFIERS.get(classifier)
            if family is None:
                problems.append(f"classifier {classifier!r} is not in CLASSIFIERS")
            elif family not in ALLOWED:
                problems.append(f"classifier {classifier!r} is not allowed")
            else:
                resolved.append(family)
    if not declared:
        problems.append("declares no licence at all")
    # The most precise declaration names the licence; classifier families ("BSD",
    # "Apache") only when nothing more precise was declared.
    licence = resolved[0] if resolved else UNKNOWN
    return Verdict(entry["Name"], entry["Version"], licence, "; ".join(declared), tuple(problems))


def run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"failed: {' '.join(command)}")
    return result.stdout


def markdown_cell(text: str, limit: int = 120) -> str:
    """Free-text licence fields can hold a whole licence: one line, no pipes."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def render(verdicts: list[Verdict], requirements: Path) -> str:
    lines = [
        "# Licences of the runtime dependencies",
        "",
        f"Every package that `pip install -r {requirements.name}` installs (the contents",
        "of the Docker image besides the standard library), with its licence.",
        "Generated by `make licenses` (scripts/check_licenses.py); CI fails when a",
        "licence is not on the allow-list.",
        "",
        "Allowed: " + ", ".join(sorted(ALLOWED, key=str.lower)) + ". All are permissive",
        "except MPL-2.0 (certifi), a weak, file-level copyleft: its conditions bind only",
        "the MPL-covered files, which smart does not modify, and which ship as readable",
        "source inside the installed package. GPL, LGPL and AGPL need a person's decision.",
        '"BSD" or "Apache" without a version means the package declares only a trove',
        "classifier, which names the family and not the variant.",
        "",
        "| Package | Version | Licence | Declared as |",
        "| --- | --- | --- | --- |",
    ]
    for v in verdicts:
        cells = (v.name, v.version, v.licence, v.declared)
        lines.append("| " + " | ".join(markdown_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def installed_licences(requirements: Path, venv: Path) -> list[dict[str, str]]:
    """pip-licenses' entries for what ``requirements`` installs into ``venv``."""
    python = venv / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    run([*pip, "install", "--requirement", str(requirements)])
    pip_licenses = Path(sys.executable).parent / "pip-licenses"
    report = run(
        [
            str(pip_licenses),
            f"--python={python}",
            "--from=all",
            # pip-licenses hides its own helpers (e.g. wcwidth) unless told; in this
            # virtualenv every package but pip's own is a runtime dependency.
            "--with-system",
            "--ignore-packages",
            *NOT_RUNTIME,
            "--format=json",
        ]
    )
    return sorted(json.loads(report), key=lambda e: e["Name"].lower())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requirements", type=Path, default=ROOT / "requirements.txt")
    parser.add_argument(
        "--venv",
        type=Path,
        help="reuse (or create) this virtualenv for the runtime install instead of a throwaway one",
    )
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smart-licences-") as scratch:
        venv = arguments.venv or Path(scratch) / "venv"
        verdicts = [judge(e) for e in installed_licences(arguments.requirements, venv)]

    sys.stdout.write(render(verdicts, arguments.requirements))
    failures = [v for v in verdicts if v.problems]
    for verdict in failures:
        for problem in verdict.problems:
            print(f"licence check: {verdict.name} {verdict.version}: {problem}", file=sys.stderr)
    print(
        f"licence check: {len(verdicts)} runtime packages, {len(failures)} not allowed",
        file=sys.stderr,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
