"""The status board (status.py): posts merge, readers wait for a change, not a clock."""

from __future__ import annotations

import asyncio
import threading

from ssh_provisioner.status import FAILED, StatusBoard


def test_slurm_and_link_merge_other_facts_replace() -> None:
    board = StatusBoard()
    board.post("k", slurm={"job_id": "7"}, forwards={"8787": {"url": "a"}})
    board.post("k", slurm={"state": "PENDING"}, forwards={})
    version, (entry,) = board.snapshot(["k"])
    assert entry["slurm"] == {"job_id": "7", "state": "PENDING"}
    assert entry["forwards"] == {}
    board.post("k", slurm={"state": "PENDING"})  # nothing new: no new version
    assert board.version == version


async def test_a_waiting_reader_wakes_at_a_post_from_another_thread() -> None:
    board = StatusBoard()
    board.post("k", phase="queued")
    waiting = asyncio.ensure_future(board.changed(board.version, 30))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    poster = threading.Thread(target=board.post, args=("k",), kwargs={"phase": "running"})
    poster.start()
    assert await asyncio.wait_for(waiting, 5) == board.version
    poster.join()
    assert await board.changed(board.version, 0.05) == board.version  # timed out: same


def test_a_failed_start_keeps_its_error_after_its_cleanup() -> None:
    board = StatusBoard()
    board.post("k", phase=FAILED, error="host key changed")
    board.drop("k")
    entry = board.get("k")
    assert entry is not None
    assert (entry["phase"], entry["error"], entry["gone"]) == (FAILED, "host key changed", True)
