"""What a Hugging Face decoder's ``config.json`` says, in the terms an exact width split needs.

Four families name the same few facts four ways (``n_embd`` or ``hidden_size``, ``rotary_pct``
or ``rope_parameters``, ...). This module reads them into one :class:`DecoderSpec` and decides,
before any weight is touched, whether the model can be cut into K branches: K must divide the
key-value head groups (so a branch owns whole groups and its own KV cache) and the MLP neurons.
Anything it cannot reproduce exactly is refused with one line that names the setting.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mbt_core.model.decoder import DecoderSpec, UnsupportedModel
from mbt_core.model.rope import RopeConfig
from mbt_core.model.slices import ACTIVATIONS

SUPPORTED = ("gpt2", "gpt_neox", "llama", "qwen2")
__all__ = ["SUPPORTED", "DecoderSpec", "UnsupportedModel", "read_spec", "spec_from_config"]


def read_spec(folder: Path) -> DecoderSpec:
    """Read ``folder/config.json``; a missing or unreadable file is one clear error."""
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnsupportedModel(
            f"{folder} has no config.json: is it a Hugging Face model folder?"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedModel(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UnsupportedModel(f"{path} is not a JSON object")
    return spec_from_config(data)


def spec_from_config(data: dict[str, Any]) -> DecoderSpec:
    model_type = data.get("model_type")
    if model_type not in SUPPORTED:
        raise UnsupportedModel(
            f"architecture {model_type!r} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    try:
        spec = _READERS[model_type](_Fields(data))
    except KeyError as exc:
        raise UnsupportedModel(f"{model_type} config.json lacks {exc.args[0]!r}") from None
    if spec.activation not in ACTIVATIONS:
        raise UnsupportedModel(
            f"activation {spec.activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
        )
    if spec.n_heads % spec.n_kv_heads:
        raise UnsupportedModel(
            f"{spec.n_heads} attention heads are not a multiple of {spec.n_kv_heads} KV heads"
        )
    return spec


class _Fields:
    """Typed access to config.json values, each failure naming the key."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.data.get(key)
        if value is None:
            if default is None:
                raise KeyError(key)
            value = default
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UnsupportedModel(f"config.json {key!r} must be a positive integer, got {value!r}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.data.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UnsupportedModel(f"config.json {key!r} must be a number, got {value!r}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise UnsupportedModel(f"config.json {key!r} must be true or false, got {value!r}")
        return value

    def eos(self) -> int | None:
        value = self.data.get("eos_token_id")
        if isinstance(value, list):  # some chat models list several; the first ends text
            value = value[0] if value else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def rope(self, head_dim: int, default_fraction: float = 1.0) -> RopeConfig:
        """Both spellings: ``rope_parameters`` (new) and ``rope_theta``/``rope_scaling`` (old)."""
        params = dict(self.data.get("rope_parameters") or {})
        scaling = self.data.get("rope_scaling") or {}
        if not isinstance(params, dict) or not isinstance(scaling, dict):
            raise UnsupportedModel("config.json rope settings must be JSON objects")
        params = {**scaling, **params}
        # GPT-NeoX configs name the base rotary_emb_base.
        base = self.data.get("rope_theta", self.data.get("rotary_emb_base", 10000.0))
        theta = params.get("rope_theta", base)
        fraction = params.get(
            "partial_rotary_factor",
            self.data.get("partial_rotary_factor", self.data.get("rotary_pct", default_fraction)),
        )
        rope_type = params.get("rope_type", params.get("type", "default"))
        extra = {
            key: params[key]
            for key in (
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            )
            if key in params and rope_type == "llama3"
        }
        try:
            return RopeConfig(
                rotary_dim=int(head_dim * float(fraction)),
                theta=float(theta),
                rope_type=str(rope_type),
                **extra,
            )
        except (TypeError, ValueError) as exc:
            raise UnsupportedModel(f"rope settings: {exc}") from None


def _gpt2(f: _Fields) -> DecoderSpec:
    d_model, n_heads = f.integer("n_embd"), f.integer("n_head")
    if f.flag("scale_attn_by_inverse_layer_idx", False) or f.flag("reorder_and_upcast_attn", False):
        raise UnsupportedModel("gpt2 attention rescaling by layer index is not supported")
    if not f.flag("scale_attn_weights", True):
        raise UnsupportedModel("gpt2 without attention weight scaling is not supported")
    return DecoderSpec(
        model_type="gpt2",
        vocab_size=f.integer("vocab_size"),
        d_model=d_model,
        n_blocks=f.integer("n_layer"),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=_head_dim(d_model, n_heads),
        intermediate_size=f.integer("n_inner", 4 * d_model),
        context_length=f.integer("n_positions"),
        norm="layernorm",
        norm_eps=f.number("layer_norm_epsilon", 1e-5),
        norm_bias=True,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        activation=str(f.data.get("activation_function", "gelu_new")),
        gated_mlp=False,
        parallel_residual=False,
        tied_embeddings=f.flag("tie_word_embeddings", True),
        rope=None,
        eos_token_id=f.eos(),
    )


def _gpt_neox(f: _Fields) -> DecoderSpec:
    d_model, n_heads = f.integer("hidden_size"), f.integer("num_attention_heads")
    head_dim = _head_dim(d_model, n_heads)
    return DecoderSpec(
        model_type="gpt_neox",
        vocab_size=f.integer("vocab_size"),
        d_model=d_model,
        n_blocks=f.integer("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=head_dim,
        intermediate_size=f.integer("intermediate_size"),
        context_length=f.integer("max_position_embeddings"),
        norm="layernorm",
        norm_eps=f.number("layer_norm_eps", 1e-5),
        norm_bias=True,
        qkv_bias=f.flag("attention_bias", True),
        out_bias=f.flag("attention_bias", True),
        mlp_bias=True,
        activation=str(f.data.get("hidden_act", "gelu")),
        gated_mlp=False,
        parallel_residual=f.flag("use_parallel_residual", True),
        tied_embeddings=f.flag("tie_word_embeddings", False),
        rope=f.rope(head_dim, default_fraction=0.25),
        eos_token_id=f.eos(),
    )


def _llama_like(f: _Fields, model_type: str) -> DecoderSpec:
    d_model, n_heads = f.integer("hidden_size"), f.integer("num_attention_heads")
    head_dim = f.integer("head_dim", _head_dim(d_model, n_heads))
    if model_type == "qwen2" and f.flag("use_sliding_window", False):
        raise UnsupportedModel("qwen2 sliding-window attention is not supported")
    if model_type == "llama" and f.integer("pretraining_tp", 1) != 1:
        raise UnsupportedModel("llama pretraining_tp other than 1 is not supported")
    qkv_bias = True if model_type == "qwen2" else f.flag("attention_bias", False)
    return DecoderSpec(
        model_type=model_type,
        vocab_size=f.integer("vocab_size"),
        d_model=d_model,
        n_blocks=f.integer("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=f.integer("num_key_value_heads", n_heads),
        head_dim=head_dim,
        intermediate_size=f.integer("intermediate_size"),
        context_length=f.integer("max_position_embeddings"),
        norm="rmsnorm",
        norm_eps=f.number("rms_norm_eps", 1e-6),
        norm_bias=False,
        qkv_bias=qkv_bias,
        out_bias=False if model_type == "qwen2" else f.flag("attention_bias", False),
        mlp_bias=False if model_type == "qwen2" else f.flag("mlp_bias", False),
        activation=str(f.data.get("hidden_act", "silu")),
        gated_mlp=True,
        parallel_residual=False,
        tied_embeddings=f.flag("tie_word_embeddings", False),
        rope=f.rope(head_dim),
        eos_token_id=f.eos(),
    )


def _head_dim(d_model: int, n_heads: int) -> int:
    if d_model % n_heads:
        raise UnsupportedModel(f"hidden size {d_model} is not a multiple of {n_heads} heads")
    return d_model // n_heads


def _llama(f: _Fields) -> DecoderSpec:
    return _llama_like(f, "llama")


def _qwen2(f: _Fields) -> DecoderSpec:
    return _llama_like(f, "qwen2")


_READERS: dict[str, Callable[[_Fields], DecoderSpec]] = {
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "llama": _llama,
    "qwen2": _qwen2,
}
