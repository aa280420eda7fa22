"""What runs on the kernel's host: the launcher, its supervisor and its relay.

Standard library only, Python >= 3.6 (no newer idiom: ruff lints it for py37, the
tests run it on every interpreter from 3.6 to 3.13).  Nothing is installed on the host:
``ssh_provisioner.payload`` ships the modules an entry needs over the SSH channel's
stdin, as one payload, and registers them there under these same names.  The local side
imports ``wire`` and ``spec`` from here, so both ends speak from one definition.
"""
