"""Build a Llama-style ``megatron.core`` GPTModel from :class:`ModelConfig`.

RoPE, RMSNorm, SwiGLU (gated MLP with SiLU), no biases, grouped-query attention and
untied input/output embeddings by default; tied embeddings, query/key/value biases
(Qwen2) and Llama-3 or linear RoPE scaling are options, so that the Hugging Face
architectures of ``megatron_pwdpo.convert`` map onto it. On GPU the Transformer Engine
layer spec is used (it is what enables FP8); without CUDA the local spec, and every
fused kernel that needs apex or TE is switched off. This is the only place that
constructs a model, so a change of Megatron-Core's model class (GPTModel is deprecated
in 0.20) stays here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from megatron_pwdpo.model.precision import PrecisionConfig, transformer_config_kwargs
from megatron_pwdpo.platform import decisions as platform
from megatron_pwdpo.platform.decisions import BuildPlan, resolve_attention


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style decoder.

    Attributes:
        num_layers: transformer layers.
        hidden_size: model width.
        num_attention_heads: query heads.
        num_query_groups: key/value heads (grouped-query attention); ``None`` = MHA.
        ffn_hidden_size: inner width of the SwiGLU MLP.
        vocab_size: tokenizer vocabulary (padded for the embedding, see
            :func:`padded_vocab_size`).
        max_seq_length: longest sequence the RoPE tables cover.
        rotary_base: RoPE theta.
        norm_epsilon: RMSNorm epsilon.
        init_method_std: std of the normal weight init.
        untie_embeddings: untied input and output embeddings (Llama default).
        vocab_pad_multiple: the embedding's vocabulary is padded up to a multiple of this
            and of ``parallel.tensor_parallel`` (see :func:`padded_vocab_size`).
        kv_channels: width of one attention head; ``None`` = ``hidden_size //
            num_attention_heads`` (Mistral-Nemo-style models set it explicitly).
        qkv_bias: biases on the query, key and value projections only (Qwen2).
        rope_scaling: ``none`` (no scaling), ``llama3`` (Llama 3.1 frequency scaling,
            Megatron-Core's fixed low/high frequency factors 1 and 4 over an original
            context of 8192) or ``linear`` (positions divided by the factor, i.e. position
            interpolation).
        rope_scaling_factor: the scaling factor of ``rope_scaling``.
        attention: the core attention (:func:`resolve_attention`): ``auto`` = Transformer
            Engine's fused attention where TE is in use, else ``sdpa``; ``sdpa`` =
            ``torch.nn.functional.scaled_dot_product_attention``
            (:class:`megatron_pwdpo.model.attention.SDPAttention`: FlashAttention / memory-
            efficient kernels on GPU, the fused CPU kernel on CPU; causal, grouped-query
            and the block-diagonal mask of ``data.packing=masked``); ``local`` =
            Megatron-Core's unfused ``DotProductAttention`` (scores materialised). The
            same function and the same checkpoint either way; it is not part of a
            reference cache's fingerprint.
    """

    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int | None = 2
    ffn_hidden_size: int = 352
    vocab_size: int = 2048
    max_seq_length: int = 512
    rotary_base: int = 10000
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    untie_embeddings: bool = True
    vocab_pad_multiple: int = 64
    kv_channels: int | None = None
    qkv_bias: bool = False
    rope_scaling: Literal["none", "llama3", "linear"] = "none"
    rope_scaling_factor: float = 1.0
    attention: Literal["auto", "sdpa", "local"] = "auto"


@dataclass(frozen=True)
class ParallelConfig:
    """Megatron parallel layout of one model replica.

    Attributes:
        tensor_parallel: tensor-model-parallel size (within a node on GPU clusters).
        pipeline_parallel: pipeline stages.
        virtual_pipeline: model chunks per pipeline stage (interleaved 1F1B); ``None`` =
            one chunk per stage (no interleaving).
        sequence_parallel: shard the activations of norms and dropout over the
            tensor-parallel ranks along the sequence (needs Transformer Engine: GPU).
        logprob_chunk_size: compute the output layer and the vocab-parallel
            cross-entropy over chunks of this many sequence positions, each recomputed
            in the backward pass, so that the ``[s, b, V / tp]`` logits of only one
            chunk exist at a time (0 = the whole sequence at once).
        distributed_optimizer: shard the fp32 master weights and Adam's moments over the
            data-parallel ranks (Megatron's distributed optimizer): ``auto`` (on wherever
            data parallel > 1, as in the cluster examples), ``true`` or ``false``. Its
            checkpoints reshard to any layout (``fully_reshardable``).
    """

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None
    sequence_parallel: bool = False
    logprob_chunk_size: int = 0
    distributed_optimizer: Literal["auto", True, False] = "auto"


