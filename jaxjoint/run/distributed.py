"""Multi-process evaluation on the JAX distributed runtime.

``jaxjoint evaluate --distributed MODE`` runs as one process per host (TPU VM
workers, SLURM tasks) or per GPU group, all started with the same command. Modes:

- ``pairs`` (throughput): the pairs still to do are dealt out in rounds of one
  pair per process; process k scores the k-th pair of each round on its own
  local devices (the vocabulary axis over this host's devices only), so nothing
  crosses hosts inside a pair. After each round every process gathers the round's
  results and process 0 appends them to ``pairs.jsonl``. The choice whenever a
  pair's two V x V tables fit on one host's devices, which is the usual case.
- ``global`` (latency): every process works on every pair, over one mesh of all
  devices of all processes; the tables are sharded by rows over all of them and
  the parameters replicated. The time to each pair's result is smallest, but
  collectives cross hosts inside each pair: use it for a few pairs, or when a
  host's memory cannot hold a pair's tables.
- ``none``: one process, the devices of this host.

Only process 0 reads and writes the output directory; the records and summary
are those a single-process run writes. Every process loads the data and model
itself, and the run checks that all of them made the same pairs.

Failures. A step that fails on one process (an error while scoring a pair, a
bad input, process 0's write of a round to a full disk) is reported to all
processes at the next exchange, and all of them
stop with a one-line message saying which process failed and why; process 0
first appends every pair of that round that did finish. A process that dies
outright makes the others' next exchange fail: they stop with ``ProcessFailure``,
naming the process that no longer answers (``_lost_processes``), and the CLI
then exits at once, skipping the runtime's shutdown handshake (it
would wait for the dead process, then abort with a stack trace). Where no
exchange notices (a collective that blocks instead of failing), the JAX runtime
ends the survivors itself after its heartbeat timeout (100 s); if process 0 dies,
it ends the others at once. Each round is on disk before the next starts, so a
restart of all processes resumes where the run stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxjoint.errors import UserError

T = TypeVar("T")


class ProcessFailure(UserError):
    """Another process of the run died or stopped answering.

    The survivors cannot shut the distributed runtime down cleanly, so the CLI
    exits at once (``exit_now``) after printing the message.
    """


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the run's processes with ``jax.distributed.initialize``, before any JAX work.

    With no arguments the cluster is detected (TPU VM, SLURM, Open MPI); otherwise
    all three are needed: ``coordinator`` ``HOST:PORT`` of process 0 (reachable by
    every process; process 0 listens on PORT), ``num_processes`` N, and this
    process's ``process_id`` in ``[0, N)``. Does nothing when already initialized.
    Raises ``UserError`` for missing or invalid values.
    """
    if jax.distributed.is_initialized():
        return
    given = (coordinator, num_processes, process_id)
    if any(v is not None for v in given) and any(v is None for v in given):
        raise UserError("give --coordinator HOST:PORT, --num-processes N and --process-id K together, or none "
                        "of them on a TPU VM, SLURM or Open MPI job, where they are detected")
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
        if num_processes < 1:
            raise UserError(f"--num-processes must be >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        if process_id == 0:
            _check_port_free(int(port))
    # CPU collectives (process_allgather, psum across processes) need an
    # implementation; gloo needs nothing beyond the coordinator.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except ValueError as err:  # the cluster could not be detected
        raise UserError(f"cannot find the other processes of this run ({describe(err)}); give --coordinator "
                        "HOST:PORT --num-processes N --process-id K, or use --distributed none") from None
    except RuntimeError as err:  # JAX already ran something in this process
        raise UserError(f"cannot join the distributed run: {describe(err)}") from None


def _check_port_free(port: int) -> None:
    """Process 0's coordinator listens on ``port`` on every address; XLA crashes
    (a segmentation fault) when the port is taken, so look first."""
    dual = socket.has_dualstack_ipv6()
    try:
        with socket.socket(socket.AF_INET6 if dual else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            if dual:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(("", port))
    except OSError as err:
        raise UserError(f"process 0 cannot listen on port {port} ({err.strerror}); "
                        "give --coordinator a free port") from None


def is_initialized() -> bool:
    """True when this process belongs to a multi-process JAX run."""
    return jax.distributed.is_initialized()


def exit_now(code: int) -> NoReturn:
    """Flush stdout and stderr and end the process, without the distributed
    runtime's shutdown handshake (it waits for every process, dead ones too)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place in the run: process ``index`` of ``count``.

    With one process, exchanges are local and errors propagate unchanged, so a
    single-process run takes the same code path as a multi-process one.
    """

    index: int
    count: int

    @property
    def leader(self) -> bool:
        """Process 0: the one that reads and writes the output directory."""
        return self.index == 0

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (JSON-able), in process order, on every process.

        Raises ``ProcessFailure`` when a process does not take part (it died).
        """
        if self.count == 1:
            return [value]
        data = _encode(value)
        with _lost_contact(self.index, self.count):
            sizes = multihost_utils.process_allgather(np.int32(data.size))
            rows = multihost_utils.process_allgather(_padded(data, int(sizes.max())))
        return [json.loads(row[:size].tobytes()) for row, size in zip(rows, sizes)]

    def broadcast(self, value: Any) -> Any:
        """Process 0's ``value`` (JSON-able) on every process; the others' ``value``
        is ignored. Raises ``ProcessFailure`` when a process does not take part."""
        if self.count == 1:
            return value
        data = _encode(value if self.leader else None)
        with _lost_contact(self.index, self.count):
            size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
            buffer = multihost_utils.broadcast_one_to_all(_padded(data, size))
        return json.loads(buffer[:size].tobytes())

    def exchange(self, step: Callable[[], Any]) -> Exchange:
        """Run ``step`` here and gather every process's JSON-able result or error.

        Alone, an error in ``step`` propagates unchanged. With several processes it
        is caught (its traceback printed when it is not a ``UserError``) and handed
        to ``Exchange.check``, so every process learns of it at the same point.
        """
        if self.count == 1:
            return Exchange(self.index, [step()], {}, None)
        try:
            result, error = step(), None
        except Exception as err:  # noqa: BLE001 - reported to every process, raised by check()
            result, error = None, err
            if not isinstance(err, UserError):
                traceback.print_exc()
        outcomes = self.gather({"result": result} if error is None else {"error": describe(error)})
        return Exchange(self.index, [o.get("result") for o in outcomes],
                        {k: o["error"] for k, o in enumerate(outcomes) if "error" in o}, error)

    def agree(self, step: Callable[[], T]) -> T:
        """``step()`` here, once it succeeded on every process; else raise on all of them."""
        box = []
        self.exchange(lambda: box.append(step())).check()
        return box[0]


@dataclasses.dataclass(frozen=True)
class Exchange:
    """The outcome of ``Processes.exchange`` on every process.

    index: this process's index.
    results: each process's result, None where its step failed.
    failures: ``{process: one-line error}`` of the processes whose step failed.
    error: this process's own exception, if its step failed.
    """

    index: int
    results: list[Any]
    failures: dict[int, str]
    error: Exception | None

    def check(self, where: Callable[[int], str] = lambda k: f"process {k}") -> None:
        """Raise if the step failed on any process: this process's own ``UserError``
        as it is, else ``UserError("<where(k)> failed: <error>")`` for this process
        when its step failed, or for the first process whose step failed."""
        if isinstance(self.error, UserError):
            raise self.error
        if self.failures:
            k = self.index if self.error is not None else min(self.failures)
            raise UserError(f"{where(k)} failed: {self.failures[k]}") from self.error


def _encode(value: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode(), np.uint8)


def _padded(data: np.ndarray, size: int) -> np.ndarray:
    """``data`` zero-padded to ``size`` rounded up to a power of two: the collectives
    compile once per shape, and payload sizes vary from round to round."""
    buffer = np.zeros(1 << max(10, math.ceil(math.log2(max(size, 1)))), np.uint8)
    buffer[: data.size] = data
    return buffer


@contextlib.contextmanager
def _lost_contact(index: int, count: int) -> Iterator[None]:
    """Turn a failed collective into ``ProcessFailure`` naming the lost processes:
    a process that is gone breaks the exchange (on CPU at once, Gloo's "Connection
    closed by peer", raised as ``JaxRuntimeError`` or ``ValueError``)."""
    try:
        yield
    except (jax.errors.JaxRuntimeError, ValueError) as err:
        lost = _lost_processes(index, count)
        who = (f"process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of {count}" if lost
               else "another process")
        raise ProcessFailure(f"{who} stopped answering (a lost host, or a killed process: see its output), "
                             f"so process {index} stops ({describe(err, 120)})") from None


SURVIVORS = "jaxjoint/survivors/"
SURVIVOR_WAIT_S = 1.5


def _lost_processes(index: int, count: int) -> list[int]:
    """The processes that did not answer, as the survivors of a broken exchange see it.

    Each survivor notes itself in the coordinator's key-value store, waits
    ``SURVIVOR_WAIT_S`` for the others to notice the break too, and reads who
    noted. The store lives in process 0: when it cannot be reached, process 0 is
    the lost one. A best effort: an empty list when it cannot tell.
    """
    from jax._src import distributed as runtime

    client = runtime.global_state.client
    if client is None:
        return []
    try:
        client.key_value_set(f"{SURVIVORS}{index}", "1")
        time.sleep(SURVIVOR_WAIT_S)
        present = {int(key.rsplit("/", 1)[-1]) for key, _ in client.key_value_dir_get(SURVIVORS)}
    except Exception:  # noqa: BLE001 - the coordinator, process 0, is gone
        return [0] if index != 0 else []
    return sorted(set(range(count)) - present - {index})


def processes(mode: str) -> Processes:
    """This process's ``Processes`` for a run in ``mode`` (``config.DISTRIBUTED_MODES``).

    ``pairs`` and ``global`` join the distributed runtime if the caller has not
    (``initialize()``, cluster detected); ``none`` refuses to run as one of several
    processes, which would all write the same output.
    """
    if mode == "none":
        if jax.process_count() > 1:
            raise UserError(f"this is process {jax.process_index()} of {jax.process_count()}; "
                            "give --distributed pairs or global")
        return Processes(0, 1)
    initialize()
    return Processes(jax.process_index(), jax.process_count())


def describe(err: BaseException, limit: int = 300) -> str:
    """``err`` as one line for an error message: a ``UserError``'s message, else ``Type: first line``."""
    text = " ".join(str(err).split()) if isinstance(err, UserError) else (
        f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0].strip()}")
    return text if len(text) <= limit else text[: limit - 3] + "..."
