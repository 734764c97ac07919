"""The user workflow of the README, end to end, through the command line only.

A local Hugging Face Llama folder (a tiny random model written by ``save_pretrained``,
with its tokenizer and chat template) -> ``convert hf-to-mcore`` -> ``train`` point-wise
DPO on a TRL unpaired conversational file with that tokenizer (no ``data.source``: it is
detected; no conversion step) -> ``convert mcore-to-hf`` -> ``transformers`` loads the
export and generates. The export's logits equal the trained Megatron model's (computed by
this file run as a script, from the run's checkpoint). The training's output must hold
no third-party warning line, and ends with the run summary.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.dist

VOCAB = 300
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _save_llama(folder: Path) -> None:
    """A random 2-layer Llama and a byte-level BPE tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["<|user|>is the sky blue?\n<|assistant|>yes, it is."] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = TEMPLATE
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)


def _write_trl_unpaired(path: Path, n: int = 48) -> None:
    """TRL's unpaired conversational format, as KTOTrainer/BCOTrainer read it."""
    with path.open("w") as f:
        for i in range(n):
            good = i % 2 == 0
            record = {
                "prompt": [{"role": "user", "content": f"question {i // 2}: is the sky blue?"}],
                "completion": [
                    {"role": "assistant", "content": "yes, it is." if good else "no idea."}
                ],
                "label": good,
            }
            f.write(json.dumps(record) + "\n")


def test_hf_folder_to_trained_export_on_a_trl_file(tmp_path):
    from conftest import TINY, run_cli, run_python
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_pwdpo.convert.hf_to_mcore import model_overrides
    from megatron_pwdpo.convert.mcore_to_hf import read_model_config

    hf, mc, run, out = (tmp_path / n for n in ("hf", "mc", "run", "export"))
    _save_llama(hf)
    data = tmp_path / "prefs.jsonl"
    _write_trl_unpaired(data)

    run_cli(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(mc)])
    trained = run_cli(
        [
            "train",
            *[a for a in TINY if not a.startswith("model.")],
            *model_overrides(read_model_config(mc)),
            f"data.path={data}",
            f"data.tokenizer={hf}",
            "data.tokenizer_type=hf",
            f"train.init_checkpoint={mc}",
            "loss.name=pointwise_dpo",
            "train.sft_steps=0",
            "train.steps=2",
            f"run_dir={run}",
        ]
    )
    output = trained.stdout + trained.stderr
    warning_lines = [line for line in output.splitlines() if re.search(r"\w+Warning\b", line)]
    assert not warning_lines, "\n".join(warning_lines)
    assert "detected trl" in output
    assert "data: 32 train rows (16 desirable, 16 undesirable" in output
    assert "done: 2 steps (pointwise_dpo 2)" in output
    assert f"checkpoint: {run / 'checkpoints' / 'iter_0000002'}" in output

    # `megatron-pwdpo convert mcore-to-hf --ckpt RUN --out OUT` (its function, in the
    # process that also runs the trained Megatron model, to save a start-up)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    run_python([__file__, str(mc), str(run), str(out), str(tmp_path)])
    megatron_logits = torch.load(tmp_path / "megatron_logits.pt")[..., :VOCAB]

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    original = AutoModelForCausalLM.from_pretrained(hf).eval()
    with torch.no_grad():
        exported, untrained = model(tokens).logits, original(tokens).logits
    print(f"max |exported - megatron| {(exported - megatron_logits).abs().max().item():.2e}")
    assert (exported - untrained).abs().max() > 1e-3  # the training changed the model
    torch.testing.assert_close(exported, megatron_logits, atol=1e-4, rtol=0)

    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "is the sky blue?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<|user|>is the sky blue?\n<|assistant|>"  # the template came along
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert ids.shape[1] == prompt_len + 4
    assert isinstance(tokenizer.decode(ids[0, prompt_len:]), str)


def _export_and_forward(mc: Path, run: Path, out: Path, folder: Path) -> None:
    """What ``convert mcore-to-hf --ckpt RUN --out OUT`` runs, then the logits of the
    run's newest checkpoint at TP=1, PP=1, saved to ``folder``."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_convert import _forward_logits

    from megatron_pwdpo.convert.mcore_to_hf import mcore_to_hf, read_model_config
    from megatron_pwdpo.engine import checkpoint
    from megatron_pwdpo.model.build import ParallelConfig, build_model
    from megatron_pwdpo.platform import cpu_bridge, distributed

    distributed.init_distributed(
        tensor_parallel=1, pipeline_parallel=1, virtual_pipeline=None, timeout_s=120
    )
    try:
        cpu_bridge.manual_seed(0)
        mcore_to_hf(run, out)
        model = build_model(read_model_config(mc), ParallelConfig())
        checkpoint.load_checkpoint([model], checkpoint.latest_checkpoint(run / "checkpoints"))
        logits = _forward_logits([model.eval()], torch.load(folder / "tokens.pt"))
        torch.save(logits, folder / "megatron_logits.pt")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    _export_and_forward(*(Path(a) for a in sys.argv[1:5]))
