"""Checks on `--save` made before any work, shared by export and training.

A `--save` that is (or holds, or sits inside) the input would be overwritten or, with
`--overwrite true`, deleted; a file or an unwritable place would only fail after the work,
with a traceback. Symlinks are resolved, so a link to the model is the model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_save(save: str, inputs: dict[str, str | None], *, contains: bool = True,
               staged: bool = False) -> Path:
    """The resolved `--save`, or a ValueError/FileExistsError naming the flags and the fix.

    `inputs`: flag -> directory that must survive (absent paths, e.g. hub ids, are skipped).
    `contains`: also refuse a `--save` that holds an input (export replaces it whole).
    `staged`: output is built in a sibling of `--save` (export), so that parent must be writable.
    """
    out = Path(save).expanduser().resolve()
    for flag, src in inputs.items():
        if not src or not Path(src).expanduser().exists():
            continue
        inp = Path(src).expanduser().resolve()
        relation = ("is" if out == inp else "lies inside" if inp in out.parents
                    else "contains" if contains and out in inp.parents else None)
        if relation:
            raise ValueError(f"--save {save} {relation} {flag} {src}: writing there would overwrite "
                             f"the input; choose a --save outside {inp}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--save {save} is a file, not a directory; remove it or choose "
                              "a directory path")
    _check_writable(save, out.parent if staged else out)
    return out


def _check_writable(save: str, path: Path) -> None:
    """Create (and remove) a directory where the output will go: the only test that also holds
    for root, whom permission bits do not stop (read-only mounts, /proc, ...)."""
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise FileExistsError(f"--save {save}: {path} is a file, not a directory; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".megaswift-write-test-", dir=path))
    except OSError as e:
        raise ValueError(f"--save {save}: cannot create directories in {path} ({e.strerror or e}); "
                         "choose a writable location") from None
