"""Every batch's forward in lockstep: all stop at each hooked layer, so a layer can be fitted on all the data
before any batch goes past it. One forward's work over the data, at each batch's own size.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import torch

from ..errors import NormswapError


class Stop(BaseException):
    """Ends a batch's forward early (a partial pass, or an aborted run).

    A BaseException, so a model's own ``except Exception`` cannot swallow it and run on.
    """


class Lockstep:
    """Runs each batch's forward in its own thread, one thread at a time, all stopping at every hooked layer.

    Threads here are coroutines, not parallelism: the scheduler resumes batch 0
    until it reaches the next BN (or ends), then batch 1, and so on; when every
    batch waits at the same BN, that BN's statistics are pooled and set, and the
    round repeats. Each forward keeps its own batch size (cache-friendly: one
    64-image batch is ~1.5x slower than eight 8-image batches on resnet50 here).
    """

    def __init__(self, calls: list[Callable[[], Any]]):
        """``calls``: one forward each (e.g. ``functools.partial(model, *batch)``), run in this order per round."""
        self.calls = calls
        self.go = [threading.Semaphore(0) for _ in calls]
        self.back: queue.Queue = queue.Queue()
        self.local = threading.local()
        self.abort = False
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(calls))]

    def _run(self, i: int) -> None:
        self.local.index = i
        self.go[i].acquire()
        try:
            if self.abort:
                raise Stop
            with torch.no_grad():  # grad mode is per thread
                self.calls[i]()
            self.back.put((i, "done", None))
        except Stop:
            self.back.put((i, "stopped", None))
        except BaseException as e:  # noqa: BLE001 - handed to the scheduler, which raises it
            self.back.put((i, "error", e))

    def wait_at(self, key, payload) -> None:
        """Called from a hook in a batch's thread: report ``payload`` at ``key``, then sleep until resumed."""
        if self.abort:  # never block once the run is over (a forward that swallowed Stop runs on)
            raise Stop
        i = self.local.index
        self.back.put((i, "bn", (key, payload)))
        self.go[i].acquire()
        if self.abort:
            raise Stop

    def rounds(self):
        """Yield (key, [payload per live batch, in batch order]) at each stop; the caller acts, then resumes."""
        live = list(range(len(self.calls)))
        try:
            for t in self.threads:
                t.start()
            while live:
                arrivals = {}
                for i in live:
                    self.go[i].release()
                    j, kind, payload = self.back.get()
                    if kind == "error":
                        raise payload
                    if kind == "bn":
                        arrivals[j] = payload
                ended = [i for i in live if i not in arrivals]
                if arrivals and ended:
                    raise NormswapError(f"batches take different paths through the model: batch {ended[0]} ended "
                                        f"while batch {next(iter(arrivals))} waits at a layer",
                                        fix="recalibrate with batches the model treats alike, or max_samples=1")
                keys = {k for k, _ in arrivals.values()}
                if len(keys) > 1:
                    raise NormswapError("batches take different paths through the model: they reach different "
                                        "layers at the same point", fix="use batches the model treats alike (for recalibration: max_samples=1)")
                live = sorted(arrivals)
                if live:
                    yield next(iter(keys)), [arrivals[i][1] for i in live]
        finally:
            self.abort = True
            for i, t in enumerate(self.threads):
                if t.is_alive():
                    self.go[i].release()
            for t in self.threads:
                if t.ident is not None:  # started
                    t.join()
