"""The pieces for Megatron-LM's pretrain(): items stacked by the default collate give the
same loss as our own micro-batches of the same rows (point-wise DPO and ULMA, whose
demonstrations have no reference), the reference comes from precompute-ref's checked
``.npz``, the YAML gives Megatron-LM's defaults and contradicting flags are named, the SFT
stage is training.plan's, and what that path cannot do is refused up front, one line each.
The example under the real pretrain(): tests/dist/test_pretrain_real.py."""

import functools
import math
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_reference_cache

from megatron_pwdpo.cli import DEFAULT_CONFIG
from megatron_pwdpo.config import ConfigError, LossConfig, load_config
from megatron_pwdpo.data.hf_tokenizer import load_tokenizer
from megatron_pwdpo.data.sampler import GlobalBatchSampler
from megatron_pwdpo.data.tokenize import TokenizedRow
from megatron_pwdpo.engine.batches import rank_micro_batches
from megatron_pwdpo.engine.step import loss_func
from megatron_pwdpo.integrations.megatron_lm import (
    PointwiseRowDataset,
    build_datasets,
    make_forward_step,
    model_provider,
    reference_logps,
    select_stage,
)
from megatron_pwdpo.integrations.megatron_lm_args import (
    check_supported,
    checkpoint_problems,
    contradictions,
    megatron_args,
    unsupported,
)
from megatron_pwdpo.reference.cache import cache_rows

TOKENIZER = DEFAULT_CONFIG.parent / "data" / "tokenizer.model"
EXAMPLE = Path(__file__).parents[3] / "examples" / "megatron_lm" / "pretrain_pwdpo.py"


def _rows():
    g = np.random.default_rng(0)
    out = []
    for i in range(4):
        ids = g.integers(4, 50, size=int(g.integers(6, 12)))
        out.append(TokenizedRow(i, ids, 3, float(i % 2), i % 2 == 1, f"r{i}"))
    return out


def _ulma_rows():
    """Demonstrations (label 1), negatives, desirable feedback and a soft label."""
    g = np.random.default_rng(1)
    spec = [(1.0, True), (0.0, False), (1.0, True), (1.0, False), (0.3, False), (0.0, False)]
    out = []
    for i, (label, demo) in enumerate(spec):
        ids = g.integers(4, 50, size=int(g.integers(6, 12)))
        out.append(TokenizedRow(i, ids, 3, label, demo, f"u{i}"))
    return out


def _fake_token_logps(batch):
    """Depends only on each target token, so padding width does not matter."""
    return -0.1 * (batch["target_ids"] % 7 + 1).float()


def _naive_row_logp(row):
    """Sum of ``_fake_token_logps`` over the response targets (eos included)."""
    targets = row.input_ids[row.prompt_len :]
    return float(sum(-0.1 * (t % 7 + 1) for t in targets))


def test_default_collate_batch_gives_our_loss():
    rows = _rows()
    ref = {r.id: -1.5 + 0.1 * i for i, r in enumerate(rows)}
    loss_cfg = LossConfig(name="pointwise_dpo", beta=0.5, logp_reduction="sum")
    ds = PointwiseRowDataset(rows, seq_length=16, pad_id=0, global_batch_size=4, ref_logps=ref)
    theirs = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    ours = rank_micro_batches(
        rows, dp_rank=0, dp_size=1, micro_batch_size=4, pad_id=0, weights=np.full(4, 0.25)
    )[0]
    ours["ref_logps"] = torch.tensor([ref[r.id] for r in rows])
    step = make_forward_step(loss_cfg, num_microbatches=1, data_parallel_size=1)
    kwargs = step.keywords  # objective, reduction, grad_scale bound for Megatron-LM
    a, ra = loss_func(_fake_token_logps(theirs), batch=theirs, **kwargs)
    b, rb = loss_func(_fake_token_logps(ours), batch=ours, **kwargs)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    for key in ra:
        torch.testing.assert_close(ra[key], rb[key])


def _pairs(count: int = 4):
    """Chosen/rejected rows with the ids ``pair_up`` reads (``<pair>-c``, ``<pair>-r``)."""
    g = np.random.default_rng(2)
    rows = []
    for i in range(count):
        for side, label in (("c", 1.0), ("r", 0.0)):
            ids = g.integers(4, 50, size=int(g.integers(6, 12)))
            rows.append(TokenizedRow(len(rows), ids, 3, label, label == 1.0, f"p{i}-{side}"))
    return rows


