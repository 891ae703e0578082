"""--report-to tensorboard: scalars in OUTPUT_DIR/tensorboard, one event per metric
and step (torch.utils.tensorboard's SummaryWriter; a value is a 32-bit float there).

A resume cuts the log back to its checkpoint's step by rewriting it, not only by
``purge_step``: a purge is a SessionLog.START marker that each reader must honour
when it reads (the Python EventAccumulator does; other readers of event files need
not), while a rewritten log holds each step once for every reader. On opening at
step k, every scalar of the folder's event files with step <= k is written again,
with its own wall time, into the new file this process logs to, and the older files
are then deleted. The new file also starts with the purge marker at step k + 1, so
that a process killed between the two (both files left) still reads as the cut-back
log: to the EventAccumulator, and to the next opening, which reads the files in the
order they were started, a marker dropping what came before it from its step on,
and converges to the same single file. A value metrics.jsonl holds but no event file
does (a kill between the two writes, or TensorBoard first asked for on this resume)
is written then too, timed at the opening.
"""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Dict, List, Tuple

from anita_core.train.run_folder import TENSORBOARD_DIR

EVENTS_GLOB = "events.out.tfevents.*"


def event_files(log_dir: Path) -> List[Path]:
    """The folder's event files in the order they were started (their names begin
    with the time they were opened)."""
    return sorted(Path(log_dir).glob(EVENTS_GLOB))


def scalars_up_to(log_dir: Path, step: int) -> List[Tuple[int, float, str, float]]:
    """(step, wall time, tag, value) of every scalar of the folder's event files with
    step <= ``step``, each (tag, step) once (the latest written; a purge marker drops
    the earlier writes from its step on), in step order."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog
    latest: Dict[Tuple[str, int], Tuple[float, float]] = {}
    for path in event_files(log_dir):
        # a record cut short by a kill ends that file's reading (the loader stops there)
        for event in LegacyEventFileLoader(str(path)).Load():
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                latest = {key: v for key, v in latest.items() if key[1] < event.step}
            if not event.HasField("summary") or event.step > step:
                continue
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    latest[(value.tag, event.step)] = (event.wall_time, value.simple_value)
    return sorted((s, wall, tag, v) for (tag, s), (wall, v) in latest.items())


class TensorBoardLog:
    name = "tensorboard"

    def __init__(self, output_dir: Path):
        self.log_dir = Path(output_dir) / TENSORBOARD_DIR
        self.writer = None

    def open(self, step: int, rows: Dict[int, Dict[str, float]]) -> None:
        """Cut back to ``step``; ``rows``: metrics.jsonl's rows up to it (step -> tag -> value)."""
        from torch.utils.tensorboard import SummaryWriter
        earlier = event_files(self.log_dir)
        kept = scalars_up_to(self.log_dir, step) if earlier else []
        written = {(tag, s) for s, _, tag, _ in kept}
        # one list in step order: readers take a step going back within a tag for a restart
        kept = sorted(kept + [(s, None, tag, v) for s, row in rows.items() for tag, v in row.items()
                              if (tag, s) not in written], key=lambda item: item[0])
        # a suffix of its own: the new file is never one of the earlier ones, even when
        # one process opens twice within a second (the names' time is in seconds)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=step + 1 if earlier else None,
                                    filename_suffix=f".anita-{secrets.token_hex(4)}")
        for s, wall, tag, value in kept:
            self.writer.add_scalar(tag, value, s, walltime=wall)      # None: now
        self.writer.flush()
        for path in earlier:
            path.unlink()

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        # each record at once: a run is watched while it trains, and a kill loses nothing
        self.writer.flush()

    def close(self, failed: bool) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
