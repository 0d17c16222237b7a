"""Python client of normserve, the gRPC batch-norm service.

    import normserve
    client = normserve.connect("127.0.0.1:50051")
    session = client.create_session("2d", num_features=3)
    y = session.forward(x)                 # numpy in, numpy out; torch in, torch out
    session.eval()(x)                      # eval mode, like an nn.Module
    print(client.compare(x, candidate=mine))

`normserve.aio` is the asyncio client (`await session.forward(x)`), with the
same calls and exceptions. `client.temporary_session(...)` is a session for
a `with` block, deleted when it ends.

`normserve.torch.RemoteBatchNorm2d` (and 1d/3d) is an nn.Module running on
a session. The generated stubs are `normserve.v1` (`client.stubs` holds them
on the client's channel). torch is optional: it is imported only when torch
tensors are used or asked for.
"""

from normserve.client import Client, Stubs, TLSConfig, connect
from normserve.compare import CompareReport, Diagnosis, Difference, Hypothesis, ImplementationReport, TensorReport
from normserve.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NormserveError,
    NotFound,
    PermissionDenied,
    ReplayWithoutOutput,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from normserve.results import (
    DeviceInfo,
    ForwardResult,
    Limits,
    ServerInfo,
    SessionInfo,
    StandardScalerStatistics,
    StateExport,
)
from normserve.session import Session

__version__ = "0.1.0"

__all__ = [
    "Aborted", "AlreadyExists", "Cancelled", "Client", "CompareReport", "DataLoss", "DeadlineExceeded",
    "DeviceInfo", "Diagnosis", "Difference", "FailedPrecondition", "ForwardResult", "Hypothesis",
    "ImplementationReport", "Internal", "InvalidArgument", "Limits", "NormserveError", "NotFound",
    "PermissionDenied", "ReplayWithoutOutput", "ResourceExhausted", "ServerInfo", "Session", "SessionInfo",
    "StandardScalerStatistics", "StateExport", "Stubs", "TLSConfig", "TensorReport", "Unauthenticated", "Unavailable", "connect",
]
