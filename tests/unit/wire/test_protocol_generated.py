"""The committed protocol modules must be exactly what proto/generate.py makes of proto/."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_generated_code_matches_the_proto_files(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = module.generate(tmp_path)
    assert fresh, "no .proto files found"
    committed = ROOT / "mbt_core" / "wire" / "protocol"
    for path in fresh:
        rel = path.relative_to(tmp_path)
        assert (committed / rel).read_text() == path.read_text(), (
            f"{rel} is stale: run `python proto/generate.py` and commit the result"
        )
