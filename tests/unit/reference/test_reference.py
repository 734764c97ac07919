"""Reference strategies without a process group: ULMA's demonstration skipping, the
offload swap (bitwise), the cache file and its checks, and the config rules."""

import math
import shutil

import numpy as np
import pytest
import torch
from conftest import write_reference_cache

from megatron_pwdpo.cli import DEFAULT_CONFIG, main
from megatron_pwdpo.config import ConfigError, load_config
from megatron_pwdpo.data.hf_tokenizer import load_tokenizer
from megatron_pwdpo.data.tokenize import TokenizedRow
from megatron_pwdpo.reference.cache import (
    cache_logps_by_id,
    checkpoint_digest,
    load_cache_table,
    skipped_rows,
)
from megatron_pwdpo.reference.strategies import (
    CacheReference,
    OffloadReference,
    _Strategy,
)

TOKENIZER = DEFAULT_CONFIG.parent / "data" / "tokenizer.model"


def _row(index, *, label, demo, length=6):
    ids = np.arange(1, length + 1, dtype=np.int64) + index
    return TokenizedRow(index, ids, 2, label, demo, f"row-{index}")


ROWS = [
    _row(0, label=1.0, demo=True),
    _row(1, label=0.0, demo=False),
    _row(2, label=1.0, demo=False),  # desirable feedback: not a demonstration
    _row(3, label=1.0, demo=True),
    _row(4, label=0.3, demo=False),
]


def _batch(rows):
    return {"row_index": torch.tensor([r.row_index for r in rows])}


class _Recorder(_Strategy):
    """Returns -row_index as each row's log-prob and records the micro-batches it ran."""

    def __init__(self, **kwargs):
        super().__init__(
            rebatch=lambda rows: [_batch(rows[i : i + 2]) for i in range(0, len(rows), 2)], **kwargs
        )
        self.ran = []

    def _run(self, micro_batches, *, reduction):
        self.ran += [b["row_index"].tolist() for b in micro_batches]
        return [-b["row_index"].float() for b in micro_batches]


def test_ulma_skips_demonstrations_and_scatters_nan_back():
    ref = _Recorder(is_last_stage=True)
    batches = [_batch(ROWS[:3]), _batch(ROWS[3:])]
    out = ref.logps(batches, reduction="sum", rows={r.row_index: r for r in ROWS})
    assert ref.ran == [[1, 2], [4]]  # demonstrations 0 and 3 never reach the model
    assert [t.shape[0] for t in out] == [3, 2]
    assert math.isnan(out[0][0]) and math.isnan(out[1][0])
    assert out[0][1:].tolist() == [-1.0, -2.0] and out[1][1].item() == -4.0
    assert skipped_rows(ROWS) == 2
    # without rows (every other loss) everything runs, in the loop's own micro-batches
    ref.ran = []
    assert [t.tolist() for t in ref.logps(batches, reduction="sum")] == [[0, -1, -2], [-3, -4]]
    assert ref.ran == [[0, 1, 2], [3, 4]]


def test_only_the_last_stage_gets_log_probs_and_all_demo_batches_run_nothing():
    ref = _Recorder(is_last_stage=False)
    assert ref.logps([_batch(ROWS)], reduction="sum", rows={r.row_index: r for r in ROWS}) == []
    last = _Recorder(is_last_stage=True)
    demos = [ROWS[0], ROWS[3]]
    out = last.logps([_batch(demos)], reduction="sum", rows={r.row_index: r for r in demos})
    assert last.ran == [] and torch.isnan(out[0]).all()


class _FakeSchedule:
    """Megatron's forward_backward_func: records the weights the model holds, optionally fails."""

    def __init__(self, fail=False):
        self.seen, self.fail = [], fail

    def __call__(self, *, model, num_microbatches, forward_only, **_):
        assert forward_only
        self.seen.append([p.detach().clone() for p in model[0].parameters()])
        if self.fail:
            raise RuntimeError("boom")
        return [{"logps": torch.zeros(2)} for _ in range(num_microbatches)]


