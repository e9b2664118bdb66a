"""The error the distributed runtime raises for a worker that failed or went away."""


class ClusterError(RuntimeError):
    """A worker failed or is unreachable; the message names it."""
