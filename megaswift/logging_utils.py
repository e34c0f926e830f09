"""Console logging for commands: rank 0 only unless asked, timestamped, to stderr."""

from __future__ import annotations

import os
import sys
import time

import torch.distributed as dist

_T0 = time.time()


_LEVEL = 20   # logging.INFO: what log() writes at


def set_level(level: int) -> None:
    """--logging_level: log() lines are INFO; a higher level silences them (and Python logging)."""
    import logging

    global _LEVEL
    _LEVEL = level
    logging.getLogger().setLevel(level)


def log(msg: str, all_ranks: bool = False) -> None:
    if _LEVEL > 20:
        return
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))  # torchrun sets it
    if rank == 0 or all_ranks:
        prefix = f"[{time.time() - _T0:7.1f}s]" + (f"[rank {rank}]" if all_ranks else "")
        print(f"{prefix} {msg}", file=sys.stderr, flush=True)
