"""The dask.distributed client every parallel stage runs its tasks on.

``deblend``, ``coadd`` and ``forced`` take ``--workers N`` (a local cluster of
N single-threaded processes) or ``--scheduler ADDRESS`` (an existing cluster);
this module is the one place that turns those into a client.
"""

from __future__ import annotations

import contextlib

from .errors import InputError


@contextlib.contextmanager
def _workers_ignore_interrupt():
    """SIGINT ignored while the local cluster starts its processes.

    A Ctrl-C reaches the whole process group: every nanny and worker printed
    its own KeyboardInterrupt traceback (79 lines for two workers) before the
    command said "interrupted". An ignored signal stays ignored in the
    processes started meanwhile (and Python then installs no handler of its
    own), so only this process is interrupted, and it closes the cluster.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def dask_client(workers: int, scheduler: str | None):
    """A ``dask.distributed.Client``, closed (with its local cluster) on exit.

    Parameters
    ----------
    workers : int
        Processes of a LocalCluster, used when ``scheduler`` is None.
    scheduler : str, optional
        Address of a running scheduler.
    """
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise InputError("--workers/--scheduler need dask: pip install 'scarletstore[dask]'") from None
    cluster = None
    if scheduler is None:
        # one thread per process: the numba kernels and FFTs run in parallel,
        # and processes keep the tasks independent and deterministic. The
        # scheduler's HTTP server starts even without a dashboard, on port 8787
        # unless told otherwise, and warns on stderr when that port is taken (a
        # second cluster on the machine): any free port will do.
        with _workers_ignore_interrupt():
            cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                                   dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"},
                                   silence_logs=40)
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise InputError(f"cannot reach dask scheduler {scheduler}: {exc}") from None
    try:
        yield client
    except KeyboardInterrupt:
        # the interrupted gathers are not errors to report: the command
        # says "interrupted" (the scheduler logged "Couldn't gather keys")
        import logging

        logging.getLogger("distributed").setLevel(logging.CRITICAL)
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def completed(futures):
    """Results of ``futures`` as they finish, each released once yielded."""
    from dask.distributed import as_completed

    for fut in as_completed(futures):
        yield fut.result()
        fut.release()
