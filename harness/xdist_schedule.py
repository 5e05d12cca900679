"""An xdist scheduler for scenarios in the order harness.schedule.paired gives them: worker k starts on positions k
and k + workers (a long scenario, and the short one it is paired with), then every worker that comes free takes the
longest scenario still waiting. xdist's own load scheduler would start worker 0 on the first two, the two longest.
"""
from __future__ import annotations

from xdist.scheduler import LoadScheduling


class DurationScheduling(LoadScheduling):  # type: ignore[misc]  # xdist's schedulers carry no type information
    def schedule(self) -> None:
        if self.collection is not None or not self.collection_is_completed:  # type: ignore[has-type]
            super().schedule()
            return
        if not self._check_nodes_have_same_collection():
            self.log("**Different tests collected, aborting run**")
            return
        collection: list[str] = next(iter(self.node2collection.values()))
        self.collection = collection
        self.pending[:] = range(len(collection))
        if not collection:
            return
        if self.maxschedchunk is None:  # type: ignore[has-type]  # LoadScheduling's attribute, untyped
            self.maxschedchunk = len(collection)
        count = len(self.nodes)
        for k, node in enumerate(self.nodes):
            first = [index for index in (k, k + count) if index < len(collection)]
            for index in first:
                self.pending.remove(index)
            self.node2pending[node].extend(first)
            node.send_runtest_some(first)
        if not self.pending:
            for node in self.nodes:
                node.shutdown()
