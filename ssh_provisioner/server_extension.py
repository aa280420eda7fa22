"""The Jupyter Server side of JupyterLab's panel: the remote kernels' status, the
choices a kernelspec offers, and a start with the user's choice.

Endpoints, under ``{base_url}ssh-provisioner/api/`` and behind Jupyter Server's own
authentication and authorization (the ``kernels`` and ``kernelspecs`` resources):

- ``GET status?since=V``: every remote kernel this server runs (pending ones too), as
  soon as the board's version is past ``V`` (a long poll, at most ``POLL_WAIT``
  seconds): one request for all kernels, and a change reaches the page at once;
- ``GET kernelspecs``: the kernelspecs that declare ``user_options``, with the form's
  fields;
- ``POST kernels`` ``{"name", "path", "options"}``: checks the options against the
  kernelspec's bounds (400 and nothing started when one is outside them), then starts
  the kernel with them.

Loading the extension also registers the Prometheus metrics (metrics.py), sends the
package's log lines to the server's own log handlers, and starts keeping kernels ready
for each kernelspec with ``prespawn`` (prespawn.py; ended by the server's
``shutdown_all``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import os
from typing import Any

import zmq
from jupyter_client.provisioning.factory import KernelProvisionerFactory
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import ensure_async, url_path_join
from tornado import web

from . import instant, metrics, prespawn
from .choices import UserOptions
from .engine import get_engine
from .errors import OptionRefused, ProvisionerConfigError
from .host.process import raise_descriptor_limit
from .hosts import HostEntry
from .provisioner import SSHProvisioner
from .status import board

PROVISIONER = "ssh-provisioner"
log = logging.getLogger(__name__)
POLL_WAIT = 20.0  # seconds a status request waits for a change (below proxies' timeouts)


def _ours(spec: Any) -> dict[str, Any] | None:
    """The provisioner config of a kernelspec of ours, else None."""
    provisioner = (getattr(spec, "metadata", None) or {}).get("kernel_provisioner") or {}
    if provisioner.get("provisioner_name") != PROVISIONER:
        return None
    config = provisioner.get("config")
    return config if isinstance(config, dict) else {}


def declared_options(config: dict[str, Any]) -> UserOptions:
    hosts = [HostEntry.parse(item).name for item in config.get("hosts") or []]
    return UserOptions.parse(config.get("user_options") or {}, hosts)


class StatusHandler(APIHandler):
    auth_resource = "kernels"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        try:
            since = int(self.get_argument("since", "-1"))
        except ValueError:
            raise web.HTTPError(400, "since: the version of the last answer") from None
        if since >= 0:
            await board.changed(since, POLL_WAIT)
        manager = self.kernel_manager
        ids = set(manager.list_kernel_ids()) | set(getattr(manager, "_pending_kernels", {}))
        version, entries = board.snapshot(ids)
        root = self.settings.get("server_root_dir", "")
        for entry in entries:  # the notebook's path as the page knows it
            path = entry.get("session_path") or ""
            if root and path.startswith(root.rstrip(os.sep) + os.sep):
                entry["session_path"] = path[len(root.rstrip(os.sep)) + 1 :]
        self.finish(json.dumps({"version": version, "kernels": entries}))


def offered_choices(manager: Any) -> dict[str, Any]:
    """The kernelspecs of ours that declare user_options, with their forms' fields
    (reads the kernelspec files: call it off the server's loop)."""
    specs = {}
    for name in sorted(manager.find_kernel_specs()):
        try:
            spec = manager.get_kernel_spec(name)
            config = _ours(spec)
            options = declared_options(config) if config is not None else None
        except (ProvisionerConfigError, OSError, ValueError) as exc:
            log.warning("kernelspec %s: %s", name, exc)
            continue
        if options is not None and options.options:
            specs[name] = {"display_name": spec.display_name, "options": options.schema()}
    return specs


class KernelspecsHandler(APIHandler):
    auth_resource = "kernelspecs"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        specs = await asyncio.to_thread(offered_choices, self.kernel_spec_manager)
        self.finish(json.dumps({"kernelspecs": specs}))


class StartHandler(APIHandler):
    auth_resource = "kernels"

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.get_json_body() or {}
        name, chosen = body.get("name"), body.get("options") or {}
        if not isinstance(name, str) or not isinstance(chosen, dict):
            raise web.HTTPError(400, "expected {'name': kernelspec, 'options': {...}}")
        try:
            spec = await asyncio.to_thread(self.kernel_spec_manager.get_kernel_spec, name)
        except Exception as exc:  # jupyter_client raises NoSuchKernel (a KeyError)
            raise web.HTTPError(404, f"no kernelspec {name!r}") from exc
        config = _ours(spec)
        if config is None:
            raise web.HTTPError(400, f"kernelspec {name!r} is not ssh-provisioner's")
        where = f"kernelspec {spec.display_name!r}"
        try:  # checked here first: a refused choice starts nothing, not even a manager
            declared_options(config).resolve(chosen, where)
        except OptionRefused as exc:
            raise web.HTTPError(400, str(exc)) from exc
        except ProvisionerConfigError as exc:  # the kernelspec's own declaration
            raise web.HTTPError(500, f"{where}: {exc}") from exc
        kernel_id = await self.kernel_manager.start_kernel(
            kernel_name=name, path=body.get("path"), user_options=chosen
        )
        self.set_status(201)
        self.finish(json.dumps({"id": kernel_id, "name": name}))


def _stop_pending_starts_on_shutdown(manager: Any) -> None:
    """A shutdown of a kernel still starting stops its start (and cancels its queued
    Slurm job) at once.  Why a wrapper: jupyter_client's shutdown of a pending kernel
    first waits for its start to end, which for a queued job can take hours."""
    shutdown = manager._async_shutdown_kernel

    async def shutdown_kernel(kernel_id: str, now: bool = False, restart: bool = False) -> Any:
        pending = getattr(manager, "_pending_kernels", {})
        if kernel_id in pending and kernel_id not in manager and pending[kernel_id].done():
            # A pending start that failed stays in jupyter_client's _pending_kernels after
            # its kernel is removed; shutdown_all then fails on it with a 404 and the
            # server never stops.  It is over: forget it.
            pending.pop(kernel_id, None)
            return None
        if not restart and kernel_id in pending and kernel_id in manager:
            provisioner = getattr(manager.get_kernel(kernel_id), "provisioner", None)
            if isinstance(provisioner, SSHProvisioner) and provisioner.stop_start():
                log.info("kernel %s: shut down while starting; start stopped", kernel_id)
        return await shutdown(kernel_id, now=now, restart=restart)

    # both names: shutdown_all (the server stopping) calls the private one
    manager.shutdown_kernel = manager._async_shutdown_kernel = shutdown_kernel


def _end_ready_kernels_on_shutdown_all(manager: Any) -> None:
    """The server stopping ends the kernels kept ready with its own (rather than at
    interpreter exit, which a lingering thread of another library can delay)."""
    shutdown_all = manager.shutdown_all

    async def shutdown_all_and_ready(now: bool = False) -> None:
        try:
            await ensure_async(shutdown_all(now=now))
        finally:
            await get_engine().run(get_engine().reserve.aclose())

    manager.shutdown_all = shutdown_all_and_ready


def _room_for_many_kernels(serverapp: Any) -> None:
    """Each remote kernel holds its five local ports and their clients' connections in
    this process, beside the server's ZMQ sockets to it (four or five per kernel, more
    while a disconnected page's output is buffered).  The soft descriptor limit goes up
    to the hard one, and the kernel manager's ZMQ context may hold as many sockets:
    libzmq's default of 1023 ran out ("Too many open files") near 150 kernels.  A
    context takes the setting only before its first socket, so it is set at load."""
    limit = raise_descriptor_limit()
    context = serverapp.kernel_manager.context
    if context.get(zmq.MAX_SOCKETS) < limit:
        context.set(zmq.MAX_SOCKETS, limit)
    serverapp.log.info(
        "ssh-provisioner: room for %d open files, %d ZMQ sockets",
        limit,
        context.get(zmq.MAX_SOCKETS),
    )


def _keeps_ready(config: dict[str, Any]) -> bool:
    hosts = config.get("hosts") or []
    return bool(config.get("prespawn")) or any(
        isinstance(h, dict) and h.get("prespawn") for h in hosts
    )


def _keep_kernels_ready(serverapp: Any) -> None:
    """Start filling the reserve of each kernelspec with ``prespawn`` now, so that the
    first notebook opened already gets a kernel that is up (prespawn.py)."""
    prespawn.enable()
    manager = serverapp.kernel_manager
    factory = KernelProvisionerFactory.instance(parent=manager.parent)
    for name in sorted(manager.kernel_spec_manager.find_kernel_specs()):
        try:
            spec = manager.kernel_spec_manager.get_kernel_spec(name)
            config = _ours(spec)
            if config is None or not _keeps_ready(config):
                continue
            km = manager.kernel_manager_factory(
                connection_file=os.devnull, parent=manager, log=manager.log, kernel_name=name
            )
            provisioner = factory.create_provisioner_instance(f"prespawn-{name}", spec, km)
        except Exception as exc:  # a faulty kernelspec: its starts will say so
            log.warning("kernelspec %s: no kernels kept ready: %s", name, exc)
            continue
        if isinstance(provisioner, SSHProvisioner):  # (a subclass's own entry point, too)
            stocked = get_engine().submit(instant.stock(provisioner))
            stocked.add_done_callback(functools.partial(_say_stocked, name))


def _say_stocked(name: str, stocked: concurrent.futures.Future[Any]) -> None:
    if stocked.cancelled() or stocked.exception() is None:
        log.info("kernelspec %s: keeping kernels ready", name)
    else:
        log.warning("kernelspec %s: no kernels kept ready: %s", name, stocked.exception())


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "ssh_provisioner.server_extension"}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextensions/ssh-provisioner", "dest": "ssh-provisioner"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    base = url_path_join(serverapp.web_app.settings["base_url"], "ssh-provisioner", "api")
    serverapp.web_app.add_handlers(
        ".*$",
        [
            (url_path_join(base, "status"), StatusHandler),
            (url_path_join(base, "kernelspecs"), KernelspecsHandler),
            (url_path_join(base, "kernels"), StartHandler),
        ],
    )
    _stop_pending_starts_on_shutdown(serverapp.kernel_manager)
    _room_for_many_kernels(serverapp)
    _keep_kernels_ready(serverapp)
    _end_ready_kernels_on_shutdown_all(serverapp.kernel_manager)
    metrics.install()
    package_log = logging.getLogger("ssh_provisioner")
    if not package_log.handlers:  # the server's log shows ours, at its level
        for handler in serverapp.log.handlers:
            package_log.addHandler(handler)
        package_log.setLevel(serverapp.log.level)
        package_log.propagate = False
    serverapp.log.info("ssh-provisioner: status, choices and metrics at %s", base)
