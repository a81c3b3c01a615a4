"""Ray's internals that the pipeline touches (Ray Tune's and Optuna's are in :mod:`.tune`): a placement group's GCS
record, the driver's dispatcher of its workers' output and its printer of the cluster's error messages, and the
settings that only Ray's private modules read (environment variables, a system-config key). Ray's private modules
are imported where they are used, so that one that moved fails that use with a :class:`~sdt.compat.CompatError`,
not every import of the pipeline."""

from __future__ import annotations

import importlib
import importlib.util
import mmap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sdt.compat import CompatError, require

# Environment variables that only Ray's private modules read, each with the module and constant that define it
# there: no public API sets what they set, and Ray ignores a variable it no longer reads.
TRAIN_PRINT_PATCH = "RAY_TRAIN_ENABLE_PRINT_PATCH"
TRAIN_PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
TRAIN_HEALTH_CHECK_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_WORKER_GROUP_START_TIMEOUT_S = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
STATE_API_ADDRESS = "RAY_API_SERVER_ADDRESS"
TRAIN_CONSTANTS = "ray.train.v2._internal.constants"
PRIVATE_ENVIRONMENT = {
    TRAIN_PRINT_PATCH: (TRAIN_CONSTANTS, "ENABLE_PRINT_PATCH_ENV_VAR"),
    TRAIN_PREEMPTION_WATCHER: (TRAIN_CONSTANTS, "ENABLE_PREEMPTION_WATCHER_ENV_VAR"),
    TRAIN_HEALTH_CHECK_INTERVAL_S: (TRAIN_CONSTANTS, "HEALTH_CHECK_INTERVAL_S_ENV_VAR"),
    TRAIN_WORKER_GROUP_START_TIMEOUT_S: (TRAIN_CONSTANTS, "WORKER_GROUP_START_TIMEOUT_S_ENV_VAR"),
    STATE_API_ADDRESS: ("ray._private.ray_constants", "RAY_API_SERVER_ADDRESS_ENVIRONMENT_VARIABLE"),
}
STARTUP_CONCURRENCY = "worker_maximum_startup_concurrency"  # a key of Ray's C++ config (ray_config_def.h)
# The handler of the worker output dispatcher that prints on the driver's console: ray.init adds it with
# log_to_driver (ray._private.worker).
CONSOLE_HANDLER = "ray_print_logs"
DISPATCHER = "ray._private.ray_logging.global_worker_stdstream_dispatcher"
# The driver's thread that receives the errors the cluster publishes to it prints each with this function.
ERROR_PRINTER = "ray._private.worker.print_to_stdstream"


