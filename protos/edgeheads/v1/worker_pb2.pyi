from edgeheads.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProbeRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("received",)
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    received: int
    def __init__(self, received: _Optional[int] = ...) -> None: ...

class SetMemoryLimitRequest(_message.Message):
    __slots__ = ("memory_limit_bytes",)
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    memory_limit_bytes: int
    def __init__(self, memory_limit_bytes: _Optional[int] = ...) -> None: ...

class HasWeightsRequest(_message.Message):
    __slots__ = ("content_hashes",)
    CONTENT_HASHES_FIELD_NUMBER: _ClassVar[int]
    content_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, content_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class HasWeightsReply(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, present: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadBlockChunk(_message.Message):
    __slots__ = ("block_id", "model_shape_json", "content_hash", "chunk")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHAPE_JSON_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    model_shape_json: str
    content_hash: str
    chunk: _tensor_pb2.Chunk
    def __init__(self, block_id: _Optional[str] = ..., model_shape_json: _Optional[str] = ..., content_hash: _Optional[str] = ..., chunk: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ...) -> None: ...

class LoadBlockReply(_message.Message):
    __slots__ = ("block_id", "content_hash", "weight_bytes", "reused")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    content_hash: str
    weight_bytes: int
    reused: bool
    def __init__(self, block_id: _Optional[str] = ..., content_hash: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., reused: _Optional[bool] = ...) -> None: ...

class UnloadBlocksRequest(_message.Message):
    __slots__ = ("block_ids",)
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, block_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class UnloadBlocksReply(_message.Message):
    __slots__ = ("unloaded",)
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    unloaded: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, unloaded: _Optional[_Iterable[str]] = ...) -> None: ...

class BlockOp(_message.Message):
    __slots__ = ("block_id", "inputs", "output")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    output: str
    def __init__(self, block_id: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., output: _Optional[str] = ...) -> None: ...

class CallRequest(_message.Message):
    __slots__ = ("session", "epoch", "position", "inputs", "ops", "return_values", "reserve_tokens")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    RETURN_VALUES_FIELD_NUMBER: _ClassVar[int]
    RESERVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session: str
    epoch: int
    position: int
    inputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    ops: _containers.RepeatedCompositeFieldContainer[BlockOp]
    return_values: _containers.RepeatedScalarFieldContainer[str]
    reserve_tokens: int
    def __init__(self, session: _Optional[str] = ..., epoch: _Optional[int] = ..., position: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., ops: _Optional[_Iterable[_Union[BlockOp, _Mapping]]] = ..., return_values: _Optional[_Iterable[str]] = ..., reserve_tokens: _Optional[int] = ...) -> None: ...

