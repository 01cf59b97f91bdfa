"""Writing a checkpoint folder all at once (`ulskip convert`, `ulskip export`): built in a temporary folder
beside the target, then moved into place, so a failure never leaves a half-written OUT_DIR."""
from __future__ import annotations

import os
import shutil


def move_into_place(tmp: str, out_dir: str) -> None:
    """Rename the finished folder `tmp` to `out_dir`, replacing an existing one only once `tmp` is complete."""
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        os.replace(tmp, out_dir)  # replaces an empty folder too
        return
    old = f"{out_dir}.old-{os.getpid()}"  # keep the old folder until the new one is in place
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
