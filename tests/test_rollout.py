"""Rollout generation (HF backend) and policy -> rollout weight sync on real Ray actors."""

from __future__ import annotations

import os

import pytest
import torch

from actors.groups import PolicyGroup, RolloutGroup, WeightSync
from rlhf.config import load_config
from rlhf.data import load_split, make_collator
from rlhf.ops import shifted_token_logps
from rlhf.roles import engine_spec
from rlhf.rollout import rollout_token_logps, sequences


def _cfg(tiny_path, *extra):
    return load_config(
        None,
        [
            "algorithm=orpo",
            f"model.name_or_path={tiny_path}",
            "data.max_length=48",
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            "train.lr=5e-3",
            "train.lr_scheduler=constant",
            "roles.rollout.max_new_tokens=12",
            "roles.rollout.temperature=0",
            *extra,
        ],
    )


def _prompts(cfg, tokenizer, n=4):
    ds = load_split(cfg.data.train, cfg.data, "prompt", tokenizer)
    return make_collator("prompt", tokenizer.pad_token_id)([ds[i] for i in range(n)])


@pytest.mark.parametrize("stage, lora", [(2, False), (0, True)])
def test_after_sync_rollout_greedy_equals_policy_greedy(
    stage, lora, ray_local, tiny_path, tiny_tokenizer
):
    extra = (
        [f"train.zero_stage={stage}", "roles.policy.resources.ranks_per_node=2"] if stage else []
    )
    if lora:
        extra += ["model.lora.r=4", "model.lora.alpha=16", "model.lora.dropout=0"]
    cfg = _cfg(tiny_path, *extra)
    prompts = _prompts(cfg, tiny_tokenizer)
    policy = PolicyGroup(cfg, 10)
    rollout = RolloutGroup(cfg)
    try:
        # Train the policy away from its initial weights on a few DPO steps.
        pref = load_split(cfg.data.train, cfg.data, "preference", tiny_tokenizer)
        collate = make_collator("preference", tiny_tokenizer.pad_token_id)
        world = policy.world_size
        for step in range(3):
            per_rank = [
                ([collate([pref[4 * step + 2 * r], pref[4 * step + 2 * r + 1]])], [None])
                for r in range(world)
            ]
            policy.gather(policy.call_each(lambda a, x: a.train_step.remote(*x), per_rank))
        before = policy.gather(policy.call(lambda a: a.greedy_generate.remote(prompts, 12)))[0]
        stale = rollout.gather(rollout.call(lambda a: a.generate.remote(prompts)))[0]
        sync = WeightSync(policy, rollout)
        counts = sync.push()
        assert counts[0] == len(sync.specs) and counts[-1] == len(sync.specs)
        synced = rollout.gather(rollout.call(lambda a: a.generate.remote(prompts)))[0]
        n = synced.response_ids.shape[1]
        assert torch.equal(
            synced.response_ids[synced.response_mask], before[:, :n][synced.response_mask]
        )
        assert not torch.equal(stale.response_ids, synced.response_ids), (
            "training changed the greedy output"
        )

        # The hybrid engine (roles.rollout.hybrid) samples with the trainer's own module: the
        # same tokens and log-probs as the synced engine, the trainer's RNG left as it was.
        def hybrid_generate(trainer):
            state = torch.get_rng_state()
            out = trainer.generate(prompts, 0)
            return out, torch.equal(state, torch.get_rng_state())

        own, rng_kept = policy.gather([policy.actors[0].__ray_call__.remote(hybrid_generate)])[0]
        assert rng_kept
        assert torch.equal(own.response_ids, synced.response_ids)
        assert torch.equal(own.response_mask, synced.response_mask)
        torch.testing.assert_close(own.logps, synced.logps, rtol=0, atol=1e-5)
    finally:
        policy.shutdown()
        rollout.shutdown()


