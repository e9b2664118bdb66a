"""The errors the distributed runtime raises, each with the gRPC status it maps to."""


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
