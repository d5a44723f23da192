from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
COMPRESSION_NONE: Compression

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "buffer", "compression")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    buffer: bytes
    compression: Compression
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., buffer: _Optional[bytes] = ..., compression: _Optional[_Union[Compression, str]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServedBranch(_message.Message):
    __slots__ = ("layer", "branch", "artifact_sha256")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    layer: int
    branch: int
    artifact_sha256: str
    def __init__(self, layer: _Optional[int] = ..., branch: _Optional[int] = ..., artifact_sha256: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_sessions", "max_cached_tokens", "max_message_bytes", "max_steps_per_call", "max_tokens_per_call", "max_sessions_per_caller", "max_cached_tokens_per_caller")
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_PER_CALLER_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHED_TOKENS_PER_CALLER_FIELD_NUMBER: _ClassVar[int]
    max_sessions: int
    max_cached_tokens: int
    max_message_bytes: int
    max_steps_per_call: int
    max_tokens_per_call: int
    max_sessions_per_caller: int
    max_cached_tokens_per_caller: int
    def __init__(self, max_sessions: _Optional[int] = ..., max_cached_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_steps_per_call: _Optional[int] = ..., max_tokens_per_call: _Optional[int] = ..., max_sessions_per_caller: _Optional[int] = ..., max_cached_tokens_per_caller: _Optional[int] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("node_id", "model_id", "model_version", "manifest_sha256", "branches", "device", "dtype", "protocol_version", "limits", "d_model", "context_length", "open_sessions", "cached_tokens")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    model_id: str
    model_version: int
    manifest_sha256: str
    branches: _containers.RepeatedCompositeFieldContainer[ServedBranch]
    device: str
    dtype: DType
    protocol_version: int
    limits: Limits
    d_model: int
    context_length: int
    open_sessions: int
    cached_tokens: int
    def __init__(self, node_id: _Optional[str] = ..., model_id: _Optional[str] = ..., model_version: _Optional[int] = ..., manifest_sha256: _Optional[str] = ..., branches: _Optional[_Iterable[_Union[ServedBranch, _Mapping]]] = ..., device: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., protocol_version: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., d_model: _Optional[int] = ..., context_length: _Optional[int] = ..., open_sessions: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class SessionStep(_message.Message):
    __slots__ = ("session_id", "start", "length", "secret")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start: int
    length: int
    secret: bytes
    def __init__(self, session_id: _Optional[str] = ..., start: _Optional[int] = ..., length: _Optional[int] = ..., secret: _Optional[bytes] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("layer", "branches", "steps", "inputs", "request_id")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    layer: int
    branches: _containers.RepeatedScalarFieldContainer[int]
    steps: _containers.RepeatedCompositeFieldContainer[SessionStep]
    inputs: Tensor
    request_id: int
    def __init__(self, layer: _Optional[int] = ..., branches: _Optional[_Iterable[int]] = ..., steps: _Optional[_Iterable[_Union[SessionStep, _Mapping]]] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., request_id: _Optional[int] = ...) -> None: ...

class BranchOutput(_message.Message):
    __slots__ = ("branch", "outputs")
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    branch: int
    outputs: Tensor
    def __init__(self, branch: _Optional[int] = ..., outputs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("outputs", "compute_seconds")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[BranchOutput]
    compute_seconds: float
    def __init__(self, outputs: _Optional[_Iterable[_Union[BranchOutput, _Mapping]]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class CallError(_message.Message):
    __slots__ = ("code", "details", "cache_length")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    code: int
    details: str
    cache_length: int
    def __init__(self, code: _Optional[int] = ..., details: _Optional[str] = ..., cache_length: _Optional[int] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    response: ForwardResponse
    error: CallError
    def __init__(self, request_id: _Optional[int] = ..., response: _Optional[_Union[ForwardResponse, _Mapping]] = ..., error: _Optional[_Union[CallError, _Mapping]] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("session_id", "secret")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    secret: bytes
    def __init__(self, session_id: _Optional[str] = ..., secret: _Optional[bytes] = ...) -> None: ...

class EndSessionResponse(_message.Message):
    __slots__ = ("released_caches",)
    RELEASED_CACHES_FIELD_NUMBER: _ClassVar[int]
    released_caches: int
    def __init__(self, released_caches: _Optional[int] = ...) -> None: ...
