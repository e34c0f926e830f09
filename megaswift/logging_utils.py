"""Console logging for commands: rank 0 only unless asked, timestamped, to stderr."""

from __future__ import annotations

import sys
import time

import torch.distributed as dist

_T0 = time.time()


def log(msg: str, all_ranks: bool = False) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 or all_ranks:
        prefix = f"[{time.time() - _T0:7.1f}s]" + (f"[rank {rank}]" if all_ranks else "")
        print(f"{prefix} {msg}", file=sys.stderr, flush=True)
