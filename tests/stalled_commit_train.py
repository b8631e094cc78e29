"""``train.py`` whose Orbax commit of one step stalls: for the kill-during-checkpoint-write test.

``python tests/stalled_commit_train.py STEP MARKER <train.py flags>``: the write of checkpoint
``STEP`` goes through every file, then, just before Orbax's atomic rename of its temporary
directory (the commit), touches ``MARKER`` and sleeps, so the test can kill the process with the
write provably in flight.
"""

from __future__ import annotations

import asyncio
import pathlib
import runpy
import sys

from orbax.checkpoint._src.path import atomicity

stall_step, marker = sys.argv[1], pathlib.Path(sys.argv[2])
_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def _stalled_finalize(self):
    if self.get_final().name == stall_step:
        marker.touch()
        await asyncio.sleep(3600)
    return await _finalize(self)


atomicity.AtomicRenameTemporaryPath.finalize = _stalled_finalize
root = pathlib.Path(__file__).resolve().parents[1]
sys.argv = [str(root / "train.py"), *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