class _NextOnly:
    """Megatron-LM's ``RerunDataIterator``: ``__next__`` and no ``__iter__``."""

    def __init__(self, source):
        self.source = source

    def __next__(self):
        return next(self.source)


@pytest.mark.parametrize("name", ["dpo", "ipo"])
def test_pairwise_items_stack_chosen_then_rejected_and_give_our_loss(name, monkeypatch):
    """Two micro-batches of 2 pairs: Megatron-LM's collate of items [4 j, 4 j + 4) is
    ``rank_micro_batches``' micro-batch j (chosen rows, then rejected), with one loss
    weight per pair; the loss and metrics are those of our own loop."""
    from megatron_pwdpo.engine.batches import pair_up

    pairs = pair_up(_pairs())
    ref = {r.id: -2.0 + 0.1 * r.row_index for pair in pairs for r in pair}
    loss_cfg = LossConfig(name=name, beta=0.3, logp_reduction="sum")
    ds = PointwiseRowDataset(
        pairs, seq_length=16, pad_id=0, global_batch_size=4, ref_logps=ref, loss_name=name,
        micro_batch_size=2,
    )  # fmt: skip
    assert len(ds) == 8
    assert [int(ds[i]["label"]) for i in range(8)] == [1, 1, 0, 0, 1, 1, 0, 0]
    ours = rank_micro_batches(
        pairs, dp_rank=0, dp_size=1, micro_batch_size=2, pad_id=0, weights=np.full(4, 0.25)
    )
    step = make_forward_step(loss_cfg, num_microbatches=2, data_parallel_size=1)
    monkeypatch.setattr(
        "megatron_pwdpo.engine.step.model_token_logps",
        lambda model, tokens, positions, targets, mask, **_: _fake_token_logps(
            {"target_ids": targets}
        ),
    )
    loader = iter(torch.utils.data.DataLoader(ds, batch_size=4))
    loader = _NextOnly(loader)
    for j, batch in enumerate(ours):
        mine = [r for pair in pairs[2 * j : 2 * j + 2] for r in pair]
        batch["ref_logps"] = torch.tensor([ref[r.id] for r in mine[0::2] + mine[1::2]])

        output, loss_of = step(loader, torch.nn.Linear(1, 1))  # a CPU "model"
        theirs = loss_of.keywords["batch"]
        assert theirs["weight"].tolist() == [0.25, 0.25]
        torch.testing.assert_close(theirs["ref_logps"], batch["ref_logps"])
        a, ra = loss_of(output)
        kwargs = {k: loss_of.keywords[k] for k in ("objective", "reduction", "grad_scale")}
        b, rb = loss_func(_fake_token_logps(batch), batch=batch, **kwargs)
        assert a.item() == pytest.approx(b.item(), rel=1e-6), j
        for key in ra:
            torch.testing.assert_close(ra[key], rb[key])
    with pytest.raises(ValueError, match="need micro_batch_size"):
        PointwiseRowDataset(pairs, seq_length=16, pad_id=0, global_batch_size=4, ref_logps=ref)


def test_missing_reference_is_refused():
    rows = _rows()
    with pytest.raises(KeyError, match="no reference log-prob for 1 rows"):
        PointwiseRowDataset(
            rows,
            seq_length=16,
            pad_id=0,
            global_batch_size=4,
            ref_logps={r.id: 0.0 for r in rows[:3]},
        )


# --------------------------------------------------------------------------- ULMA


