"""Where tasks run: in process, a process pool, or Dask distributed (a local or a remote cluster)."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable

__all__ = ["executor_from_spec"]


class _DeferredTask:
    """A task of the in-process executor: computed by ``result()``."""

    def __init__(self, fn: Callable, *args: Any) -> None:
        self.fn, self.args = fn, args

    def result(self) -> Any:
        return self.fn(*self.args)


def executor_from_spec(spec: str):
    """``local`` | ``process:N`` | ``dask-local:N`` | ``dask://HOST:PORT`` -> ``(submit, shutdown, completed)``:
    ``submit(fn, *args)`` returns a future, ``completed(futures)`` yields them as they finish."""
    if spec == "local":  # tasks run one by one, when their result is asked for (so progress shows)
        return _DeferredTask, lambda: None, iter
    if spec.startswith("process:"):
        pool = ProcessPoolExecutor(max_workers=_count(spec))
        return pool.submit, lambda: pool.shutdown(cancel_futures=True), as_completed
    if spec.startswith("dask-local:") or spec.startswith("dask://") or spec.startswith("tcp://"):
        try:
            from distributed import Client, LocalCluster
            from distributed import as_completed as dask_as_completed
        except ImportError:
            raise ValueError("the Dask executors need the 'dask' extra: pip install 'sharpscope[dask]'") from None
        if spec.startswith("dask-local:"):
            cluster = LocalCluster(n_workers=_count(spec), threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            client = Client(cluster)
            stop = lambda: (client.close(), cluster.close())  # noqa: E731
        else:
            client = Client(spec.replace("dask://", "tcp://"))
            stop = client.close
        return (lambda fn, *a: client.submit(fn, *a, pure=False, retries=2)), stop, dask_as_completed
    raise ValueError(f"unknown executor {spec!r}: use local, process:N, dask-local:N or dask://HOST:PORT")


def _count(spec: str) -> int:
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"executor {spec!r}: the worker count must be a positive integer")
    return n