def _bits(module):
    return [p.detach().clone().view(torch.int32) for p in module.parameters()]


@pytest.mark.parametrize("fail", [False, True], ids=["pass", "failing-pass"])
def test_offload_swap_restores_the_policy_bitwise(fail):
    torch.manual_seed(0)
    policy = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    schedule = _FakeSchedule(fail=fail)
    ref = OffloadReference(
        [policy], forward_backward_func=schedule, seq_length=8, rebatch=None, is_last_stage=True
    )
    reference_weights = [p.detach().clone() for p in policy.parameters()]
    with torch.no_grad():  # training moves the policy away from the reference
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 1e-3).mul_(1.0001)
            p.grad = torch.randn_like(p)
    before, grads = _bits(policy), [p.grad.clone() for p in policy.parameters()]
    policy.train()
    batches = [{"tokens": torch.zeros(2, 4, dtype=torch.long)}]
    if fail:
        with pytest.raises(RuntimeError, match="boom"):
            ref.logps(batches, reduction="sum")
    else:
        assert len(ref.logps(batches, reduction="sum")) == 1
    # the pass saw the reference weights; afterwards the policy is bit for bit itself
    for seen, want in zip(schedule.seen[0], reference_weights, strict=True):
        assert torch.equal(seen, want)
    for now, was in zip(_bits(policy), before, strict=True):
        assert torch.equal(now, was)
    for p, g in zip(policy.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    assert policy.training


# --------------------------------------------------------------------------- the cache


@pytest.fixture
def reference_ckpt(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (ckpt / "__0_0.distcp").write_bytes(np.arange(3 << 20, dtype=np.int32).tobytes())  # 12 MiB
    return ckpt


def _config(ckpt, *extra):
    return load_config(
        DEFAULT_CONFIG,
        [
            "train.sft_steps=0",
            f"train.init_checkpoint={ckpt}",
            "reference.mode=cache",
            "reference.cache_path=unused",
            *extra,
        ],
    )


def _write(path, config, rows, *, logps=None):
    tokenizer = load_tokenizer(TOKENIZER)
    logps = -np.arange(1, len(rows) + 1, dtype=np.float32) if logps is None else logps
    write_reference_cache(path, config, rows, tokenizer, logps)
    return tokenizer


def test_cache_round_trip_by_row_index(tmp_path, reference_ckpt):
    config = _config(reference_ckpt)
    path = tmp_path / "ref.npz"
    shuffled = [ROWS[3], ROWS[1], ROWS[4], ROWS[0], ROWS[2]]
    tokenizer = _write(path, config, shuffled)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ref.npz"]  # no temp left
    table = load_cache_table(path, config, ROWS, tokenizer)
    assert table.tolist() == [-4.0, -2.0, -5.0, -1.0, -3.0]
    assert cache_logps_by_id(path)["row-4"] == -3.0
    ref = CacheReference(table, rebatch=lambda rows: [_batch(rows)], is_last_stage=True)
    out = ref.logps([_batch([ROWS[4], ROWS[1]])], reduction="sum")
    assert out[0].tolist() == [-3.0, -2.0]
    ulma = ref.logps([_batch(ROWS[:2])], reduction="sum", rows={r.row_index: r for r in ROWS})
    assert math.isnan(ulma[0][0]) and ulma[0][1].item() == -2.0


def test_a_copied_checkpoint_has_the_same_digest_a_changed_one_not(tmp_path, reference_ckpt):
    copy = tmp_path / "elsewhere"
    shutil.copytree(reference_ckpt, copy)
    assert checkpoint_digest(copy) == checkpoint_digest(reference_ckpt)
    shard = copy / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # the last block is always sampled
    shard.write_bytes(bytes(data))
    assert checkpoint_digest(copy) != checkpoint_digest(reference_ckpt)


@pytest.mark.parametrize(
    ("run_overrides", "message"),
    [
        (["loss.logp_reduction=mean"], "stale: its logp_reduction is sum, this run's is mean"),
        (["data.seq_length=128"], "stale: its seq_length is 256"),
        (["model.rotary_base=500000"], "stale: its model is"),
        # computed in fp32, used by a bf16 run (and the reverse): another reference
        (["precision.dtype=bf16"], "stale: its reference_precision is fp32, this run's is bf16"),
    ],
)
def test_a_stale_cache_is_refused(tmp_path, reference_ckpt, run_overrides, message):
    path = tmp_path / "ref.npz"
    tokenizer = _write(path, _config(reference_ckpt), ROWS)
    with pytest.raises(ConfigError, match=message) as err:
        load_cache_table(path, _config(reference_ckpt, *run_overrides), ROWS, tokenizer)
    assert "precompute-ref" in str(err.value)


def test_a_cache_of_another_checkpoint_is_refused(tmp_path, reference_ckpt):
    path = tmp_path / "ref.npz"
    tokenizer = _write(path, _config(reference_ckpt), ROWS)
    (reference_ckpt / "metadata.json").write_text('{"sharded_backend": "torch_dist", "x": 1}')
    with pytest.raises(ConfigError, match="stale: its reference_checkpoint is"):
        load_cache_table(path, _config(reference_ckpt), ROWS, tokenizer)


def test_an_incomplete_or_retokenised_cache_is_refused(tmp_path, reference_ckpt):
    path = tmp_path / "ref.npz"
    config = _config(reference_ckpt)
    non_demo = [r for r in ROWS if not r.is_demo]
    tokenizer = _write(path, config, non_demo)  # what precompute writes for ULMA
    ulma = _config(reference_ckpt, "loss.name=ulma")
    assert load_cache_table(path, ulma, ROWS, tokenizer).isnan().sum() == 2
    with pytest.raises(ConfigError, match=r"lacks 2 of the 5 rows this run needs \(e.g. 'row-0'\)"):
        load_cache_table(path, config, ROWS, tokenizer)
    changed = [*ROWS[:4], _row(4, label=0.3, demo=False, length=7)]
    with pytest.raises(ConfigError, match="1 rows have other tokens .* 'row-4'"):
        load_cache_table(path, ulma, changed, tokenizer)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="is not a reference cache"):
        load_cache_table(tmp_path / "junk.npz", config, ROWS, tokenizer)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reference.mode=cache"], "reference.mode=cache needs reference.cache_path"),
        (
            ["reference.mode=cache", "reference.cache_path=x.npz"],
            "reference.mode=cache needs a fixed reference, but train.sft_steps > 0",
        ),
        (
            ["reference.mode=cache", "reference.cache_path=x.npz", "train.sft_steps=0"],
            "needs the reference's checkpoint: set reference.checkpoint or train.init_checkpoint",
        ),
        (
            [
                "reference.mode=cache",
                "reference.cache_path=x",
                "train.sft_steps=0",
                "loss.name=kto",
            ],
            "reference.mode=cache cannot serve loss.name=kto",
        ),
        (["reference.checkpoint=ckpt"], "reference.checkpoint is set but train.sft_steps > 0"),
        (["reference.mode=remote"], "reference.mode: 'remote' is not one of"),
    ],
)
def test_reference_config_rules(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULT_CONFIG, overrides)


def test_valid_reference_configs():
    load_config(DEFAULT_CONFIG, ["reference.mode=offload"])
    config = load_config(
        DEFAULT_CONFIG,
        [
            "reference.mode=cache",
            "reference.cache_path=ref.npz",
            "train.sft_steps=0",
            "reference.checkpoint=ckpt",
        ],
    )
    assert config.reference.checkpoint == "ckpt"
    load_config(DEFAULT_CONFIG, ["loss.name=sft", "reference.mode=none"])


def test_precompute_without_a_reference_checkpoint_stops_with_one_line(tmp_path, capsys):
    assert main(["precompute-ref", "--out", str(tmp_path / "ref.npz")]) == 2
    err = capsys.readouterr().err
    assert "needs the reference's checkpoint" in err and err.count("\n") == 1
    assert not (tmp_path / "ref.npz").exists()