def test_ulma_with_demonstrations_matches_a_naive_formula_and_the_training_path():
    rows = _ulma_rows()
    beta, w_sft, log_z, g = 0.7, 0.5, 0.2, len(rows)
    # what precompute-ref writes for ULMA: no demonstration
    ref = {r.id: -2.0 + 0.3 * r.row_index for r in rows if not r.is_demo}
    loss_cfg = LossConfig(
        name="ulma", beta=beta, sft_weight=w_sft, log_z=log_z, logp_reduction="sum"
    )
    ds = PointwiseRowDataset(
        rows, seq_length=16, pad_id=0, global_batch_size=g, ref_logps=ref, loss_name="ulma"
    )
    items = [ds[i] for i in range(g)]
    assert [math.isnan(it["ref_logps"].item()) for it in items] == [r.is_demo for r in rows]
    theirs = next(iter(torch.utils.data.DataLoader(ds, batch_size=g)))
    kwargs = make_forward_step(loss_cfg, num_microbatches=1, data_parallel_size=1).keywords

    token_logps = _fake_token_logps(theirs).requires_grad_()
    loss, report = loss_func(token_logps, batch=theirs, **kwargs)
    loss.backward()
    assert torch.isfinite(token_logps.grad).all()  # NaN references do not leak

    # independent formula, in float64 Python
    expected = 0.0
    for r in rows:
        logp, z = _naive_row_logp(r), r.label
        term = -z * w_sft * logp
        if not r.is_demo:
            reward = beta * (logp - ref[r.id]) + log_z
            term -= (1 - z) * math.log(1 / (1 + math.exp(reward)))  # log sigmoid(-r)
        expected += term / g
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    # the training path (training/): our micro-batches, NaN where ULMA skips the reference
    ours = rank_micro_batches(
        rows, dp_rank=0, dp_size=1, micro_batch_size=g, pad_id=0, weights=np.full(g, 1 / g)
    )[0]
    ours["ref_logps"] = torch.tensor([ref.get(r.id, float("nan")) for r in rows])
    b, rb = loss_func(_fake_token_logps(ours), batch=ours, **kwargs)
    assert loss.item() == pytest.approx(b.item(), rel=1e-6)
    for key in report:
        torch.testing.assert_close(report[key], rb[key], equal_nan=True)


def test_an_all_demonstration_ulma_batch_needs_no_reference():
    rows = [r for r in _ulma_rows() if r.is_demo]
    ds = PointwiseRowDataset(
        rows, seq_length=16, pad_id=0, global_batch_size=2, ref_logps={}, loss_name="ulma"
    )
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    loss_cfg = LossConfig(name="ulma", logp_reduction="sum")
    kwargs = make_forward_step(loss_cfg, num_microbatches=1, data_parallel_size=1).keywords
    loss, _ = loss_func(_fake_token_logps(batch), batch=batch, **kwargs)
    assert loss.item() == pytest.approx(-sum(map(_naive_row_logp, rows)) / 2, rel=1e-5)


def test_only_ulma_demonstrations_may_lack_a_reference():
    rows = _ulma_rows()
    no_demos = {r.id: 0.0 for r in rows if not r.is_demo}
    common = {"seq_length": 16, "pad_id": 0, "global_batch_size": 6}
    with pytest.raises(KeyError, match="no reference log-prob for 2 rows, e.g. u0"):
        PointwiseRowDataset(rows, ref_logps=no_demos, loss_name="pointwise_dpo", **common)
    without_u4 = {k: v for k, v in no_demos.items() if k != "u4"}  # a soft label needs one
    with pytest.raises(KeyError, match="for 1 rows, e.g. u4"):
        PointwiseRowDataset(rows, ref_logps=without_u4, loss_name="ulma", **common)
    with pytest.raises(ValueError, match="loss.name=ulma needs ref_logps"):
        PointwiseRowDataset(rows, loss_name="ulma", **common)
    assert "ref_logps" not in PointwiseRowDataset(rows, loss_name="sft", **common)[0]


# --------------------------------------------------------------------------- the .npz cache


