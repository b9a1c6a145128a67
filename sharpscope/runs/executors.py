"""Where tasks run: in process, a process pool, or Dask distributed (a local cluster, one worker per
GPU with dask-cuda, or a remote scheduler).

Worker processes this module starts die with the process that started them: each runs a watchdog
thread that exits the process once its parent is gone (its parent id changes when the parent dies,
however it died -- SIGKILL included), so a killed ``sharpscope spectrum --executor process:2`` or
``dask-local:2`` leaves no orphans. Remote clusters (``dask://``) are not ours to stop.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable

__all__ = ["executor_from_spec", "die_with_parent"]

EXECUTORS = "local, process:N, dask-local:N, dask-cuda[:N] or dask://HOST:PORT"


class _DeferredTask:
    """A task of the in-process executor: computed by ``result()``."""

    def __init__(self, fn: Callable, *args: Any) -> None:
        self.fn, self.args = fn, args

    def result(self) -> Any:
        return self.fn(*self.args)


def die_with_parent(interval: float = 0.5) -> None:
    """Start a daemon thread that ends this process (exit status 1) once its parent process is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="sharpscope-die-with-parent", daemon=True).start()


def _dask_plugins():
    """A nanny plugin and a worker plugin that start :func:`die_with_parent` in each process."""
    from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin

    class DieWithParentNanny(NannyPlugin):
        name = "sharpscope-die-with-parent-nanny"

        def setup(self, nanny) -> None:
            die_with_parent()

    class DieWithParentWorker(WorkerPlugin):
        name = "sharpscope-die-with-parent-worker"

        def setup(self, worker) -> None:
            die_with_parent()

    return DieWithParentNanny(), DieWithParentWorker()


def _local_dask(cluster_class, **kwargs):
    from distributed import Client

    cluster = cluster_class(dashboard_address=None, **kwargs)
    client = Client(cluster)
    for plugin in _dask_plugins():
        client.register_plugin(plugin)
    return client, lambda: (client.close(), cluster.close())


def executor_from_spec(spec: str):
    """``local`` | ``process:N`` | ``dask-local:N`` | ``dask-cuda[:N]`` | ``dask://HOST:PORT`` ->
    ``(submit, shutdown, completed)``: ``submit(fn, *args)`` returns a future, ``completed(futures)``
    yields them as they finish. ``dask-cuda`` is dask-cuda's LocalCUDACluster: one worker per GPU (or
    the first N GPUs), each pinned to its device."""
    if spec == "local":  # tasks run one by one, when their result is asked for (so progress shows)
        return _DeferredTask, lambda: None, iter
    if spec.startswith("process:"):
        pool = ProcessPoolExecutor(max_workers=_count(spec), initializer=die_with_parent)
        return pool.submit, lambda: pool.shutdown(cancel_futures=True), as_completed
    if spec.startswith(("dask-local:", "dask-cuda", "dask://", "tcp://")):
        try:
            from distributed import Client, LocalCluster
            from distributed import as_completed as dask_as_completed
        except ImportError:
            raise ValueError("the Dask executors need the 'dask' extra: pip install 'sharpscope[dask]'") from None
        if spec.startswith("dask-local:"):
            client, stop = _local_dask(LocalCluster, n_workers=_count(spec), threads_per_worker=1, processes=True)
        elif spec.startswith("dask-cuda"):
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError:
                raise ValueError("executor 'dask-cuda' needs dask-cuda (one worker per GPU): "
                                 "pip install 'sharpscope[dask-cuda]'") from None
            count = {} if spec == "dask-cuda" else {"n_workers": _count(spec)}
            client, stop = _local_dask(LocalCUDACluster, threads_per_worker=1, **count)
        else:
            client = Client(spec.replace("dask://", "tcp://"))
            stop = client.close
        return (lambda fn, *a: client.submit(fn, *a, pure=False, retries=2)), stop, dask_as_completed
    raise ValueError(f"unknown executor {spec!r}: use {EXECUTORS}")


def _count(spec: str) -> int:
    try:
        n = int(spec.split(":", 1)[1])
    except (ValueError, IndexError):
        n = 0
    if n < 1:
        raise ValueError(f"executor {spec!r}: the worker count must be a positive integer")
    return n
