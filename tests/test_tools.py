"""Model tools on real tiny models: `rlhf merge-lora`, `rlhf eval`, `rlhf generate` (in this
process: they use no Ray). Each result is checked against a direct computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from launch.cli import main
from rlhf.models import ADAPTER_INFO

RM_RECIPE = "configs/recipes/distilbert-imdb-lora-rm/rm.yaml"
RM_TWIN = "configs/recipes/distilbert-imdb-lora-rm/cpu.yaml"
IMDB = "configs/recipes/samples/imdb.jsonl"


def _lora_classifier(tiny_path, tmp_path, keep_info: bool):
    """A tiny 2-label classifier with a LoRA adapter whose weights are not zero (so merging
    changes the outputs), saved as an adapter folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from rlhf.models import write_adapter_info

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_path, num_labels=2, dtype=torch.float32
    )
    base.config.pad_token_id = 0
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="SEQ_CLS"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter, safe_serialization=True)
    if keep_info:
        write_adapter_info(adapter, str(tiny_path), "classifier", 2)
    return model.eval(), adapter


@pytest.mark.parametrize("keep_info", [True, False], ids=["info-file", "peft-only"])
def test_merge_lora_matches_the_adapter_model(tiny_path, tmp_path, keep_info, capsys):
    from transformers import AutoModelForSequenceClassification

    peft_model, adapter = _lora_classifier(tiny_path, tmp_path, keep_info)
    assert (adapter / ADAPTER_INFO).exists() == keep_info
    out = tmp_path / "merged"
    assert main(["merge-lora", str(adapter), str(out)]) == 0
    assert "merged model in" in capsys.readouterr().out
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.num_labels == 2  # read from the head when no info file says so
    ids = torch.tensor([[5, 9, 14, 22, 7], [3, 3, 8, 40, 2]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        plain = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=2)
        assert not torch.allclose(plain.eval()(input_ids=ids).logits, want, atol=1e-3)


def test_merge_lora_refuses_a_non_adapter(tmp_path, tiny_path, capsys):
    """One line naming the folder and what to give instead; exit 2, nothing written."""
    assert main(["merge-lora", str(tiny_path), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {tiny_path} is not a LoRA adapter folder (no adapter_config.json): give the "
        "adapter an export wrote (OUTPUT_DIR/final/adapter with checkpoint.export=adapter)"
    )
    assert not (tmp_path / "x").exists()


def test_eval_reward_model_accuracy(tiny_path, tmp_path, capsys):
    """rm/accuracy from `rlhf eval` equals argmax accuracy computed row by row (no padding)."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.config import ModelConfig
    from rlhf.models import load_tokenizer

    torch.manual_seed(1)
    clf = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=2)
    with torch.no_grad():
        clf.score.weight.normal_(0, 2.0)
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_path)))
    clf.config.pad_token_id = tok.pad_token_id
    model_dir = tmp_path / "clf"
    clf.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    report = tmp_path / "eval.json"
    args = ["eval", RM_RECIPE, RM_TWIN, "model.lora=null", f"output_dir={tmp_path}/o"]
    assert main([*args, "--model", str(model_dir), "--json", str(report)]) == 0
    got = json.loads(report.read_text())
    rows = [json.loads(line) for line in Path(IMDB).read_text().splitlines()][:16]  # eval limit
    correct = 0
    clf.eval()
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([tok(row["text"], truncation=True, max_length=64)["input_ids"]])
            correct += int(clf(input_ids=ids).logits.argmax(-1).item() == row["label"])
    assert got["rows"] == 16
    assert got["rm/accuracy"] == pytest.approx(correct / 16)
    assert "rm/accuracy" in capsys.readouterr().out


def test_eval_dpo_metrics_of_the_reference_itself(tmp_path):
    """The model under test equal to its reference: every implicit reward is 0, so margins and
    accuracies are 0 and the sigmoid loss is log 2."""
    report = tmp_path / "dpo.json"
    args = ["eval", "configs/quickstart/dpo_tiny.yaml", f"output_dir={tmp_path}/o"]
    assert main([*args, "--limit", "8", "--json", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["rows"] == 8
    assert got["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert got[key] == pytest.approx(0.0, abs=1e-5), key


def test_generate_side_by_side_with_rewards(tiny_path, tmp_path, capsys):
    """Two checkpoints on the same prompts: both columns printed, and each reward is the
    reward function of that column's response."""
    from transformers import AutoModelForCausalLM

    from rlhf.rewards import vader_sentiment

    other = tmp_path / "other"
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(other)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(other)
    report = tmp_path / "gen.json"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_path),
            "--model",
            str(other),
            "--prompts",
            IMDB,
            "data.eval.preset=imdb",
            "data.max_length=48",
            f"output_dir={tmp_path}/o",
            "--limit",
            "3",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
            "--reward",
            "rlhf.rewards:vader_sentiment",
            "--json",
            str(report),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("--- prompt") == 3 and "other" in out and "mean reward" in out
    got = json.loads(report.read_text())
    assert len(got["prompts"]) == 3
    columns = got["models"]
    assert list(columns) == [str(tiny_path), str(other)]
    for col in columns.values():
        assert col["rewards"] == pytest.approx(vader_sentiment(got["prompts"], col["responses"]))
    assert columns[str(tiny_path)]["responses"] != columns[str(other)]["responses"]


def test_eval_pass_at_k_of_a_verifiable_reward_with_its_samples(tmp_path):
    """`rlhf eval` on the reasoning quickstart (tiny model): n samples per held-out problem,
    pass@k from the written verdicts by the combinatorial formula, each sample's reward its
    verdict (the math verifier gives 1 or 0) and its row's answer beside it."""
    report, samples = tmp_path / "eval.json", tmp_path / "samples.jsonl"
    args = [
        "eval",
        "launch/quickstart_reasoning.yaml",
        "model.name_or_path=builtin:tiny",
        "roles.rollout.max_new_tokens=8",
        "roles.rollout.eval_samples_per_prompt=3",
        f"output_dir={tmp_path}/o",
    ]
    assert main([*args, "--limit", "4", "--json", str(report), "--samples", str(samples)]) == 0
    got = json.loads(report.read_text())
    lines = [json.loads(x) for x in samples.read_text().splitlines()]
    assert got["rows"] == len(lines) == 12
    assert {"pass@1", "pass@2", "pass@3", "mean@3"} <= set(got)
    for s in lines:
        assert s["reward"] == float(s["correct"]) and s["reason"].startswith("math: ")
        assert s["fields"]["answer"].lstrip("-").isdigit()
    by_prompt: dict[str, list[bool]] = {}
    for s in lines:
        by_prompt.setdefault(s["prompt"], []).append(s["correct"])
    assert len(by_prompt) == 4 and all(len(v) == 3 for v in by_prompt.values())
    for k in (1, 2, 3):
        want = sum(1 - math.comb(3 - sum(v), k) / math.comb(3, k) for v in by_prompt.values()) / 4
        assert got[f"pass@{k}"] == pytest.approx(want)


def test_eval_runs_episodes_with_an_environment(tmp_path):
    """`rlhf eval` with roles.rollout.environment (the tool-use quickstart's GRPO stage, tiny
    model): every sample is an episode; the report has the episodes' counts, and each written
    sample has its whole episode beside the answer the reward read."""
    report, samples = tmp_path / "eval.json", tmp_path / "samples.jsonl"
    args = [
        "eval",
        "launch/quickstart_tools/grpo.yaml",
        "model.name_or_path=builtin:tiny",
        "data.max_length=1024",
        "data.max_prompt_length=900",
        "roles.rollout.max_new_tokens=8",
        f"output_dir={tmp_path}/o",
    ]
    assert main([*args, "--limit", "3", "--json", str(report), "--samples", str(samples)]) == 0
    got = json.loads(report.read_text())
    lines = [json.loads(x) for x in samples.read_text().splitlines()]
    assert got["rows"] == len(lines) == 6
    for key in ("turns", "tool_calls", "tool_error_rate", "truncated", "retokenize_mismatch"):
        assert f"rollout/{key}" in got, key
    assert all("episode" in s for s in lines) and got["rollout/turns"] >= 1.0
    cut = sum(not s["episode"].endswith("<|im_end|>") for s in lines) / len(lines)
    assert got["rollout/truncated"] == pytest.approx(cut)