@pytest.fixture
def reference_ckpt(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (ckpt / "__0_0.distcp").write_bytes(np.arange(1 << 10, dtype=np.int32).tobytes())
    return ckpt


def _config(ckpt, *extra):
    return load_config(
        DEFAULT_CONFIG, ["train.sft_steps=0", f"train.init_checkpoint={ckpt}", *extra]
    )


def _write(path, config, rows, tokenizer):
    """A cache as precompute-ref writes it, with log-prob ``-1 - row_index / 10``."""
    logps = np.array([-1.0 - r.row_index / 10 for r in rows], dtype=np.float32)
    write_reference_cache(path, config, rows, tokenizer, logps)


def test_ulma_reads_a_precompute_ref_cache_without_demonstrations(tmp_path, reference_ckpt):
    tokenizer = load_tokenizer(TOKENIZER)
    rows, path = _ulma_rows(), tmp_path / "ref.npz"
    ulma = _config(reference_ckpt, "loss.name=ulma")
    _write(path, ulma, cache_rows(rows, loss_name="ulma"), tokenizer)
    ref = reference_logps(ulma, rows, tokenizer, ref_cache=path)
    assert ref == pytest.approx({r.id: -1.0 - r.row_index / 10 for r in rows if not r.is_demo})
    ds = PointwiseRowDataset(
        rows, seq_length=16, pad_id=0, global_batch_size=6, ref_logps=ref, loss_name="ulma"
    )
    got = [ds[i]["ref_logps"].item() for i in range(len(rows))]
    want = [float("nan") if r.is_demo else np.float32(-1.0 - r.row_index / 10) for r in rows]
    np.testing.assert_array_equal(got, want)
    # reference.cache_path is the default; SFT reads no cache
    from_config = _config(reference_ckpt, "loss.name=ulma", f"reference.cache_path={path}")
    assert reference_logps(from_config, rows, tokenizer) == ref
    assert reference_logps(_config(reference_ckpt, "loss.name=sft"), rows, tokenizer) is None


def test_an_incomplete_or_stale_cache_is_refused(tmp_path, reference_ckpt):
    tokenizer = load_tokenizer(TOKENIZER)
    rows, path = _ulma_rows(), tmp_path / "ref.npz"
    _write(path, _config(reference_ckpt), cache_rows(rows, loss_name="ulma"), tokenizer)
    dpo = _config(reference_ckpt)
    with pytest.raises(ConfigError, match=rf"{path} lacks 2 of the 6 rows .* \(e.g. 'u0'\)"):
        reference_logps(dpo, rows, tokenizer, ref_cache=path)
    mean = _config(reference_ckpt, "loss.name=ulma", "loss.logp_reduction=mean")
    with pytest.raises(ConfigError, match=f"{path} is stale: its logp_reduction is sum"):
        reference_logps(mean, rows, tokenizer, ref_cache=path)
    retokenised = [*rows[:5], TokenizedRow(5, rows[5].input_ids[:-1], 3, 0.0, False, "u5")]
    ulma = _config(reference_ckpt, "loss.name=ulma")
    with pytest.raises(ConfigError, match="stale: 1 rows have other tokens .* 'u5'"):
        reference_logps(ulma, retokenised, tokenizer, ref_cache=path)
    (reference_ckpt / "metadata.json").write_text('{"sharded_backend": "torch_dist", "x": 1}')
    with pytest.raises(ConfigError, match="stale: its reference_checkpoint is"):
        reference_logps(ulma, rows, tokenizer, ref_cache=path)
    (tmp_path / "ref.json").write_text('{"u1": -1.0}')  # the old JSON map is no cache
    with pytest.raises(ConfigError, match="ref.json is not a reference cache"):
        reference_logps(ulma, rows, tokenizer, ref_cache=tmp_path / "ref.json")


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.name=unlikelihood"], "loss.name=unlikelihood is not supported"),
        (
            ["loss.name=kto", "reference.mode=resident", "reference.cache_path=null"],
            "loss.name=kto needs the reference model's weights",
        ),
        (["loss.name=dpo", "reference.cache_path=null"], "loss.name=dpo needs the reference"),
        (["loss.normalization=per_class"], "loss.normalization=per_class is not supported"),
        (["train.sft_steps=10"], "train.sft_steps=10 is not supported"),
        (["data.packing=masked"], "data.packing=masked is not supported"),
        (["reference.cache_path=null"], "loss.name=pointwise_dpo needs the reference log-probs"),
    ],
)
def test_each_unsupported_option_is_refused_in_one_line(overrides, message):
    config = load_config(
        DEFAULT_CONFIG, ["train.sft_steps=0", "reference.cache_path=ref.npz", *overrides]
    )
    problems = unsupported(config)
    assert len(problems) == 1 and "\n" not in problems[0]
    assert re.search(message, problems[0])
    with pytest.raises(ConfigError, match=message):
        check_supported(config)


