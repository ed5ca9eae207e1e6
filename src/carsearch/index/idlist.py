"""Files of image ids (an audit's exclude-duplicates.txt, suspects.txt, leaked.txt) for `index build
--exclude` and `index remove --ids-file`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carsearch.errors import CarsearchError


def read_id_files(files: list[str | Path]) -> np.ndarray:
    """Image ids listed in text files, one per line (blank lines and `#` comments ignored)."""
    ids: list[int] = []
    for f in files:
        try:
            lines = Path(f).read_text().splitlines()
        except OSError as e:
            raise CarsearchError(f"cannot read the id list {f}: {e.strerror or e}.") from None
        for n, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                ids.append(int(text))
            except ValueError:
                raise CarsearchError(
                    f"{f}, line {n}: {text!r} is not an image id; the file lists one integer id per line."
                ) from None
    return np.array(sorted(set(ids)), dtype=np.int64)