@pytest.mark.gpu
def test_colocated_engine_syncs_through_cuda_ipc(ray_local, tiny_path, tiny_tokenizer):
    """A policy rank and an engine on one GPU (half each): NCCL would refuse the pair, so the
    weights go through CUDA IPC handles; after two trained steps and a push, the engine's
    greedy output is the policy's, and a second push after more training follows it too."""
    cfg = _cfg(
        tiny_path,
        "roles.policy.resources.gpus_per_rank=0.5",
        "roles.rollout.resources.gpus_per_rank=0.5",
    )
    prompts = _prompts(cfg, tiny_tokenizer)
    policy = PolicyGroup(cfg, 10)
    rollout = RolloutGroup(cfg)
    pref = load_split(cfg.data.train, cfg.data, "preference", tiny_tokenizer)
    collate = make_collator("preference", tiny_tokenizer.pad_token_id)
    try:
        sync = WeightSync(policy, rollout, ["cuda_ipc"])
        for push in range(2):
            for step in range(2):
                batch = collate([pref[4 * push + 2 * step], pref[4 * push + 2 * step + 1]])
                policy.gather(policy.call(lambda a, b=batch: a.train_step.remote([b], [None])))
            expected = policy.gather(policy.call(lambda a: a.greedy_generate.remote(prompts, 12)))
            assert sync.push() == [len(sync.specs), len(sync.specs)]
            synced = rollout.gather(rollout.call(lambda a: a.generate.remote(prompts)))[0]
            n = synced.response_ids.shape[1]
            mask = synced.response_mask
            assert torch.equal(synced.response_ids[mask], expected[0][:, :n][mask]), push
    finally:
        policy.shutdown()
        rollout.shutdown()


def test_ipc_handles_are_read_with_torch_classes_only():
    """The CUDA IPC channel unpickles handles that admit torch's classes and plain values;
    anything else in a payload is refused, not called."""
    import io
    import pickle

    from actors.weight_sync import _TorchUnpickler

    ok = pickle.dumps((torch.Tensor, torch.Size([2, 3]), torch.float32, 0, b"handle", True))
    assert _TorchUnpickler(io.BytesIO(ok)).load()[2] is torch.float32
    with pytest.raises(pickle.UnpicklingError, match=r"refusing (os|posix|nt)\.system"):
        _TorchUnpickler(io.BytesIO(pickle.dumps((os.system,)))).load()


def test_rollout_logps_match_a_forward_pass(ray_local, tiny_path, tiny_tokenizer):
    from rlhf.config import ModelConfig
    from rlhf.models import load_model

    cfg = _cfg(tiny_path, "roles.rollout.temperature=1.0", "roles.rollout.n_samples_per_prompt=2")
    prompts = _prompts(cfg, tiny_tokenizer, n=3)
    rollout = RolloutGroup(cfg)
    try:
        out = rollout.gather(rollout.call(lambda a: a.generate.remote(prompts)))[0]
    finally:
        rollout.shutdown()
    assert out.response_ids.shape[0] == 6 and out.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert set(out.finish) <= {"stop", "length"}
    model = load_model(ModelConfig(name_or_path=str(tiny_path)), trainable=False)
    ids = torch.cat([out.prompt_ids, out.response_ids], dim=1)
    mask = torch.cat([out.prompt_mask, out.response_mask], dim=1)
    with torch.no_grad():
        logps = shifted_token_logps(model(input_ids=ids, attention_mask=mask).logits, ids)
    trainer = logps[:, out.prompt_ids.shape[1] - 1 :]
    diff = (trainer - out.logps).abs()[out.response_mask].max().item()
    print(f"max |rollout - trainer| log-prob difference: {diff:.2e}")
    assert diff < 1e-4, f"rollout vs trainer log-probs differ by {diff}"
    # ppo.old_logps=rollout: the same numbers in the trainer's [B, T-1] layout.
    seq_ids, seq_mask, action = sequences(out)
    assert torch.equal(seq_ids, ids) and torch.equal(seq_mask, mask)
    aligned = rollout_token_logps(out)
    assert aligned.shape == logps.shape and torch.all(aligned[~action] == 0)
    assert (aligned - logps).abs()[action].max().item() == pytest.approx(diff)
    for row, finish in enumerate(out.finish):
        n = int(out.response_mask[row].sum())
        ended = out.response_ids[row, n - 1].item() == tiny_tokenizer.eos_token_id
        assert (finish == "stop") == ended