def test_supported_configs_and_all_problems_at_once():
    base = ["train.sft_steps=0", "reference.cache_path=ref.npz"]
    for loss in ("pointwise_dpo", "ulma", "sft", "dpo", "ipo"):
        mean = ["loss.logp_reduction=mean"] if loss == "ipo" else []  # IPO's scale
        assert unsupported(load_config(DEFAULT_CONFIG, [*base, f"loss.name={loss}", *mean])) == []
    sft = load_config(DEFAULT_CONFIG, ["loss.name=sft", "train.sft_steps=100"])
    assert unsupported(sft) == []  # no cache, and sft_steps only matter to a preference loss
    no_cache = load_config(DEFAULT_CONFIG, ["train.sft_steps=0"])
    assert unsupported(no_cache, ref_cache="ref.npz") == []
    bad = ["loss.name=kto", "loss.normalization=per_class", "data.packing=masked"]
    assert len(unsupported(load_config(DEFAULT_CONFIG, ["train.sft_steps=5", *bad]))) == 4


@pytest.mark.parametrize(
    "loss",
    [
        LossConfig(name="kto"),
        LossConfig(name="pointwise_dpo", normalization="per_class"),
    ],
)
def test_make_forward_step_refuses_what_it_cannot_compute(loss):
    with pytest.raises(ConfigError, match="Megatron-LM's pretrain\\(\\) supports"):
        make_forward_step(loss, num_microbatches=1, data_parallel_size=1)


# --------------------------------------------------------------------------- the example's pieces
# (the example itself runs under the real pretrain() in tests/dist/test_pretrain_real.py)


def _args(config, stage, **flags):
    """Megatron-LM's parsed flags as the example gets them: the YAML's values (its
    ``args_defaults``) where a flag is not given, then ``flags``."""
    values = {dest: value for dest, value, _ in megatron_args(config, stage)}
    return types.SimpleNamespace(**{**values, **flags})


@functools.cache
def _default_data():
    from megatron_pwdpo.data.prepare import prepare_data

    return prepare_data(load_config(DEFAULT_CONFIG).data, vocab_size=2048)


def _stage(config, name="main"):
    """The stage of ``config`` (whose data section is the default config's)."""
    return select_stage(config, _default_data(), name)


def test_args_defaults_come_from_the_yaml_and_contradictions_name_both_values():
    config = load_config(DEFAULT_CONFIG, ["train.sft_steps=0", "reference.cache_path=r.npz"])
    stage = _stage(config)
    defaults = {dest: value for dest, value, _ in megatron_args(config, stage)}
    m = config.model
    assert (defaults["num_layers"], defaults["hidden_size"], defaults["ffn_hidden_size"]) == (
        m.num_layers,
        m.hidden_size,
        m.ffn_hidden_size,
    )
    assert defaults["num_attention_heads"] == m.num_attention_heads
    assert defaults["num_query_groups"] == m.num_query_groups and defaults["group_query_attention"]
    assert defaults["max_position_embeddings"] == m.max_seq_length
    assert defaults["seq_length"] == config.data.seq_length
    assert defaults["tokenizer_type"] == "SentencePieceTokenizer"
    assert defaults["tokenizer_model"] == str(config.data.tokenizer)
    assert defaults["train_iters"] == config.train.steps and defaults["lr"] == config.train.lr
    assert defaults["global_batch_size"] == config.train.global_batch_size
    assert contradictions(_args(config, stage), config, stage) == []
    # unset flags (None) are filled by the YAML; the layout and intervals are free
    free = _args(config, stage, num_layers=None, tensor_model_parallel_size=2, eval_iters=0)
    assert contradictions(free, config, stage) == []
    bad = _args(config, stage, hidden_size=256, train_iters=7, bf16=True)
    assert contradictions(bad, config, stage) == [
        f"--hidden-size 256 differs from the YAML's model.hidden_size={m.hidden_size}",
        f"--train-iters 7 differs from the YAML's train.steps={config.train.steps}",
        "--bf16 True differs from the YAML's precision.dtype (bf16)=False",
    ]
    refused = _args(config, stage, context_parallel_size=2, calculate_per_token_loss=True)
    lines = contradictions(refused, config, stage)
    assert [line.split(" is not supported")[0] for line in lines] == [
        "--context-parallel-size 2",
        "--calculate-per-token-loss",
    ]
    assert all("\n" not in line for line in lines)


