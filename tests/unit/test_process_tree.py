"""The launcher's process tree (host/process.py), walked down by /proc's children lists,
is the tree a scan of every process finds."""

from __future__ import annotations

import os
import subprocess
import sys

from ssh_provisioner.host.process import _tree_by_children, _tree_by_scan, process_tree

# a child that starts a grandchild in its own process group, then waits for stdin
TREE = (
    "import os, subprocess, sys; "
    "subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], "
    "stdin=sys.stdin, start_new_session=True); "
    "print('up', flush=True); sys.stdin.read()"
)


def test_the_walk_down_finds_what_the_full_scan_finds() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", TREE], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"up\n"
        walked = _tree_by_children(child.pid)  # (this worker may have other children)
        assert walked is not None  # this kernel keeps children lists
        assert walked == _tree_by_scan(child.pid)
        (grandchild,) = walked
        assert walked[grandchild] == grandchild  # in its own process group
        assert process_tree(child.pid) == walked
        assert child.pid in process_tree(os.getpid())
    finally:
        assert child.stdin is not None
        assert child.stdout is not None
        child.stdin.close()
        child.stdout.close()
        child.wait(10)
