"""A worker's status for one step reaches the client as that status, not UNAVAILABLE."""

from edgeheads.headnode.cluster_errors import CapacityError, ClusterError
from edgeheads.headnode.relay_driver import error_from_reply


def test_a_workers_status_is_carried_through():
    assert error_from_reply("RESOURCE_EXHAUSTED", "cache guard").code == "RESOURCE_EXHAUSTED"
    assert error_from_reply("FAILED_PRECONDITION", "no session s").code == "FAILED_PRECONDITION"
    assert error_from_reply("NOT_A_STATUS", "?").code == "UNAVAILABLE"
    assert not isinstance(error_from_reply("RESOURCE_EXHAUSTED", "x"), CapacityError)  # no cluster-down
    assert str(error_from_reply("FAILED_PRECONDITION", "gone")) == "FAILED_PRECONDITION: gone"
    assert ClusterError("x").code == "UNAVAILABLE" and CapacityError("x").code == "RESOURCE_EXHAUSTED"