class CallReply(_message.Message):
    __slots__ = ("outputs", "compute_seconds")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    compute_seconds: float
    def __init__(self, outputs: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("destination", "values")
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    destination: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, destination: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class ProgramCall(_message.Message):
    __slots__ = ("ops", "inputs", "routes")
    OPS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[BlockOp]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, ops: _Optional[_Iterable[_Union[BlockOp, _Mapping]]] = ..., inputs: _Optional[_Iterable[str]] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class InstallProgramRequest(_message.Message):
    __slots__ = ("epoch", "calls", "peers", "transport")
    class PeersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    calls: _containers.RepeatedCompositeFieldContainer[ProgramCall]
    peers: _containers.ScalarMap[str, str]
    transport: str
    def __init__(self, epoch: _Optional[int] = ..., calls: _Optional[_Iterable[_Union[ProgramCall, _Mapping]]] = ..., peers: _Optional[_Mapping[str, str]] = ..., transport: _Optional[str] = ...) -> None: ...

class InstallProgramReply(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: int
    def __init__(self, calls: _Optional[int] = ...) -> None: ...

class RelayEndpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RelayEndpointReply(_message.Message):
    __slots__ = ("port",)
    PORT_FIELD_NUMBER: _ClassVar[int]
    port: int
    def __init__(self, port: _Optional[int] = ...) -> None: ...

class ValueBatch(_message.Message):
    __slots__ = ("session", "epoch", "position", "values", "path_compute_seconds", "reserve_tokens")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    PATH_COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESERVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session: str
    epoch: int
    position: int
    values: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    path_compute_seconds: float
    reserve_tokens: int
    def __init__(self, session: _Optional[str] = ..., epoch: _Optional[int] = ..., position: _Optional[int] = ..., values: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., path_compute_seconds: _Optional[float] = ..., reserve_tokens: _Optional[int] = ...) -> None: ...

class DriveReply(_message.Message):
    __slots__ = ("session", "epoch", "position", "values", "error_code", "error_message", "path_compute_seconds")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PATH_COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session: str
    epoch: int
    position: int
    values: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    error_code: str
    error_message: str
    path_compute_seconds: float
    def __init__(self, session: _Optional[str] = ..., epoch: _Optional[int] = ..., position: _Optional[int] = ..., values: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., path_compute_seconds: _Optional[float] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DropSessionRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class DropSessionReply(_message.Message):
    __slots__ = ("caches_dropped",)
    CACHES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    caches_dropped: int
    def __init__(self, caches_dropped: _Optional[int] = ...) -> None: ...

class ExportBlockStateRequest(_message.Message):
    __slots__ = ("block_id", "include_weights", "from_positions", "max_bytes_per_second")
    class FromPositionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    FROM_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    include_weights: bool
    from_positions: _containers.ScalarMap[str, int]
    max_bytes_per_second: float
    def __init__(self, block_id: _Optional[str] = ..., include_weights: _Optional[bool] = ..., from_positions: _Optional[_Mapping[str, int]] = ..., max_bytes_per_second: _Optional[float] = ...) -> None: ...

class PullBlockRequest(_message.Message):
    __slots__ = ("block_id", "source_address", "model_shape_json", "content_hash", "delta", "timeout_seconds")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHAPE_JSON_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    source_address: str
    model_shape_json: str
    content_hash: str
    delta: bool
    timeout_seconds: float
    def __init__(self, block_id: _Optional[str] = ..., source_address: _Optional[str] = ..., model_shape_json: _Optional[str] = ..., content_hash: _Optional[str] = ..., delta: _Optional[bool] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class ExportBlockStatesRequest(_message.Message):
    __slots__ = ("blocks", "max_bytes_per_second")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[ExportBlockStateRequest]
    max_bytes_per_second: float
    def __init__(self, blocks: _Optional[_Iterable[_Union[ExportBlockStateRequest, _Mapping]]] = ..., max_bytes_per_second: _Optional[float] = ...) -> None: ...

class PullItem(_message.Message):
    __slots__ = ("block_id", "content_hash")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    content_hash: str
    def __init__(self, block_id: _Optional[str] = ..., content_hash: _Optional[str] = ...) -> None: ...

class PullBlocksRequest(_message.Message):
    __slots__ = ("source_address", "model_shape_json", "blocks", "delta", "timeout_seconds")
    SOURCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHAPE_JSON_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    source_address: str
    model_shape_json: str
    blocks: _containers.RepeatedCompositeFieldContainer[PullItem]
    delta: bool
    timeout_seconds: float
    def __init__(self, source_address: _Optional[str] = ..., model_shape_json: _Optional[str] = ..., blocks: _Optional[_Iterable[_Union[PullItem, _Mapping]]] = ..., delta: _Optional[bool] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class PullBlocksReply(_message.Message):
    __slots__ = ("blocks",)
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[PullBlockReply]
    def __init__(self, blocks: _Optional[_Iterable[_Union[PullBlockReply, _Mapping]]] = ...) -> None: ...

class PullBlockReply(_message.Message):
    __slots__ = ("block_id", "bytes", "weights_sent", "sessions", "rows", "seconds")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SENT_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    bytes: int
    weights_sent: bool
    sessions: int
    rows: int
    seconds: float
    def __init__(self, block_id: _Optional[str] = ..., bytes: _Optional[int] = ..., weights_sent: _Optional[bool] = ..., sessions: _Optional[int] = ..., rows: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class TelemetryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerTelemetry(_message.Message):
    __slots__ = ("name", "memory_available_bytes", "memory_used_bytes", "compute_flops", "blocks", "sessions", "relay_frames_received", "memory_limit_bytes", "memory_limit_source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FLOPS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    RELAY_FRAMES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    memory_available_bytes: int
    memory_used_bytes: int
    compute_flops: float
    blocks: _containers.RepeatedScalarFieldContainer[str]
    sessions: int
    relay_frames_received: int
    memory_limit_bytes: int
    memory_limit_source: str
    def __init__(self, name: _Optional[str] = ..., memory_available_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., compute_flops: _Optional[float] = ..., blocks: _Optional[_Iterable[str]] = ..., sessions: _Optional[int] = ..., relay_frames_received: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., memory_limit_source: _Optional[str] = ...) -> None: ...
