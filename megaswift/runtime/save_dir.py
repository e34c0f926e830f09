"""`--save`: the checks made before any work, and the staged write every command publishes with.

A `--save` that is (or holds, or sits inside) the input would be overwritten or, with
`--overwrite true`, deleted; a file or an unwritable place would only fail after the work,
with a traceback. Symlinks are resolved, so a link to the model is the model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch.distributed as dist


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


@contextlib.contextmanager
def staged(out: Path, overwrite: bool = False):
    """Build an output directory under a hidden sibling name and rename it into place only when
    the body finishes; on any error the partial directory is removed and `out` is untouched.

    Collective when torch.distributed is initialised: every rank gets the same staging path,
    rank 0 creates, publishes and cleans up, and barriers keep the ranks in step.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank0 = not distributed or dist.get_rank() == 0
    name = [f".{out.name}.partial-{int(time.time() * 1e3)}"]
    if distributed and dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)
    stage = out.parent / name[0]
    if rank0:
        stage.mkdir(parents=True)
    if distributed:
        dist.barrier()
    try:
        yield stage
        if distributed:
            dist.barrier()
        if rank0:
            if out.exists() and overwrite:
                shutil.rmtree(out)
            stage.rename(out)
        if distributed:
            dist.barrier()
    except BaseException:
        if rank0:
            shutil.rmtree(stage, ignore_errors=True)
        raise
