"""Opening a GGUF file that is whole: a truncated download or copy fails here, naming the
tensor that runs past the end, instead of later as garbage weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def open_whole_gguf(path: Path) -> Any:
    """gguf's GGUFReader over `path`; ValueError (or what gguf raises on a foreign file) when
    a tensor extends past the end of the file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size:
            raise ValueError(f"tensor {t.name} extends past the end of the file")
    return reader
