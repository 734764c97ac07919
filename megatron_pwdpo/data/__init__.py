"""Point-wise data: canonical rows, source converters (TRL's formats among them) and their
detection, tokenizers, tokenisation, collation, packing, preprocessed (memory-mapped) rows
and the resumable sampler."""

from megatron_pwdpo.data.hf_tokenizer import HFTokenizer, load_tokenizer
from megatron_pwdpo.data.indexed import load_preprocessed, read_indexed, write_indexed
from megatron_pwdpo.data.loading import QA_MODES, SOURCES, detect_source, load_source_rows
from megatron_pwdpo.data.packing import pack_ffd, pack_rows
from megatron_pwdpo.data.readers import read_pairwise, read_pointwise
from megatron_pwdpo.data.sampler import GlobalBatchSampler
from megatron_pwdpo.data.schema import (
    DataError,
    PairwiseRow,
    PointwiseRow,
    atomic_open,
    iter_jsonl,
    pair_rows,
    read_pointwise_jsonl,
    validate_pair,
    validate_row,
    write_jsonl,
)
from megatron_pwdpo.data.sources import (
    golden_hh_pairs,
    golden_hh_rows,
    hh_rlhf_pairs,
    hh_rlhf_rows,
    split_transcript,
)
from megatron_pwdpo.data.sources_qa import (
    qa_feedback_pair_rows,
    qa_feedback_pairs,
    qa_feedback_rows,
)
from megatron_pwdpo.data.sources_redteam import red_team_rows
from megatron_pwdpo.data.sources_trl import trl_rows
from megatron_pwdpo.data.tokenize import TokenizedRow, TokenizeStats, collate, tokenize_rows
from megatron_pwdpo.data.tokenizer import (
    RESPONSE_PREFIX,
    SentencePieceTokenizer,
    Tokenizer,
    render_prompt,
    row_texts,
    train_sentencepiece,
)

__all__ = [
    "QA_MODES",
    "RESPONSE_PREFIX",
    "SOURCES",
    "DataError",
    "GlobalBatchSampler",
    "HFTokenizer",
    "PairwiseRow",
    "PointwiseRow",
    "SentencePieceTokenizer",
    "TokenizeStats",
    "TokenizedRow",
    "Tokenizer",
    "atomic_open",
    "collate",
    "detect_source",
    "golden_hh_pairs",
    "golden_hh_rows",
    "hh_rlhf_pairs",
    "hh_rlhf_rows",
    "iter_jsonl",
    "load_preprocessed",
    "load_source_rows",
    "load_tokenizer",
    "pack_ffd",
    "pack_rows",
    "pair_rows",
    "qa_feedback_pair_rows",
    "qa_feedback_pairs",
    "qa_feedback_rows",
    "read_indexed",
    "read_pairwise",
    "read_pointwise",
    "read_pointwise_jsonl",
    "red_team_rows",
    "render_prompt",
    "row_texts",
    "split_transcript",
    "tokenize_rows",
    "train_sentencepiece",
    "trl_rows",
    "validate_pair",
    "validate_row",
    "write_indexed",
    "write_jsonl",
]
