"""Mixed precision and utilisation: what train.precision resolves to, the engine-trainer
log-prob gap, the FLOPs model against hand counts and torch's FlopCounterMode, and bf16 runs
end to end (learning, bit-identical resume)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.flops import (
    ModelShape,
    cpu_peak,
    decode_flops,
    device_peak,
    forward_flops,
    gpu_peak,
    online_step_flops,
    train_flops,
    utilisation,
)
from rlhf.kl import logp_gap
from rlhf.models import resolve_dtype
from rlhf.precision import CPU_BF16_MIN_WIDTH, cpu_bf16, resolve_precision
from tests.test_train import metrics, train, untimed

# ----------------------------------------------------------------------------- precision


def _native_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def test_auto_resolves_to_bf16_exactly_where_the_cpu_has_it(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    wide = resolve_precision("auto", "cpu", width=576)
    assert wide.name == ("bf16" if _native_bf16() else "fp32"), wide
    assert wide.autocast == (wide.name == "bf16") and wide.deepspeed is None
    assert ("neither" not in wide.why) == _native_bf16(), wide.why
    # A model narrower than the threshold stays fp32 (casts cost more than bf16 saves).
    narrow = resolve_precision("auto", "cpu", width=CPU_BF16_MIN_WIDTH - 1)
    assert narrow.name == "fp32" and not narrow.autocast
    assert resolve_precision("auto", "cpu", width=CPU_BF16_MIN_WIDTH).name == wide.name
    # Frozen roles hold their weights in the same dtype under model.dtype=auto.
    assert resolve_dtype("auto", "cpu", "auto", 576) == wide.dtype
    assert resolve_dtype("auto", "cpu", "auto", 128) == torch.float32
    assert resolve_dtype("auto", "cpu") == torch.float32  # no run precision: as before
    assert resolve_dtype("float16", "cpu", "auto", 576) == torch.float16  # asked for


@pytest.mark.parametrize(
    "amx, avx512_bf16, expected",
    [(True, False, "AMX"), (False, True, "AVX-512 BF16"), (False, False, "neither")],
)
def test_auto_follows_the_cpu_capability_whatever_this_cpu_has(
    monkeypatch, amx, avx512_bf16, expected
):
    # The capability probe answered both ways, so both branches run on any CI machine (this
    # one may or may not have bf16).
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    p = resolve_precision("auto", "cpu", width=576)
    assert p.name == ("bf16" if amx or avx512_bf16 else "fp32") and expected in p.why, p
    assert p.autocast == (p.name == "bf16")
    assert resolve_precision("auto", "cpu", width=128).name == "fp32"
    # bf16 asked for explicitly is honoured, with a warning where the CPU would emulate it.
    asked = resolve_precision("bf16", "cpu", width=576)
    assert asked.name == "bf16" and ("emulates" in asked.why) == (expected == "neither")


@pytest.mark.parametrize("cap", ["AVX512_CORE", "avx2", "AVX512_CORE_VNNI"])
def test_auto_is_fp32_when_onednn_is_capped_below_bf16(monkeypatch, cap):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    ok, why = cpu_bf16()
    assert not ok and cap.upper() in why
    p = resolve_precision("auto", "cpu", width=4096)
    assert p.name == "fp32" and p.dtype == torch.float32 and cap.upper() in p.why
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_bf16()[0] == _native_bf16()


def test_explicit_precisions():
    bf16 = resolve_precision("bf16", "cpu", width=64)  # asked for: no width rule
    assert bf16.name == "bf16" and bf16.autocast and bf16.dtype == torch.bfloat16
    fp32 = resolve_precision("fp32", "cpu")
    assert not fp32.autocast and fp32.deepspeed is None
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", "cpu")
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with bf16.compute():
        assert (x @ w).dtype == torch.bfloat16
    with fp32.compute():
        assert (x @ w).dtype == torch.float32


# ----------------------------------------------------------------------------- gap metrics


def test_logp_gap_by_hand():
    trainer = torch.tensor([[-0.1, -0.7, -2.0], [-1.5, 0.0, 0.0]], dtype=torch.float32)
    engine = torch.tensor([[-0.2, -0.7, -1.0], [-1.2, -9.0, 0.0]], dtype=torch.float32)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    gap = logp_gap(trainer, engine, mask)
    # Masked tokens: (-0.1 vs -0.2), (-0.7 vs -0.7), (-1.5 vs -1.2).
    deltas = [-0.1 - -0.2, 0.0, -1.5 - -1.2]
    assert gap["rollout/logp_gap_mean"] == pytest.approx(sum(map(abs, deltas)) / 3, rel=1e-6)
    assert gap["rollout/logp_gap_max"] == pytest.approx(0.3, rel=1e-6)
    # k3 of KL(engine || trainer), samples from the engine: r = π_trainer / π_engine.
    k3 = [math.exp(d) - 1 - d for d in deltas]
    assert gap["rollout/logp_gap_kl"] == pytest.approx(sum(k3) / 3, rel=1e-5)
    assert gap["rollout/logp_gap_kl"] > 0


def test_logp_gap_is_zero_for_the_same_numbers_and_for_no_tokens():
    x = torch.tensor([[-0.1, -0.7], [-3.0, -0.2]])
    mask = torch.tensor([[True, True], [True, False]])
    assert set(logp_gap(x, x.clone(), mask).values()) == {0.0}
    assert set(logp_gap(x, x + 1, torch.zeros_like(mask)).values()) == {0.0}


# ----------------------------------------------------------------------------- FLOPs model


def _tiny(tiny_path, attention: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        tiny_path, dtype=torch.float32, attn_implementation=attention
    )


def test_flops_model_of_the_tiny_llama_by_hand(tiny_path):
    model = _tiny(tiny_path)
    c = model.config
    h, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    # Per layer: q, k, v, o (all h x h here: 4 heads of 32, no grouping) and the MLP's gate,
    # up and down (h x inter each); the LM head (vocab x h) apart.
    body = layers * (4 * h * h + 3 * h * inter)
    shape = ModelShape.of(model)
    assert shape == ModelShape(body, c.vocab_size * h, layers, h)
    assert ModelShape.from_config(c) == shape
    # One 10-token sequence, logits everywhere: 2 FLOPs per weight per token, plus QK^T and
    # AV over the full 10 x 10 matrix in each layer.
    expected = 2 * body * 10 + 2 * c.vocab_size * h * 10 + layers * 4 * h * 10 * 10
    assert forward_flops(shape, [10]) == expected
    assert train_flops(shape, [10]) == 3 * expected
    # Logits only at the last 3 positions.
    assert forward_flops(shape, [10], [3]) == expected - 2 * c.vocab_size * h * 7
    # Decoding 3 tokens after a 5-token prompt: the prefill (logits at its last position),
    # then tokens 1 and 2 against 6 and 7 cached positions.
    attn = 4 * layers * h
    prefill = 2 * body * 5 + 2 * c.vocab_size * h + attn * 25
    steps = 2 * (2 * body + 2 * c.vocab_size * h) + attn * (6 + 7)
    assert decode_flops(shape, [5], [3]) == prefill + steps
    assert decode_flops(shape, [5], [0]) == 0


def test_flops_model_matches_torchs_flop_counter_on_a_train_step(tiny_path):
    from torch.utils.flop_counter import FlopCounterMode

    # Eager attention: its QK^T and AV are matmuls the counter sees (it has no formula for
    # the CPU flash-attention kernel that sdpa runs).
    model = _tiny(tiny_path, "eager")
    torch.manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (2, 16))
    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(input_ids=ids).logits
        torch.log_softmax(logits, -1)[..., 0].sum().backward()
    counted = counter.get_total_flops()
    modelled = train_flops(ModelShape.of(model), [16, 16])
    # The rotary embedding's small matmul (position x frequency) is the only extra work.
    assert counted == pytest.approx(modelled, rel=1e-3), (counted, modelled)


def test_online_step_flops_and_utilisation():
    s = ModelShape(body=1000, head=100, layers=2, attn_width=8)
    prompts, responses = [4, 6], [3, 2]
    seq, logits = [7, 8], [4, 3]
    got = online_step_flops(
        {"policy": s, "reference": s, "rollout": s}, prompts, responses, 2, True
    )
    assert got["rollout"] == decode_flops(s, prompts, responses)
    assert got["reference"] == forward_flops(s, seq, logits)
    assert got["policy"] == 2 * train_flops(s, seq, logits) + forward_flops(s, seq, logits)
    assert online_step_flops({"critic": s}, prompts, responses)["critic"] == 4 * forward_flops(
        s, seq
    )
    u = utilisation("policy", 6e12, 2.0, peak=2 * 5e12, ranks=2)
    assert u == {"perf/policy/tflops": pytest.approx(1.5), "perf/policy/mfu": pytest.approx(0.3)}
    assert "perf/policy/mfu" not in utilisation("policy", 1e12, 1.0, peak=None)


def test_peaks(tmp_path, monkeypatch):
    assert gpu_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert gpu_peak("NVIDIA H100 PCIe", torch.float16) == 756e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB", torch.float32) == 19.5e12
    assert gpu_peak("Some Future GPU", torch.bfloat16) is None
    first = cpu_peak(torch.float32, tmp_path)
    assert first > 1e8  # any CPU of this decade does 0.1 GFLOP/s on one thread
    cached = (tmp_path / "cpu_peak.json").read_text()
    assert cpu_peak(torch.float32, tmp_path) == first, "read back from the cache"
    assert (tmp_path / "cpu_peak.json").read_text() == cached
    # bf16's peak is its probe where the CPU computes it natively; where oneDNN emulates it
    # (slower than fp32), the hardware's best is fp32's, so an MFU never reads above 1.
    bf16 = cpu_peak(torch.bfloat16, tmp_path)
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path))
    peak, source = device_peak("cpu", torch.bfloat16)
    assert peak == max(bf16, first) and ("emulated" in source) == (bf16 < first), source
    assert device_peak("cpu", torch.float32)[0] == first


# ----------------------------------------------------------------------------- end to end


def test_bf16_dpo_learns_and_resumes_bit_identically(tmp_path):
    """DPO tiny in bf16 (autocast over fp32 masters, a bf16 reference) reaches the fp32 run's
    held-out accuracy; interrupted at step 4 and resumed, it ends bit-identical to a run never
    interrupted; checkpoints and the export stay fp32."""
    from safetensors.torch import load_file

    common = ["train.precision=bf16", "train.max_steps=8", "checkpoint.every_steps=4"]
    whole = tmp_path / "whole"
    result = train(whole, "dpo_tiny", *common, "train.eval_every=8")
    assert "policy: bf16 on cpu (autocast over fp32 weights)" in result.stdout + result.stderr
    rows = metrics(whole)
    assert [r for r in rows if "eval/rewards/accuracies" in r][-1]["eval/rewards/accuracies"] > 0.9
    assert all(0 < r["perf/policy/mfu"] < 1 and r["perf/reference/tflops"] > 0 for r in rows)
    expected = load_file(whole / "final" / "model.safetensors")
    assert {t.dtype for t in expected.values()} == {torch.float32}
    out = tmp_path / "crashed"
    train(
        out,
        "dpo_tiny",
        *common,
        "train.eval_every=8",
        env={"RLHF_FAULT_EXIT_AFTER_STEP": "4"},
        expect=17,
    )
    train(out, "dpo_tiny", *common, "train.eval_every=8", "checkpoint.resume=auto")
    got = load_file(out / "final" / "model.safetensors")
    assert all((got[k] == expected[k]).all() for k in expected)
    assert untimed(metrics(out)) == untimed(rows)


def test_reference_cache_key_follows_the_precision(tmp_path):
    """Precomputed DPO reference log-probs of a bf16 reference are not an fp32 one's: the
    on-disk cache keys them apart."""
    from actors.refcache import cache_key
    from rlhf.config import load_config
    from rlhf.data import load_datasets
    from rlhf.models import load_tokenizer

    keys = {}
    for precision in ("fp32", "bf16", "fp32"):
        cfg = load_config(
            "configs/quickstart/dpo_tiny.yaml",
            ["data.train.limit=8", "data.eval=null", f"train.precision={precision}"],
        )
        train_set, _ = load_datasets(cfg.data, "preference", load_tokenizer(cfg.model), tmp_path)
        keys.setdefault(precision, set()).add(cache_key(cfg, train_set))
    assert len(keys["fp32"]) == 1, "the same run, the same key"
    assert keys["fp32"] != keys["bf16"]
