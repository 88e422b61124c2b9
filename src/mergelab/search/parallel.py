"""Trials on Ray: resident evaluator actors, each holding the sources in memory.

The driver keeps asking and telling the study (nothing else touches it); each of `slots`
actors receives the sources once (through Ray's object store), builds its own evaluator from
the search config's `evaluator` (a `module:function` importable on the workers, or the
evaluation layer's tasks), and runs one trial at a time (`evaluate_trial`). Ray is an optional
extra (`pip install 'mergelab[ray]'`); without it searches run in the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

from mergelab.cluster import connect
from mergelab.errors import MergeLabError
from mergelab.search.study import Evaluator, evaluate_trial


class RayWorkers:
    """`slots` Ray actors running trials (the pool interface of `run_search`).

    address: "auto" or a cluster address (`ray.init(address=...)`); None starts a local Ray
        with `slots` CPUs. An address that cannot be reached is a MergeLabError before any
        trial.
    make_evaluator: builds the evaluator inside each actor (called there, once).
    """

    def __init__(
        self,
        space,
        sources,
        make_evaluator: Callable[[], Evaluator],
        *,
        slots: int,
        objective: str,
        seed: int,
        address: str | None = None,
    ):
        if slots < 1:
            raise MergeLabError(f"--workers must be at least 1; got {slots}")
        self._connection = ExitStack()
        ray = self._connection.enter_context(
            connect(address, purpose="parallel search", num_cpus=slots)
        )
        self._ray = ray
        try:  # a failure here leaves no Ray started behind
            @ray.remote(num_cpus=1)
            class _Actor:
                def __init__(self, space, sources, factory, objective, seed):
                    self.args = (space, sources, factory(), objective, seed)

                def trial(self, key, config):
                    return key, evaluate_trial(config, *self.args)

            shared = ray.put(sources)
            self._actors = [_Actor.remote(space, shared, make_evaluator, objective, seed)
                            for _ in range(slots)]
            self._idle = list(self._actors)
            self._pending: dict = {}  # object ref -> actor
        except BaseException:
            self._connection.close()
            raise
        self.slots = slots

    def submit(self, key, config: dict) -> None:
        actor = self._idle.pop()
        self._pending[actor.trial.remote(key, config)] = actor

    def wait(self) -> list:
        ready, _ = self._ray.wait(list(self._pending), num_returns=1)
        done = []
        for ref in ready:
            self._idle.append(self._pending.pop(ref))
            done.append(self._ray.get(ref))
        return done

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._connection.close()