def test_weight_buckets_layout_and_a_real_gloo_transfer():
    """The bucket plan (cap, alignment, a large tensor alone and unstaged) and transfers over a
    real gloo group (sender and receiver as two threads) that must arrive bit-exact, mixed
    dtypes, the direct tensor in place when the receiver offers a matching one."""
    import threading

    from actors.net import free_port
    from actors.weight_sync import (
        ALIGN,
        Broadcast,
        BucketSender,
        WeightReceiver,
        bucket_nbytes,
        is_direct,
        open_group,
        plan_buckets,
        spec_nbytes,
    )

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g),  # 60 bytes
        "b": torch.randn(7, generator=g).bfloat16(),  # 14 bytes
        "big": torch.randn(40, generator=g),  # 160 bytes: direct (>= 150), travels alone
        "c": torch.randint(-9, 9, (2, 2), generator=g),  # int64, 32 bytes
        "d": torch.randn(1, generator=g),
        "e": torch.randn(30, generator=g),  # 120 bytes: packed, but c + d + e > cap
    }
    specs = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in tensors.items()]
    cap, direct = 130, 150
    buckets = plan_buckets(specs, cap, direct)
    names = [[specs[i][0] for i, _ in b] for b in buckets]
    assert names == [["a", "b"], ["big"], ["c", "d"], ["e"]]
    assert [is_direct(specs, b, direct) for b in buckets] == [False, True, False, False]
    for b in buckets:
        offsets = [o for _, o in b]
        assert offsets[0] == 0 and all(o % ALIGN == 0 for o in offsets)
        assert bucket_nbytes(specs, b) <= cap or len(b) == 1
        ends = [o + spec_nbytes(specs[i]) for i, o in b]
        assert all(e <= o for e, o in zip(ends, offsets[1:], strict=False))  # no overlap
    one = plan_buckets(specs, 10**9, 10**9)
    assert len(one) == 1 and [i for i, _ in one[0]] == list(range(len(specs)))

    rounds = [tensors, {k: (v * 2 if v.is_floating_point() else v + 1) for k, v in tensors.items()}]
    port, received, errors = free_port(), [{}, {}], []
    landing = torch.zeros(40)  # offered for "big" in the second transfer

    def receive():
        try:
            receiver = WeightReceiver("127.0.0.1", port, 2, 1, "cpu")
            for got, into in zip(received, [None, {"big": landing}], strict=True):
                for name, t in receiver.receive(specs, cap, direct, into=into):
                    got[name] = t
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    thread = threading.Thread(target=receive)
    thread.start()
    group = open_group("127.0.0.1", port, 2, 0, "gloo")
    sender = BucketSender([Broadcast(group)], specs, "cpu", cap, direct)
    assert sender.buffer.numel() == 120  # "e", the largest staged bucket ("big" is not staged)
    for sent in rounds:  # the staging buffer is reused from one transfer to the next
        sender.begin()
        for t in sent.values():
            sender.add(t)
        assert sender.finish() == len(specs)
    thread.join(timeout=60)
    assert not errors, errors
    for sent, got in zip(rounds, received, strict=True):
        assert list(got) == list(sent)
        for name, t in sent.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert received[1]["big"].data_ptr() == landing.data_ptr()
    assert received[0]["big"].data_ptr() != landing.data_ptr()
    with pytest.raises(ValueError, match="'a'"):
        sender.begin()
        sender.add(torch.zeros(2, 2))


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0.0},
        {"temperature": 1.0},
        {"temperature": 0.7, "top_k": 20, "top_p": 0.9},
    ],
    ids=["greedy", "plain", "warped"],
)
def test_lean_decode_draws_what_generate_draws(tiny_path, tiny_tokenizer, sampling):
    """The HF backend's decode loop against transformers' generate on the same seed: the same
    tokens, the same raw logits, pad after EOS, when the loop draws as generate does
    (torch.multinomial; its own draw is tested against the distribution below)."""
    from actors.rollout import HFBackend, multinomial

    cfg = _cfg(
        tiny_path,
        "roles.rollout.n_samples_per_prompt=3",
        "roles.rollout.max_new_tokens=20",
        *[f"roles.rollout.{k}={v}" for k, v in sampling.items()],
    )
    backend = HFBackend(engine_spec(cfg), "cpu")
    assert backend.lean
    prompts = _prompts(cfg, tiny_tokenizer, n=4)
    s = cfg.roles.rollout
    own = backend.generate(prompts, s, seed=7)
    assert torch.equal(own.response_ids, backend.generate(prompts, s, seed=7).response_ids)
    backend.draw = multinomial
    lean = backend.generate(prompts, s, seed=7)
    backend.lean = False  # the same call through generate
    ref = backend.generate(prompts, s, seed=7)
    assert lean.response_ids.shape == ref.response_ids.shape
    assert torch.equal(lean.response_ids, ref.response_ids)
    assert torch.equal(lean.response_mask, ref.response_mask) and lean.finish == ref.finish
    torch.testing.assert_close(lean.logps, ref.logps, rtol=0, atol=1e-5)
    if sampling["temperature"] > 0:
        again = backend.generate(prompts, s, seed=8)
        assert not torch.equal(again.response_ids, ref.response_ids)  # the seed matters
    # A second end-of-sequence id that rows do produce: both stop rows there, pad after it,
    # and stop early once every row has ended.
    extra = int(ref.response_ids[0, 2])
    eos = tiny_tokenizer.eos_token_id
    backend.model.generation_config.eos_token_id = [eos, extra]
    backend.eos_ids = torch.tensor([eos, extra])
    ref = backend.generate(prompts, s, seed=7)
    backend.lean = True
    lean = backend.generate(prompts, s, seed=7)
    assert torch.equal(lean.response_ids, ref.response_ids)
    stopped = (ref.response_ids == extra).any(1)
    assert stopped[0] and bool((ref.response_ids[0, 3:] == tiny_tokenizer.pad_token_id).all())


