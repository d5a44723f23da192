"""Regenerate the Python protocol modules in ``mbt_core/wire/protocol`` from ``proto/``.

    python proto/generate.py            # rewrite the committed modules
    python proto/generate.py --out DIR  # write elsewhere (the staleness test compares)

The ``.proto`` files are the source of truth; the generated modules are committed so that an
install needs no code generator, and a test fails when they no longer match.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE_DIR = ROOT / "mbt_core" / "wire" / "protocol"
IMPORT_PREFIX = "mbt_core.wire.protocol."


def generate(out: Path) -> list[Path]:
    """Generate every ``.proto`` under proto/ into ``out``; return the written files."""
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = sorted(p for p in out.rglob("*") if p.suffix in (".py", ".pyi"))
    # protoc writes imports relative to proto/ ("from mbt.v1 import ...", "from
    # grpc.reflection.v1 import ..."): make those of the generated packages absolute.
    packages = sorted({".".join(p.parent.relative_to(out).parts) for p in written})
    local = re.compile(rf"^from ({'|'.join(map(re.escape, packages))}) import", flags=re.M)
    for path in written:
        path.write_text(local.sub(rf"from {IMPORT_PREFIX}\1 import", path.read_text()))
    folders = {out, *(f for p in written for f in p.relative_to(out).parents)}
    for folder in folders:
        (out / folder / "__init__.py").touch()
    return written


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
