"""Files of image ids (an audit's exclude-duplicates.txt, suspects.txt, leaked.txt) for `index build
--exclude` and `index remove --ids-file`.

One photo a line: `id<TAB>path`, the path relative to the dataset root (a backslash, tab, newline or
carriage return in it written `\\\\`, `\\t`, `\\n`, `\\r`), or a bare id. A line starting with `#` is a
comment, and so is the rest of a bare id's line after `#`; `# embeddings: FOLDER` names the embedding
folder the ids belong to. Ids start at 0 in every folder embedded without --id-start, so an id alone may
name a photo of another folder: where a line gives its path, the photo that id stands for in the folders
being changed must be that path, or the list is refused as written for another folder.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from carsearch.errors import CarsearchError
from carsearch.fsutil import write_text_atomic

FOLDER_LINE = "# embeddings: "
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


@dataclass
class IdList:
    """One id file: its ids, the path each line gives (where it gives one), the folder it names."""

    file: str
    ids: list[int] = field(default_factory=list)
    paths: dict[int, str] = field(default_factory=dict)
    folder: str | None = None


def escape_path(path: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in path)


def unescape_path(text: str) -> str:
    out, chars = [], iter(text)
    for c in chars:
        if c == "\\":
            nxt = next(chars, "")
            out.append(_UNESCAPES.get(nxt, "\\" + nxt))
        else:
            out.append(c)
    return "".join(out)


def write_id_list(path: Path, rows: Iterable[tuple[int, str]], folder: str | Path | None, about: str) -> None:
    """`path`: a header (what the photos are, the embedding folder), then `id<TAB>path` lines."""
    lines = [
        f"# {about}",
        *([f"{FOLDER_LINE}{folder}"] if folder is not None else []),
        "# id<TAB>path (relative to the dataset root); read by `carsearch index build --exclude FILE` "
        "and `carsearch index remove --ids-file FILE`",
        *(f"{i}\t{escape_path(p)}" for i, p in rows),
    ]
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_id_list(file: str | Path) -> IdList:
    """One id file (the format above)."""
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise CarsearchError(f"cannot read the id list {file}: {reason}.") from None
    listed = IdList(str(file))
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if line.lstrip().startswith("#"):
            if line.startswith(FOLDER_LINE):
                listed.folder = line[len(FOLDER_LINE) :].strip()
            continue
        head, tab, path = line.partition("\t")
        number = head.strip() if tab else line.split("#", 1)[0].strip()
        if not number:
            continue
        try:
            image_id = int(number)
        except ValueError:
            raise CarsearchError(
                f"{file}, line {n}: {number!r} is not an image id; the file lists one photo a line: an "
                "integer id, or id<TAB>path."
            ) from None
        listed.ids.append(image_id)
        if tab:
            listed.paths[image_id] = unescape_path(path)
    return listed


def read_id_files(
    files: list[str | Path], held: Iterable[tuple[str, np.ndarray, np.ndarray]] | None = None
) -> np.ndarray:
    """The image ids the files list (sorted, unique). `held`: (folder, ids, paths) chunks of the photos
    the ids are about to remove (see `shard_paths`); a line whose path differs from the photo its id
    stands for there is refused (check_paths)."""
    lists = [read_id_list(f) for f in files]
    if held is not None:
        check_paths(lists, held)
    return np.array(sorted({i for lst in lists for i in lst.ids}), dtype=np.int64)


def check_paths(lists: list[IdList], held: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Raises CarsearchError when a list gives an id a path other than the one the id has in `held`."""
    listed = {i: (lst, p) for lst in lists for i, p in lst.paths.items()}
    if not listed:
        return
    wanted = np.fromiter(listed, np.int64, len(listed))
    for folder, ids, paths in held:
        for row in np.flatnonzero(np.isin(ids, wanted)):
            lst, path = listed[int(ids[row])]
            if str(paths[row]) != path:
                named = f" ({lst.folder})" if lst.folder else ""
                raise CarsearchError(
                    f"{lst.file} lists id {int(ids[row])} as {path!r}, but in {folder} that id is "
                    f"{str(paths[row])!r}: the list was written for another embedding folder{named}; "
                    "use it only with the folder it was written for."
                )


def shard_paths(sources: Iterable) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(folder, ids, paths) of each shard of index build's sources (only ids and paths are read)."""
    from carsearch.embed.shards import read_shard_ids_and

    for source in sources:
        for entry in source.manifest["shards"]:
            ids, paths = read_shard_ids_and(source.folder / entry["file"], "paths")
            yield str(source.folder), ids, paths