def test_lean_decode_takes_the_cache_under_either_name(tiny_path, tiny_tokenizer, caplog):
    """transformers 5.25 renamed the forward's `past_key_values` to `cache`: the loop passes
    the cache under the name the model's forward takes (the installed transformers' own, and
    the other one through a subclass of the same model), with the same greedy tokens; a
    forward without the loop's arguments goes through generate and the log says why, once."""
    from actors.rollout import CACHE_ARGUMENTS, HFBackend, lean_cache_argument
    from rlhf.models import load_model

    cfg = _cfg(tiny_path, "roles.rollout.max_new_tokens=16")
    prompts = _prompts(cfg, tiny_tokenizer, n=4)
    s = cfg.roles.rollout
    native = HFBackend(engine_spec(cfg), "cpu")
    installed = native.cache_arg
    assert installed in CACHE_ARGUMENTS
    other = next(name for name in CACHE_ARGUMENTS if name != installed)
    base = type(native.model)

    # The same model with the other transformers' forward: the cache under the other name.
    def with_cache(
        self, input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep=0
    ):
        return base.forward(
            self,
            input_ids,
            attention_mask,
            position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **{installed: cache},
        )

    def with_past(
        self, input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep=0
    ):
        return with_cache(
            self,
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            use_cache,
            logits_to_keep,
        )

    renamed = {"cache": with_cache, "past_key_values": with_past}[other]
    model = load_model(cfg.model, trainable=False, device="cpu")
    model.forward = renamed.__get__(model)
    assert lean_cache_argument(model.forward) == (other, "")
    swapped = HFBackend(engine_spec(cfg), "cpu", model=model)
    want = native.generate(prompts, s, seed=0)
    got = swapped.generate(prompts, s, seed=0)
    assert swapped.lean and torch.equal(got.response_ids, want.response_ids)
    torch.testing.assert_close(got.logps, want.logps, rtol=0, atol=1e-5)

    model.forward = (lambda self, **kw: base.forward(self, **kw)).__get__(model)
    with caplog.at_level("WARNING", logger="actors.rollout"):
        plain = HFBackend(engine_spec(cfg), "cpu", model=model)
        HFBackend(engine_spec(cfg), "cpu", model=model)
    assert not plain.lean
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "rollouts of LlamaForCausalLM go through transformers' generate, not the lean decode "
        "loop (slower): its forward takes no cache / past_key_values, no position_ids, "
        "no logits_to_keep"
    ]
    assert torch.equal(plain.generate(prompts, s, seed=0).response_ids, want.response_ids)


def test_draw_tokens_samples_the_categorical_distribution(monkeypatch):
    """The inverse-CDF draw against the probabilities it is given: 400k draws per row land in
    each bin as often as its probability says (chi-square, 4 degrees of freedom), never on a
    zero; the draw follows the seed; the top of the uniform range and a NaN row are handled."""
    from actors.rollout import draw_tokens

    p = torch.tensor([[0.5, 0.0, 0.3, 0.15, 0.04, 0.01, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    n = 400_000
    torch.manual_seed(0)
    drawn = draw_tokens(p.repeat_interleave(n, 0)).view(2, n)
    counts = torch.stack([torch.bincount(row, minlength=7) for row in drawn]).double()
    assert bool((counts[p == 0] == 0).all()), counts
    assert bool((drawn[1] == 6).all())
    expected = n * p[0].double()
    live = expected > 0
    chi2 = float((((counts[0] - expected)[live]) ** 2 / expected[live]).sum())
    assert chi2 < 25.0, (chi2, counts[0])  # chi-square(4): P(>25) ~ 5e-5
    torch.manual_seed(0)
    assert torch.equal(draw_tokens(p.repeat_interleave(n, 0)).view(2, n), drawn)
    # A uniform at the very top of its range still picks the last token with probability > 0.
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(*a[0], dtype=torch.float64))
    top = torch.tensor([[0.25, 0.75, 0.0, 0.0]])
    assert draw_tokens(top).tolist() == [1]
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="NaN or a row of zeros"):
        draw_tokens(torch.tensor([[float("nan"), 0.5]]))
