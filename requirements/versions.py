"""Print the versions an environment resolved to and how they differ from the lock (``make test-latest``).

Run with the environment's own interpreter. The lock is the list ``make setup`` installs through ``pip install -c``;
this report is how drift (a newer release inside pyproject's ranges) shows up before users meet it.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

KEY_PACKAGES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "tokenizers", "huggingface-hub")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--against", type=Path, help="a lock file to compare with")
    args = parser.parse_args(argv)
    have = installed()
    print(f"Python {sys.version.split()[0]}; " + ", ".join(f"{n} {have.get(n, 'missing')}" for n in KEY_PACKAGES))
    if args.against is None or not args.against.exists():
        return 0
    locked = read_lock(args.against)
    changed = {n: (v, have[n]) for n, v in locked.items() if n in have and have[n].split("+")[0] != v.split("+")[0]}
    new = sorted(n for n in have if n not in locked and n not in ("flora-hf", "pip", "setuptools", "wheel", "torch"))
    if not changed and not new:
        print(f"same versions as {args.against}")
        return 0
    print(f"differs from {args.against}:")
    for name, (old, now) in sorted(changed.items()):
        print(f"  {name}: {old} -> {now}")
    for name in new:
        print(f"  {name}: not in the lock -> {have[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
