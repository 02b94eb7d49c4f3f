"""Run a function on W CPU ranks over gloo and bring back each rank's result or traceback.

Every call gets its own temporary directory, used both as the FileStore rendezvous and to
carry results back, so concurrent calls (pytest-xdist) never share state.

Ranks are forked from a forkserver that has imported torch once (about 0.2 s a rank instead of
a fresh interpreter's 2-4 s). Each rank gets the caller's environment and working directory as
they are at the call, and imports ``fn``'s module only after that, as a spawned rank would.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailed(AssertionError):
    """One or more ranks raised; the message holds every failing rank's traceback."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "torch.distributed.fsdp", "sf_dist", "schedulefree"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _worker(rank: int, world_size: int, workdir: str, port: int, target: tuple[str, str], env: dict,
            cwd: str, args: tuple) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        module, name = target
        fn = getattr(importlib.import_module(module), name)
        store = dist.FileStore(os.path.join(workdir, "store"), world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(workdir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(workdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    # A clean ending: without os._exit, gloo teardown sometimes aborts after success.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return their results.

    ``fn`` must be a module-level function (spawn pickles it by name) and return something
    ``torch.save`` can write. Any rank's exception fails the call with that rank's traceback.
    """
    ctx = _context()
    target, env, cwd = (fn.__module__, fn.__qualname__), dict(os.environ), os.getcwd()
    with tempfile.TemporaryDirectory(prefix="sf_dist_") as workdir:
        port = _free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, workdir, port, target, env, cwd, args), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if _errors(workdir, world_size):
                time.sleep(1.0)  # let the other ranks report too, then stop the survivors
                break
            time.sleep(0.05)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        errors = _errors(workdir, world_size)
        if errors:
            raise RankFailed("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in errors.items()))
        missing = [r for r in range(world_size) if not os.path.exists(os.path.join(workdir, f"rank{r}.pt"))]
        if missing:
            codes = {r: procs[r].exitcode for r in range(world_size)}
            raise RankFailed(f"ranks {missing} returned no result (timeout {timeout}s or crash); exit codes {codes}")
        return [torch.load(os.path.join(workdir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def _errors(workdir: str, world_size: int) -> dict[int, str]:
    errors = {}
    for r in range(world_size):
        path = os.path.join(workdir, f"rank{r}.err")
        if os.path.exists(path):
            with open(path) as f:
                errors[r] = f.read()
    return errors
