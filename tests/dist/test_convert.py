"""Hugging Face <-> Megatron conversion: logits parity at TP=1, TP=2 and PP=2, exact round trip.

Small random Hugging Face models are built from their configs (no download) for each
supported architecture: Llama 3 (GQA, llama3 RoPE scaling, untied), Llama 2 style (MHA,
linear RoPE scaling, tied embeddings), Mistral (GQA, head_dim != hidden/heads) and Qwen2
(q/k/v biases, tied), all with a vocabulary of 300 (padded to 320 in Megatron). Every
weight is randomised (norm weights and biases included) so that a misplaced tensor
shows in the logits.

One ``torchrun`` launch of 2 ranks (this file run as a script) converts them, runs the
same tokens through the Megatron model at TP=1, TP=2 and PP=2 and converts them back;
the tests compare with ``transformers`` in this process. One model is then trained a few
steps with ``megatron-pwdpo train`` at PP=2 from its converted checkpoint, converted
back with the CLI, and generates text in ``transformers``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.dist

VOCAB = 300
SEQ = 12
LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (tensor_parallel, pipeline_parallel)
TRAINED = "llama2_tied"  # the case trained with `megatron-pwdpo train` at PP=2
NAMES = ["llama3", TRAINED, "mistral", "qwen2"]
ATOL = 1e-4


def _hf_configs() -> dict:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
    )
    llama3_rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    return {
        "llama3": LlamaConfig(
            **common,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            max_position_embeddings=16384,
            rope_theta=500000.0,
            rope_scaling=llama3_rope,
        ),
        TRAINED: LlamaConfig(
            **common,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
        "mistral": MistralConfig(
            **common, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False
        ),
        "qwen2": Qwen2Config(
            **common, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0
        ),
    }


def _save_tokenizer(path: Path) -> None:
    """A byte-level BPE of exactly VOCAB tokens (ids 0/1 = <s>/</s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Human: hello there. Assistant: hi, how are you?"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Build, save and run the HF models; launch the 2-rank worker once."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("convert")
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    torch.save(tokens, root / "tokens.pt")
    for name, config in _hf_configs().items():
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():
            for pname, param in model.named_parameters():
                scale = 0.1 if "norm" in pname else 0.2
                param.copy_(torch.randn_like(param) * scale + (1.0 if "norm" in pname else 0.0))
            torch.save(model(tokens).logits, root / f"{name}_ref.pt")
        model.save_pretrained(root / name / "hf")
        assert (root / name / "hf" / "model.safetensors").is_file()
    _save_tokenizer(root / TRAINED / "hf")
    from conftest import run_python  # (not at the top: torchrun runs this file as a script)

    run_python([__file__, str(root)], nproc=2, timeout=240)
    return root


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: f"tp{t[0]}pp{t[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(work, name, layout):
    want = torch.load(work / f"{name}_ref.pt")
    got = torch.load(work / name / f"logits_tp{layout[0]}pp{layout[1]}.pt")
    assert got.shape == want.shape  # the padded vocabulary columns are cut off
    diff = (got - want).abs().max().item()
    print(f"{name} tp{layout[0]}pp{layout[1]}: max |logits diff| {diff:.2e}")
    assert want.abs().max() > 1.0  # the comparison is not trivially small
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def _targets(tokens: torch.Tensor) -> torch.Tensor:
    """Next-token targets (the last position's: the first token; any valid id)."""
    return torch.roll(tokens, -1, dims=1)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_log_probs_match_transformers_over_the_real_vocabulary(work, name, tp):
    """Token log-probs of the training path (vocab-parallel cross-entropy over 320 rows,
    20 of them padding) equal ``log_softmax`` of ``transformers``' 300 logits: the
    padded rows take no part in the softmax."""
    tokens = torch.load(work / "tokens.pt")
    logits = torch.load(work / f"{name}_ref.pt").double()
    want = torch.log_softmax(logits, dim=-1).gather(-1, _targets(tokens)[..., None])[..., 0]
    got = torch.load(work / name / f"logps_tp{tp}.pt").double()
    print(f"{name} tp{tp}: max |log-prob diff| {(got - want).abs().max().item():.2e}")
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_convert_back_reproduces_the_state_dict(work, name):
    from safetensors.torch import load_file

    original = load_file(work / name / "hf" / "model.safetensors")
    back = load_file(work / name / "back" / "model.safetensors")
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype, key
        assert torch.equal(back[key], tensor), key
    config = json.loads((work / name / "back" / "config.json").read_text())
    source = json.loads((work / name / "hf" / "config.json").read_text())
    assert config["architectures"] == source["architectures"]
    # the written config.json means the same model to transformers (RoPE scaling included)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / name / "back", attn_implementation="eager")
    with torch.no_grad():
        logits = model.eval()(torch.load(work / "tokens.pt")).logits
    torch.testing.assert_close(logits, torch.load(work / f"{name}_ref.pt"), atol=1e-6, rtol=0)


def test_training_round_trip_loads_in_transformers_and_generates(work, tmp_path):
    """Converted model -> `megatron-pwdpo train` at PP=2 (tied embeddings across the
    stages) from it -> `convert mcore-to-hf --ckpt RUN_DIR` -> transformers."""
    from conftest import TINY, run_cli
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_pwdpo.convert import ConversionError, check_model_config
    from megatron_pwdpo.convert.hf_to_mcore import model_overrides
    from megatron_pwdpo.model.build import ModelConfig

    mc, run_dir, out = work / TRAINED / "mc", tmp_path / "run", tmp_path / "hf"
    cfg = ModelConfig(**json.loads((mc / "model_config.json").read_text()))
    check_model_config(dataclasses.replace(cfg, max_seq_length=128), mc)
    with pytest.raises(ConversionError, match="model.rope_scaling_factor=2.0"):
        check_model_config(dataclasses.replace(cfg, rope_scaling_factor=1.0), mc)
    run_cli(
        [
            "train",
            *[a for a in TINY if not a.startswith("model.")],
            *model_overrides(cfg),
            f"data.tokenizer={work / TRAINED / 'hf'}",
            "data.tokenizer_type=hf",
            f"train.init_checkpoint={mc}",
            "train.sft_steps=1",
            "train.steps=2",
            "parallel.pipeline_parallel=2",
            f"run_dir={run_dir}",
        ],
        nproc=2,
    )
    # no --hf-like: the tokenizer is found through the run's train.init_checkpoint
    run_cli(["convert", "mcore-to-hf", "--ckpt", str(run_dir), "--out", str(out)])
    original = load_file(work / TRAINED / "hf" / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    assert sorted(trained) == sorted(original)
    assert all(trained[k].shape == v.shape for k, v in original.items())
    assert not torch.equal(trained["model.norm.weight"], original["model.norm.weight"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    inputs = tokenizer("Human: hello there. Assistant:", return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 5
    assert isinstance(tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :]), str)


def test_cli_converts_and_refuses_bad_input_in_one_line(work, tmp_path):
    from conftest import run_cli

    hf = work / "qwen2" / "hf"
    done = run_cli(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path), "--tp", "2"])
    assert (tmp_path / "latest.txt").read_text().strip() == "0"
    assert (tmp_path / "hf" / "config.json").read_bytes() == (hf / "config.json").read_bytes()
    written = json.loads((tmp_path / "model_config.json").read_text())
    assert written == json.loads((work / "qwen2" / "mc" / "model_config.json").read_text())
    assert "train.init_checkpoint=" in done.stdout + done.stderr
    bad = run_cli(
        ["convert", "hf-to-mcore", "--hf", str(hf), "--out", "x", "--tp", "3"], check=False
    )
    assert bad.returncode == 2
    assert (
        bad.stderr.strip().splitlines()[-1].startswith("megatron-pwdpo: error: tensor_parallel=3")
    )


# --------------------------------------------------------------------------- the worker


def _forward_logits(chunks, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits ``[b, s, V_padded]`` on the last stage (gathered over TP), else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    captured = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        positions = torch.arange(batch.shape[1]).expand_as(batch)
        output = model(batch, positions, None)

        def loss_func(logits):
            captured.append(logits.detach().clone())
            return logits.sum() * 0.0, {}

        return output, loss_func

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([tokens]),
            model=chunks,
            num_microbatches=1,
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=True,
        )
    if not captured:
        return None
    shards = [
        torch.empty_like(captured[0]) for _ in range(ps.get_tensor_model_parallel_world_size())
    ]
    torch.distributed.all_gather(shards, captured[0], group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def _worker(root: Path) -> None:
    from megatron.core import parallel_state as ps

    from megatron_pwdpo.convert.hf_to_mcore import hf_to_mcore
    from megatron_pwdpo.convert.mcore_to_hf import mcore_to_hf, read_model_config
    from megatron_pwdpo.engine import checkpoint
    from megatron_pwdpo.model.build import ParallelConfig, build_model
    from megatron_pwdpo.model.logprobs import model_token_logps
    from megatron_pwdpo.platform import cpu_bridge, distributed

    names = NAMES
    tokens = torch.load(root / "tokens.pt")
    distributed.init_distributed(
        tensor_parallel=1, pipeline_parallel=1, virtual_pipeline=None, timeout_s=120
    )
    try:
        cpu_bridge.manual_seed(0)
        for name in names:
            hf_to_mcore(root / name / "hf", root / name / "mc")
        for tp, pp in LAYOUTS:
            ps.destroy_model_parallel()
            ps.initialize_model_parallel(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
            )
            cpu_bridge.manual_seed(0)
            for name in names:
                cfg = read_model_config(root / name / "mc")
                model = build_model(
                    cfg,
                    ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp),
                    pre_process=ps.is_pipeline_first_stage(),
                    post_process=ps.is_pipeline_last_stage(),
                )
                checkpoint.load_checkpoint(
                    [model], checkpoint.latest_checkpoint(root / name / "mc")
                )
                logits = _forward_logits([model], tokens)
                if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
                    torch.save(logits[..., :VOCAB], root / name / f"logits_tp{tp}pp{pp}.pt")
                if pp == 1:  # the training path: labels -> vocab-parallel cross-entropy
                    with torch.no_grad():
                        logps = model_token_logps(
                            model, tokens, torch.arange(SEQ).expand_as(tokens), _targets(tokens)
                        )
                    if ps.get_tensor_model_parallel_rank() == 0:
                        torch.save(logps, root / name / f"logps_tp{tp}.pt")
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        for name in names:
            mcore_to_hf(root / name / "mc", root / name / "back")
    finally:
        distributed.shutdown()


if __name__ == "__main__":  # torchrun runs this file as the worker (the guard matters: see
    # cpu_bridge's note on torch_dist saves re-importing __main__)
    _worker(Path(sys.argv[1]))