def check_environment_variable(name: str) -> None:
    """Raise :class:`CompatError` unless Ray still defines ``name`` where :data:`PRIVATE_ENVIRONMENT` says."""
    module_name, constant = PRIVATE_ENVIRONMENT[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CompatError("ray", module_name, f"cannot be imported ({error})") from None
    defined = require(module, constant, "ray", module_name)
    if defined != name:
        raise CompatError("ray", f"{module_name}.{constant}", f"is {defined!r}, not {name!r}")


def startup_concurrency(processes: int) -> dict[str, Any]:
    """``ray.init`` keywords that let the raylet start ``processes`` worker processes at once: a private
    ``_system_config`` key, with no public setting."""
    return {"_system_config": {STARTUP_CONCURRENCY: processes}}


def check_system_config_key(key: str = STARTUP_CONCURRENCY) -> None:
    """Raise :class:`CompatError` unless Ray's compiled config (``ray/_raylet.so``, which holds each key's name)
    has ``key``: Ray refuses to start on a key it does not know ("Received unexpected config parameter")."""
    library = Path(importlib.util.find_spec("ray._raylet").origin)
    with library.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as image:
        if image.find(key.encode() + b"\0") < 0:
            raise CompatError("ray", f"_system_config key {key}", f"is not in Ray's config ({library.name})")


def placement_record_internals() -> tuple[Any, Any]:
    """This process's GCS accessor (``ray._private.state.state``) and the protobuf type of a placement group's GCS
    record (``gcs_pb2.PlacementGroupTableData``), checked without connecting: the accessor's two methods and the
    record's two times (:func:`placement_group_placed_at`) are there."""
    try:
        import ray._raylet
        from ray._private.state import state
        from ray.core.generated.gcs_pb2 import PlacementGroupTableData
    except ImportError as error:
        raise CompatError("ray", "ray._private.state / ray.core.generated.gcs_pb2", f"moved ({error})") from None
    require(state, "_connect_and_get_accessor", "ray", "ray._private.state.state")
    require(ray._raylet.GlobalStateAccessor, "get_placement_group_info", "ray", "ray._raylet.GlobalStateAccessor")
    stats = PlacementGroupTableData.DESCRIPTOR.fields_by_name.get("stats")
    for field in ("creation_request_received_ns", "end_to_end_creation_latency_us"):
        if stats is None or field not in stats.message_type.fields_by_name:
            raise CompatError("ray", "gcs_pb2.PlacementGroupTableData.stats", f"has no {field}")
    return state, PlacementGroupTableData


def placement_group_placed_at(group_id: Any) -> float | None:
    """When Ray placed the placement group ``group_id`` (Unix seconds): the arrival of its creation request plus
    its creation latency, from its GCS record; None where the record lacks them. Ray's public
    ``placement_group_table`` has the latency but not when the group was asked for; the GCS record has both."""
    state, record_type = placement_record_internals()
    try:
        record = state._connect_and_get_accessor().get_placement_group_info(group_id)
        stats = record_type.FromString(record).stats
    except TypeError as error:  # no record, or one in another form
        raise CompatError("ray", "the GCS accessor's placement-group record", f"cannot be read ({error})") from None
    if not stats.creation_request_received_ns:
        return None
    return stats.creation_request_received_ns / 1e9 + stats.end_to_end_creation_latency_us / 1e6


def worker_output_dispatcher() -> Any:
    """The driver's dispatcher of its workers' output (what ``log_to_driver`` sends), whose every handler gets each
    batch of lines: Ray has no public way to send that output anywhere but the console."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError as error:
        raise CompatError("ray", DISPATCHER, f"cannot be imported ({error})") from None
    for method in ("add_handler", "remove_handler", "handlers"):
        require(dispatcher, method, "ray", DISPATCHER)
    return dispatcher


def add_worker_output_handler(name: str, handler: Callable[[Mapping[str, Any]], None]) -> None:
    """``handler`` gets every batch of the workers' output lines (a mapping: ``lines``, ``pid``, ``actor_name``,
    ``task_name``...)."""
    worker_output_dispatcher().add_handler(name, handler)


def remove_console_worker_output() -> None:
    """Ray stops printing its workers' output on the driver's console (its handler :data:`CONSOLE_HANDLER`, added by
    ``ray.init`` with ``log_to_driver``)."""
    dispatcher = worker_output_dispatcher()
    names = [name for name, _ in dispatcher.handlers]
    if CONSOLE_HANDLER not in names:
        raise CompatError("ray", DISPATCHER, f"has no handler {CONSOLE_HANDLER!r} (its handlers: {names})")
    dispatcher.remove_handler(CONSOLE_HANDLER)


def route_error_messages(handler: Callable[[Mapping[str, Any]], None], keep_printing: bool) -> None:
    """``handler`` gets every error message the cluster publishes to this driver (a worker that died: "A worker
    died or was killed ..."; a mapping as the worker output dispatcher gives, ``lines`` and ``pid`` "raylet"),
    which Ray prints on the console unless ``keep_printing`` is off. Ray's driver prints them from its error
    listener thread through :data:`ERROR_PRINTER`, which no handler or setting of Ray's reaches; this replaces that
    function (again on a second call, never wrapping it twice)."""
    try:
        import ray._private.worker as worker
    except ImportError as error:
        raise CompatError("ray", "ray._private.worker", f"cannot be imported ({error})") from None
    require(worker, "listen_error_messages", "ray", "ray._private.worker")
    printer = require(worker, "print_to_stdstream", "ray", "ray._private.worker")
    printer = getattr(printer, "ray_printer", printer)

    def route(data: Mapping[str, Any], ignore_prefix: bool) -> None:
        handler(data)
        if keep_printing:
            printer(data, ignore_prefix)

    route.ray_printer = printer
    worker.print_to_stdstream = route
