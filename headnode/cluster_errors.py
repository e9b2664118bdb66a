"""The errors the distributed runtime raises, each with the gRPC status it maps to."""

import asyncio


class ClusterError(RuntimeError):
    """A worker failed or is unreachable; the message names it."""

    code = "UNAVAILABLE"  # a grpc.StatusCode name

    def __init__(self, *args, code: str | None = None) -> None:
        super().__init__(*args)
        if code is not None:  # a worker's own status (its cache guard, a dropped session): carried through
            self.code = code


class CapacityError(ClusterError):
    """The workers there are cannot hold the model (or a block): the cluster serves again once
    memory returns, e.g. when a worker joins."""

    code = "RESOURCE_EXHAUSTED"


def cancelled_here() -> bool:
    """Whether the running task is being cancelled (Task.cancel). asyncio.CancelledError also
    comes out of a gRPC call whose channel was closed under it (grpc.aio raises it for any call
    cancelled on this side): for the task awaiting that call, a failed call to a worker, to be
    raised as a ClusterError, and not a cancellation of its own (a client that went away).
    Without Task.cancelling (Python 3.10) every CancelledError counts as the task's own."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0
