"""The locked sets of versions (requirements/lock-*.txt): write one from an environment whose
tests passed, or compare an environment with one. Run it with the environment's own python.

  python scripts/lock.py write LOCK --made-by "make lock"   every installed package, pinned
  python scripts/lock.py diff LOCK [--strict]               what differs; --strict: exit 1 when
                                                            a locked package has another version
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

PROJECT = "rlhf"  # installed editable from the checkout, never locked


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """name -> version of every distribution installed in this environment's site-packages
    but the project (not whatever else is on sys.path: Ray, once imported, adds its bundled
    third-party folder). Local labels are dropped (torch 2.13.0+cpu is locked as 2.13.0,
    which pip matches to it)."""
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    out = {}
    for dist in metadata.distributions(path=paths):
        name = canonical(dist.metadata["Name"] or "")
        if name and name != PROJECT:
            out[name] = dist.version.split("+")[0]
    return out


def read(lock: Path) -> dict[str, str]:
    pins = {}
    for n, line in enumerate(lock.read_text().splitlines(), start=1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version:
            sys.exit(f"{lock}:{n}: '{line}' is not NAME==VERSION; regenerate it with make lock")
        pins[canonical(name)] = version.strip()
    return pins


def write(lock: Path, made_by: str) -> None:
    pins = installed()
    head = [
        f"# The tested set of every package, direct and transitive ({len(pins)} pins), used as",
        "# pip constraints by scripts/install.sh: a fresh machine gets what CI tested. A package",
        "# missing here (one another Python or platform needs) installs unpinned.",
        f"# Made by `{made_by}` on {datetime.date.today()}, Python {platform.python_version()},",
        f"# {platform.system()} {platform.machine()}, from an environment whose tests passed.",
    ]
    lock.write_text("\n".join(head + [f"{k}=={v}" for k, v in sorted(pins.items())]) + "\n")
    print(f"wrote {lock}: {len(pins)} packages")


def diff(lock: Path, strict: bool) -> int:
    if not lock.exists():
        print(f"{lock}: no lock yet (make test-latest lock, or test-vllm-latest lock-vllm)")
        return 1 if strict else 0
    pins, have = read(lock), installed()
    changed = {k: (v, have[k]) for k, v in pins.items() if k in have and have[k] != v}
    for name, (want, got) in sorted(changed.items()):
        print(f"  {name}: {got} installed, {want} locked")
    for name in sorted(set(pins) - set(have)):
        print(f"  {name}: locked at {pins[name]}, not installed")
    for name in sorted(set(have) - set(pins)):
        print(f"  {name}: {have[name]} installed, not in the lock")
    same = len(set(pins) & set(have)) - len(changed)
    print(f"{lock}: {same} of {len(pins)} locked packages installed at their locked version")
    return 1 if strict and changed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    w = sub.add_parser("write", help="pin every installed package into LOCK")
    w.add_argument("lock", type=Path)
    w.add_argument("--made-by", default="scripts/lock.py write", help="the command, for the header")
    d = sub.add_parser("diff", help="compare the installed packages with LOCK")
    d.add_argument("lock", type=Path)
    d.add_argument("--strict", action="store_true", help="exit 1 when a version differs")
    args = parser.parse_args()
    if args.verb == "write":
        write(args.lock, args.made_by)
        return 0
    return diff(args.lock, args.strict)


if __name__ == "__main__":
    sys.exit(main())
