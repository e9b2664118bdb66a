"""The errors the distributed runtime raises, each with the gRPC status it maps to."""


class ClusterError(RuntimeError):
    """A worker failed or is unreachable; the message names it."""

    code = "UNAVAILABLE"  # a grpc.StatusCode name


class CapacityError(ClusterError):
    """The workers there are cannot hold the model (or a block): the cluster serves again once
    memory returns, e.g. when a worker joins."""

    code = "RESOURCE_EXHAUSTED"