def padded_vocab_size(vocab_size: int, *, multiple: int, tensor_parallel: int) -> int:
    """Round ``vocab_size`` up to a multiple of ``multiple`` that ``tensor_parallel`` divides.

    The step is ``lcm(multiple, tensor_parallel)``, not Megatron-LM's ``multiple *
    tensor_parallel``: with a power-of-two ``multiple`` the padded size, and so the
    embedding's shape in a checkpoint, is then the same at TP=1, 2, 4, 8..., which lets
    a checkpoint written at one TP load at another (a vocabulary of 300 pads to 320 at
    every TP, where ``multiple * tensor_parallel`` gives 320 at TP=1 and 384 at TP=2).
    """
    step = math.lcm(multiple, tensor_parallel)
    return -(-vocab_size // step) * step


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    precision: PrecisionConfig | None = None,
    plan: BuildPlan | None = None,
):
    """Return the ``megatron.core`` TransformerConfig for a Llama-style model.

    ``precision`` (when given) sets the dtype and the FP8 fields and overrides
    ``params_dtype`` (see :mod:`megatron_pwdpo.model.precision`); ``plan`` sets the
    platform-dependent fields (fusions, initialisation, dispatcher, p2p batching: see
    :mod:`megatron_pwdpo.platform.decisions`), this machine's when None. Builds on any machine:
    a CPU test builds the config a GPU run builds by passing that platform's plan.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    if plan is None:
        plan = platform.plan_build(_Sections(model, parallel, precision), platform.detect())
    kwargs = {
        "params_dtype": params_dtype,
        "pipeline_dtype": params_dtype,
        "bf16": params_dtype == torch.bfloat16,
    }
    if precision is not None:
        kwargs.update(transformer_config_kwargs(precision))
    kwargs.update(plan.transformer_config)
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.kv_channels or model.hidden_size // model.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        sequence_parallel=parallel.sequence_parallel,
        variable_seq_lengths=True,
        **kwargs,
    )


@dataclass(frozen=True)
class _Sections:
    """The three config sections :func:`platform.plan_build` reads, without a RunConfig."""

    model: ModelConfig
    parallel: ParallelConfig
    precision: PrecisionConfig | None


def layer_spec(*, use_te: bool, attention: str = "auto"):
    """The transformer layer spec: Transformer Engine (GPU, FP8-capable) or local, with the
    core attention of :func:`resolve_attention` (``attention`` is ``model.attention``)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_pwdpo.model.attention import SDPAttention

    kind = resolve_attention(attention, use_te=use_te)
    if use_te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    core = {"sdpa": SDPAttention, "local": DotProductAttention}.get(kind)
    if core is not None:
        spec.submodules.self_attention.submodules.core_attention = core
    return spec


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    params_dtype: torch.dtype = torch.float32,
    precision: PrecisionConfig | None = None,
    plan: BuildPlan | None = None,
    on_cpu: bool = False,
    initialize: bool = True,
):
    """Build this rank's stage of the model (parallel state must be initialised).

    ``precision`` (bf16, FP8) overrides ``params_dtype``; ``plan`` is this machine's
    (:func:`megatron_pwdpo.platform.decisions.plan_build`) when None, the CPU platform's with
    ``on_cpu`` (the converters, on a GPU machine too). The parameters are created on the
    CPU (``use_cpu_initialization``) and moved to this rank's GPU, if any;
    ``initialize=False`` leaves them uninitialised (``torch.empty``: no time spent, no
    memory touched) for a caller that overwrites every one of them.

    Returns:
        a ``megatron.core.models.gpt.GPTModel``; its forward with ``labels=`` returns the
        per-token vocab-parallel cross-entropy ``[b, s]`` (no vocabulary gather), over
        chunks of ``parallel.logprob_chunk_size`` positions when that is set
        (:class:`megatron_pwdpo.model.logprob_model.LogprobGPTModel`), and over the real
        vocabulary only (the padded rows are excluded from the softmax).
    """
    from megatron_pwdpo.model.logprob_model import LogprobGPTModel

    if plan is None:
        on = platform.CPU if on_cpu else platform.detect()
        plan = platform.plan_build(_Sections(model, parallel, precision), on)
    config = transformer_config(
        model, parallel, params_dtype=params_dtype, precision=precision, plan=plan
    )
    config.perform_initialization = initialize
    if config.fp8 and plan.layer_spec != "te":
        raise RuntimeError("precision.fp8 needs CUDA and Transformer Engine (the TE layer spec)")
    gpt = LogprobGPTModel(
        real_vocab_size=model.vocab_size,
        logprob_chunk_size=parallel.logprob_chunk_size,
        config=config,
        transformer_layer_spec=layer_spec(
            use_te=plan.layer_spec == "te", attention=model.attention
        ),
        vocab_size=padded_vocab_size(
            model.vocab_size,
            multiple=model.vocab_pad_multiple,
            tensor_parallel=parallel.tensor_parallel,
        ),
        max_sequence_length=model.max_seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not model.untie_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        rope_scaling=model.rope_scaling == "llama3",
        rope_scaling_factor=model.rope_scaling_factor,
        seq_len_interpolation_factor=(
            model.rope_scaling_factor if model.rope_scaling == "linear" else None
        ),
        vp_stage=vp_stage,
    )
    if plan.backend == "nccl":
        gpt.cuda(torch.cuda.current_device())
    return gpt
