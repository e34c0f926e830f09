"""`megatron <command> [flags]`: parse nothing here, hand the flags to the command's `run()`.

With `NPROC_PER_NODE` > 1 (and not already under a launcher) the same command is re-executed
under torchrun, as Megatron-SWIFT does: `NPROC_PER_NODE=4 megatron export ...`; `NNODES`,
`NODE_RANK`, `MASTER_ADDR` and `MASTER_PORT` are passed through for multi-node runs. Stopping the
launcher (SIGTERM from a scheduler or `kill`, Ctrl-C) stops the whole job the way it stops a single
process: every worker saves after its current iteration and exits 0.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import warnings

COMMANDS = {
    "export": "megaswift.commands.export",
    "sft": "megaswift.commands.sft",
    "pt": "megaswift.commands.pt",
    "rlhf": "megaswift.commands.rlhf",
}


_ERROR = re.compile(rb"^megatron \w+: error: ")
# what the other ranks say when one rank stopped on an error: the peer went away mid-collective
_ECHOES = (b"Connection closed by peer", b"Connection reset by peer", b"Broken pipe", b"Socket closed")


def _relay_stderr(pipe, seen: list) -> None:
    """Pass the workers' and torchrun's stderr through as it comes, until a worker prints its
    one-line `megatron <cmd>: error: ...`. From then on only further distinct errors pass: the
    same error from every rank is said once, the other ranks' lost-connection echoes and torchrun's
    ChildFailedError traceback are dropped (`--debug` / MEGASWIFT_DEBUG=1 keep everything)."""
    out = sys.stderr.buffer
    buf, done = b"", 0          # unfinished output; how much of it is already written
    while chunk := os.read(pipe.fileno(), 65536):
        buf += chunk
        pos = 0
        while (nl := buf.find(b"\n", pos)) >= 0:
            line = buf[pos:nl]
            if _ERROR.match(line):
                if not seen:
                    out.write(buf[done:nl + 1])
                    done = nl + 1
                    seen.append(line)
                elif line not in seen and not any(e in line for e in _ECHOES):
                    seen.append(line)
                    out.write(line + b"\n")
            pos = nl + 1
        if not seen:
            out.write(buf[done:])  # as it comes: progress bars redraw with \r, without a newline
        out.flush()
        buf = buf[pos:]
        done = len(buf) if not seen else 0


def _launch_torchrun(argv: list[str], debug: bool = False) -> int:
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
    # torchrun gets a session of its own, so a terminal's Ctrl-C reaches this process only, and
    # signals go past torchrun to its workers: torchrun's own handler would kill them after
    # --shutdown_timeout (30 s) and exit 1 even when they saved cleanly.
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=None if debug else subprocess.PIPE)
    seen: list[bytes] = []   # the workers' error lines
    relay = None
    if not debug:
        relay = threading.Thread(target=_relay_stderr, args=(proc.stderr, seen), daemon=True)
        relay.start()

    def forward(signum, _frame):
        import psutil

        sig = signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM  # SIGHUP: stop too
        try:
            workers = psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:
            return
        for p in workers or [psutil.Process(proc.pid)]:  # none yet: torchrun stops the start-up
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        code = proc.wait()
        if relay is not None:
            relay.join()
            if code and seen:  # a worker's one-line error: exit as a single process would
                return 2
        return code
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: megatron {{{','.join(COMMANDS)}}} [flags]  (megatron <command> --help)",
              file=sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, 1)
        print(f"megatron: error: unknown command {argv[0]!r}" + (f" (did you mean {close[0]}?)" if close else "")
              + f"; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    debug = os.environ.get("MEGASWIFT_DEBUG", "0") not in ("", "0")
    if "--debug" in argv:   # show tracebacks of user errors too
        argv.remove("--debug")
        debug = True
    nproc = int(os.environ.get("NPROC_PER_NODE", "1"))
    nnodes = int(os.environ.get("NNODES", "1"))
    if (nproc > 1 or nnodes > 1) and "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        os.environ.setdefault("NPROC_PER_NODE", str(nproc))
        return _launch_torchrun(argv, debug)  # one process per node on several nodes is a job too
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
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, RuntimeError, OSError) as e:
        if debug:
            raise
        print(f"megatron {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training, or a second Ctrl-C during it
        print(f"megatron {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
