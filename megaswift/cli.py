"""`megatron <command> [flags]`: parse nothing here, hand the flags to the command's `run()`.

With `NPROC_PER_NODE` > 1 (and not already under a launcher) the same command is re-executed
under torchrun, as Megatron-SWIFT does: `NPROC_PER_NODE=4 megatron export ...`; `NNODES`,
`NODE_RANK`, `MASTER_ADDR` and `MASTER_PORT` are passed through for multi-node runs.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import warnings

COMMANDS = {
    "export": "megaswift.commands.export",
    "sft": "megaswift.commands.sft",
    "pt": "megaswift.commands.pt",
}


def _launch_torchrun(argv: list[str]) -> int:
    env = os.environ
    cmd = [sys.executable, "-m", "torch.distributed.run",
           f"--nproc_per_node={env['NPROC_PER_NODE']}",
           f"--nnodes={env.get('NNODES', '1')}",
           f"--node_rank={env.get('NODE_RANK', '0')}"]
    if "MASTER_ADDR" in env or int(env.get("NNODES", "1")) > 1:
        cmd += [f"--master_addr={env.get('MASTER_ADDR', '127.0.0.1')}",
                f"--master_port={env.get('MASTER_PORT', '29500')}"]
    else:
        cmd += ["--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0"]
    cmd += ["-m", "megaswift.cli", *argv]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: megatron {{{','.join(COMMANDS)}}} [flags]  (megatron <command> --help)",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    nproc = int(os.environ.get("NPROC_PER_NODE", "1"))
    nnodes = int(os.environ.get("NNODES", "1"))
    if (nproc > 1 or nnodes > 1) and "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        os.environ.setdefault("NPROC_PER_NODE", str(nproc))
        return _launch_torchrun(argv)  # one process per node on several nodes is a job too
    # megatron-core warns at import about TE/Apex being absent and deprecated flags; on the
    # non-TE path that is expected noise that buries the command's own output.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    command = importlib.import_module(COMMANDS[argv[0]])
    try:
        return command.run(argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"megatron {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