def test_the_sft_stage_is_megatron_pwdpo_trains_sft_stage():
    """``--pwdpo-stage sft`` and ``loss.name=sft`` train the demonstrations with the
    token mean, as training.plan's SFT stage does; the sft stage's steps and LR are its own."""
    preference = load_config(DEFAULT_CONFIG)  # sft_steps > 0
    sft_stage = _stage(preference, "sft")
    sft_loss = _stage(load_config(DEFAULT_CONFIG, ["loss.name=sft"]))
    for stage in (sft_stage, sft_loss):
        assert stage.loss.name == "sft" and stage.loss.logp_reduction == "mean"
        assert stage.examples and all(r.is_demo for r in stage.examples)
    assert [r.id for r in sft_stage.examples] == [r.id for r in sft_loss.examples]
    defaults = {d: (v, k) for d, v, k in megatron_args(preference, sft_stage)}
    assert defaults["train_iters"] == (preference.train.sft_steps, "train.sft_steps")
    assert defaults["lr"] == (preference.train.sft_lr, "train.sft_lr")
    assert unsupported(preference, stage="sft") == []
    assert "train.sft_steps=100 is not supported in the main stage" in unsupported(preference)[0]
    no_sft = load_config(DEFAULT_CONFIG, ["train.sft_steps=0", "reference.cache_path=r"])
    assert unsupported(no_sft, stage="sft")[0].startswith("--pwdpo-stage sft needs an SFT")


def test_the_model_provider_takes_megatron_lm_016s_keywords():
    import inspect

    provider = model_provider(load_config(DEFAULT_CONFIG))
    params = inspect.signature(provider).parameters
    assert list(params) == ["pre_process", "post_process", "vp_stage", "config", "pg_collection"]
    assert all(p.default is not inspect.Parameter.empty for p in params.values())


def test_a_load_folder_without_a_usable_checkpoint_is_refused(tmp_path):
    from megatron_pwdpo.engine.checkpoint import MEGATRON_LM_TRACKER

    assert checkpoint_problems(None) == []
    empty = tmp_path / "empty"
    (line,) = checkpoint_problems(empty)
    assert line == f"--load {empty} has no {MEGATRON_LM_TRACKER}: no checkpoint to load"
    assert checkpoint_problems(empty, save=empty) == []  # a first run that resumes later
    ckpts = tmp_path / "ckpts"
    (ckpts / "iter_0000002").mkdir(parents=True)
    (ckpts / "iter_0000002" / "metadata.json").write_text("{}")
    (ckpts / "latest.txt").write_text("2\n")
    assert "write the iteration of its latest.txt" in checkpoint_problems(ckpts)[0]
    (ckpts / MEGATRON_LM_TRACKER).write_text("2\n")
    assert checkpoint_problems(ckpts) == []
    assert checkpoint_problems(ckpts / "iter_0000002") == [
        f"--load {ckpts / 'iter_0000002'} is one checkpoint: pass its folder, --load {ckpts}"
    ]
    (ckpts / MEGATRON_LM_TRACKER).write_text("5\n")
    assert "names iteration '5', not there" in checkpoint_problems(ckpts)[0]


def test_megatron_pwdpo_reads_a_pretrain_save_folder(tmp_path):
    from megatron_pwdpo.engine.checkpoint import MEGATRON_LM_TRACKER, resolve_checkpoint

    saved = tmp_path / "ckpts"
    for it in (2, 3):
        (saved / f"iter_000000{it}").mkdir(parents=True)
        (saved / f"iter_000000{it}" / "metadata.json").write_text("{}")
    (saved / MEGATRON_LM_TRACKER).write_text("3")
    assert resolve_checkpoint(saved) == saved / "iter_0000003"
    (saved / MEGATRON_LM_TRACKER).write_text("4")
    with pytest.raises(FileNotFoundError, match="names iter_0000004, not a torch_dist"):
        resolve_checkpoint(saved)


