"""``trainer export``'s entry point: resolve the source, check the output, write it atomically
with the writer ``--to`` names (:mod:`.to_gguf` or :mod:`.to_hf`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer_core.errors import UserError
from trainer_core.export import atomic_output, check_output, resolve_source


def run_export(src: str, to: str, output: str, gguf_type: str | None = None,
               dtype: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Export ``src`` to ``output``; returns a summary (path, bytes, seconds, what was written)."""
    import time

    start = time.perf_counter()
    dest = Path(output).expanduser()
    if to == "gguf":
        if dtype is not None:
            raise UserError("--dtype applies to --to hf; for --to gguf use --type")
        from trainer_core.export.to_gguf import write_gguf

        source = resolve_source(src)
        check_output(dest, overwrite, source.path, directory=False)
        with atomic_output(dest) as tmp:
            summary = write_gguf(source, tmp, gguf_type or "f16")
        size = dest.stat().st_size
    elif to == "hf":
        if gguf_type is not None:
            raise UserError("--type applies to --to gguf; for --to hf use --dtype")
        from trainer_core.export.to_hf import write_hf

        source = resolve_source(src)
        check_output(dest, overwrite, source.path, directory=True)
        with atomic_output(dest) as tmp:
            summary = write_hf(source, tmp, dtype)
        size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    else:
        raise UserError(f"--to {to}: unknown format; choose gguf or hf")
    return {"output": str(dest), "bytes": size, "seconds": round(time.perf_counter() - start, 2),
            "source": str(source.path), "architecture": source.architecture, **summary}

