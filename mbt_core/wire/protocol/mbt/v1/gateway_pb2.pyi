from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as _branch_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_OK: _ClassVar[Outcome]
    OUTCOME_MASKED: _ClassVar[Outcome]
    OUTCOME_REJECTED: _ClassVar[Outcome]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_OK: Outcome
OUTCOME_MASKED: Outcome
OUTCOME_REJECTED: Outcome

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class BranchInfo(_message.Message):
    __slots__ = ("branch", "outcome", "node_id", "hedged", "latency_ms")
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEDGED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    branch: int
    outcome: Outcome
    node_id: str
    hedged: bool
    latency_ms: float
    def __init__(self, branch: _Optional[int] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., node_id: _Optional[str] = ..., hedged: _Optional[bool] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("layer", "branches", "latency_ms", "lost_weight")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    LOST_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    branches: _containers.RepeatedCompositeFieldContainer[BranchInfo]
    latency_ms: float
    lost_weight: float
    def __init__(self, layer: _Optional[int] = ..., branches: _Optional[_Iterable[_Union[BranchInfo, _Mapping]]] = ..., latency_ms: _Optional[float] = ..., lost_weight: _Optional[float] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("index", "token_id", "text", "layers", "latency_ms")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_id: int
    text: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    latency_ms: float
    def __init__(self, index: _Optional[int] = ..., token_id: _Optional[int] = ..., text: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("text", "return_logprobs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    text: str
    return_logprobs: bool
    def __init__(self, text: _Optional[str] = ..., return_logprobs: _Optional[bool] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("log_likelihood", "tokens", "perplexity", "masked_branch_steps", "logprobs")
    LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    MASKED_BRANCH_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    log_likelihood: float
    tokens: int
    perplexity: float
    masked_branch_steps: int
    logprobs: _branch_pb2.Tensor
    def __init__(self, log_likelihood: _Optional[float] = ..., tokens: _Optional[int] = ..., perplexity: _Optional[float] = ..., masked_branch_steps: _Optional[int] = ..., logprobs: _Optional[_Union[_branch_pb2.Tensor, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "address", "branches", "healthy", "latency_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    branches: _containers.RepeatedScalarFieldContainer[str]
    healthy: bool
    latency_ms: float
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., branches: _Optional[_Iterable[str]] = ..., healthy: _Optional[bool] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class BranchStatus(_message.Message):
    __slots__ = ("layer", "branch", "live_replicas", "weight", "last_outcome", "recent_ok", "recent_masked", "recent_rejected")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    LIVE_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LAST_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    RECENT_OK_FIELD_NUMBER: _ClassVar[int]
    RECENT_MASKED_FIELD_NUMBER: _ClassVar[int]
    RECENT_REJECTED_FIELD_NUMBER: _ClassVar[int]
    layer: int
    branch: int
    live_replicas: int
    weight: float
    last_outcome: Outcome
    recent_ok: int
    recent_masked: int
    recent_rejected: int
    def __init__(self, layer: _Optional[int] = ..., branch: _Optional[int] = ..., live_replicas: _Optional[int] = ..., weight: _Optional[float] = ..., last_outcome: _Optional[_Union[Outcome, str]] = ..., recent_ok: _Optional[int] = ..., recent_masked: _Optional[int] = ..., recent_rejected: _Optional[int] = ...) -> None: ...

class ExpansionStatus(_message.Message):
    __slots__ = ("state", "from_version", "to_version", "beta", "target", "drift_kl", "probe_perplexity", "base_perplexity", "reason", "new_branches")
    STATE_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DRIFT_KL_FIELD_NUMBER: _ClassVar[int]
    PROBE_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    BASE_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NEW_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    state: str
    from_version: int
    to_version: int
    beta: float
    target: float
    drift_kl: float
    probe_perplexity: float
    base_perplexity: float
    reason: str
    new_branches: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, state: _Optional[str] = ..., from_version: _Optional[int] = ..., to_version: _Optional[int] = ..., beta: _Optional[float] = ..., target: _Optional[float] = ..., drift_kl: _Optional[float] = ..., probe_perplexity: _Optional[float] = ..., base_perplexity: _Optional[float] = ..., reason: _Optional[str] = ..., new_branches: _Optional[_Iterable[str]] = ...) -> None: ...

class FanoutPolicy(_message.Message):
    __slots__ = ("mode", "request_timeout_s", "quorum_branches", "quorum_weight", "grace_ms", "deadline_ms", "min_branches", "hedge")
    MODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    QUORUM_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    QUORUM_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRACE_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    HEDGE_FIELD_NUMBER: _ClassVar[int]
    mode: str
    request_timeout_s: float
    quorum_branches: int
    quorum_weight: float
    grace_ms: float
    deadline_ms: float
    min_branches: int
    hedge: bool
    def __init__(self, mode: _Optional[str] = ..., request_timeout_s: _Optional[float] = ..., quorum_branches: _Optional[int] = ..., quorum_weight: _Optional[float] = ..., grace_ms: _Optional[float] = ..., deadline_ms: _Optional[float] = ..., min_branches: _Optional[int] = ..., hedge: _Optional[bool] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("model_id", "model_version", "manifest_sha256", "policy", "nodes", "branches", "fanout_policy", "expansion")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    FANOUT_POLICY_FIELD_NUMBER: _ClassVar[int]
    EXPANSION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_version: int
    manifest_sha256: str
    policy: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    branches: _containers.RepeatedCompositeFieldContainer[BranchStatus]
    fanout_policy: FanoutPolicy
    expansion: ExpansionStatus
    def __init__(self, model_id: _Optional[str] = ..., model_version: _Optional[int] = ..., manifest_sha256: _Optional[str] = ..., policy: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., branches: _Optional[_Iterable[_Union[BranchStatus, _Mapping]]] = ..., fanout_policy: _Optional[_Union[FanoutPolicy, _Mapping]] = ..., expansion: _Optional[_Union[ExpansionStatus, _Mapping]] = ...) -> None: ...