@pytest.mark.parametrize("balance", [False, True])
def test_megatron_lm_sampler_takes_the_global_batches_of_megatron_pwdpo_train(balance):
    """Megatron-LM's sequential sampler takes global batch k from items [k G, (k+1) G):
    they must be the rows ``megatron-pwdpo train`` puts in its global batch k, across
    epochs (a new permutation each), for as many samples as Megatron-LM asks."""
    config = load_config(DEFAULT_CONFIG, ["train.sft_steps=0", f"data.balance_classes={balance}"])

    def row(i, first, label):  # a row is told apart by its first token
        return TokenizedRow(i, np.array([first, 6, 7]), 1, label, False, f"r{first}")

    rows = [row(i, 5 + i, float(i % 3 == 0)) for i in range(10)]
    held_out = [row(i, 40 + i, 1.0) for i in range(3)]
    tokenizer = types.SimpleNamespace(pad_id=0)
    data = types.SimpleNamespace(train=rows, eval=held_out, tokenizer=tokenizer)
    G = 4
    refs = {r.id: -1.0 for r in rows + held_out}
    train, valid = build_datasets(config, data, refs, global_batch_size=G, num_samples=[44, 7])
    assert (len(train), len(valid)) == (44, 7)

    def row_of(item: int) -> int:
        return int(train[item]["tokens"][0]) - 5

    sampler = GlobalBatchSampler(
        len(rows),
        global_batch_size=G,
        seed=config.train.seed,
        labels=[r.label for r in rows],
        balance=balance,
    )  # as run_stage builds it for the point-wise DPO stage
    for k in range(44 // G):
        got = [row_of(i) for i in range(k * G, (k + 1) * G)]
        assert got == sampler.global_batch(k * G).tolist(), k
    epochs = [[row_of(i) for i in range(e * 10, e * 10 + 10)] for e in (0, 1)]
    if balance:  # desirable and undesirable rows alternate in pairs
        labels = [rows[i].label > 0.5 for i in epochs[0]]
        assert all(labels[j] != labels[j + 1] for j in range(0, len(labels), 2))
    else:  # each epoch a permutation, a new one
        assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(10))
        assert epochs[0] != epochs[1]
    assert [int(valid[i]["tokens"][0]) for i in range(7)] == [40, 41, 42, 40, 41, 42, 40]
    with pytest.raises(IndexError):
        train[44]


def test_pairwise_items_follow_megatron_pwdpo_trains_pair_stream_and_batch_sizes_double():
    """DPO: Megatron-LM's global batch k is items [2 k G, 2 (k+1) G) (G pairs); they hold
    the pairs ``megatron-pwdpo train`` puts in its global batch k, each micro-batch of
    2 m items its m pairs' chosen rows then rejected rows; Megatron-LM's batch sizes
    count rows: twice the YAML's, and the YAML's own value is then a contradiction."""
    config = load_config(
        DEFAULT_CONFIG,
        [
            "train.sft_steps=0",
            "loss.name=dpo",
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
        ],
    )
    rows = _pairs(10)
    for i, r in enumerate(rows):  # a row is told apart by its first token
        r.input_ids[0] = 5 + i
    tokenizer = types.SimpleNamespace(pad_id=0)
    data = types.SimpleNamespace(train=rows[:14], eval=rows[14:], tokenizer=tokenizer)
    G, m = config.train.global_batch_size, config.train.micro_batch_size
    refs = {r.id: -1.0 for r in rows}
    train, valid = build_datasets(config, data, refs, global_batch_size=G, num_samples=[48, 3])
    assert (len(train), len(valid)) == (48, 6)  # valid: at least every held-out pair
    sampler = GlobalBatchSampler(7, global_batch_size=G, seed=config.train.seed)
    for k in range(48 // (2 * G)):
        pairs = sampler.global_batch(k * G).tolist()
        expected = []
        for j in range(0, G, m):
            chunk = pairs[j : j + m]
            expected += [2 * p for p in chunk] + [2 * p + 1 for p in chunk]
        got = [int(train[i]["tokens"][0]) - 5 for i in range(2 * k * G, 2 * (k + 1) * G)]
        assert got == expected, k
    weights = [float(train[i]["weight"]) for i in range(2 * m)]
    assert weights == [1 / G] * m + [0.0] * m

    stage = select_stage(config, types.SimpleNamespace(**vars(data)))
    defaults = {dest: value for dest, value, _ in megatron_args(config, stage)}
    assert defaults["micro_batch_size"] == 2 * config.train.micro_batch_size
    assert defaults["global_batch_size"] == 2 * config.train.global_batch_size
    given = _args(config, stage, micro_batch_size=config.train.micro_batch_size)
    assert contradictions(given, config, stage) == [
        f"--micro-batch-size {m} differs from the YAML's 2 x train.micro_batch_size={2 * m}"
    ]
