"""`gorila-zmq clean RUN_DIR`: remove every shared-memory segment of a run that is not live (a run whose
supervisor and roles were all killed at once leaves them in /dev/shm: a Pong replay is ~1.4 GB).
`gorila-zmq clean --stale` removes every gorila-zmq segment on this host that no live process maps.

A segment some live process still maps belongs to a live run and is never removed. Removing a run's
shard segments means its next resume starts from the shard checkpoints rather than re-adopting them
(what a restarted shard does when it finds its segment: nothing applied is lost)."""
from __future__ import annotations

import argparse

from gorila_zmq.fields import UserError
from gorila_zmq.host import shm


def run_segments(run_id: str) -> dict[str, int]:
    return shm.segments(f"gz_{run_id}_")


def stale(segments: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(the segments no live process maps, those some process does)."""
    live = shm.mapped()
    return ({k: v for k, v in segments.items() if k not in live},
            {k: v for k, v in segments.items() if k in live})


def describe(segments: dict[str, int]) -> str:
    return f"{len(segments)} segment(s), {sum(segments.values()) / 2**20:,.1f} MiB"


def remove(segments) -> int:
    return sum(shm.remove(name) for name in segments)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gorila-zmq clean", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", help="the run whose segments to remove")
    p.add_argument("--stale", action="store_true", help="every gorila-zmq segment no live process maps")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    a = p.parse_args(argv)
    if bool(a.run_dir) == a.stale:
        raise UserError("give a run directory or --stale (not both)")
    if a.stale:
        found, what = shm.segments("gz_"), "this host"
    else:
        from gorila_zmq.launch.status import load_run
        cfg = load_run(a.run_dir)
        found, what = run_segments(cfg.run_id), a.run_dir
    gone, live = stale(found)
    if live and not a.stale:
        raise UserError(f"{what} is live ({describe(live)} mapped by running processes, e.g. {next(iter(live))}): "
                        "stop it first (Ctrl-C its `gorila-zmq dev`, or `gorila-zmq cluster down`)")
    for name, size in sorted(gone.items()):
        print(f"{'would remove' if a.dry_run else 'removing'} /dev/shm/{name} ({size / 2**20:,.1f} MiB)")
    n = 0 if a.dry_run else remove(gone)
    print(f"{what}: {'found' if a.dry_run else 'removed'} {describe(gone) if a.dry_run else f'{n} segment(s)'}"
          + (f"; {describe(live)} in use by live runs kept" if live else ""))
    return 0
