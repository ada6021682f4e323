"""Tier 2: data — every accepted format and source, every rejected row with its message,
quarantine files and counts, strict mode, tokenisation masks, truncation, collators."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from rlhf.config import DataConfig, DatasetSource
from rlhf.data import DataError, load_split, make_collator, pack_bins
from rlhf.data.formats import split_common_prefix, validate
from rlhf.data.quarantine import RowError
from rlhf.data.sources import read_rows

CHAT = [{"role": "user", "content": "Is this film good?"}]


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def data_config(path: Path | str, **kw) -> DataConfig:
    source_keys = {
        k: kw.pop(k) for k in ("preset", "columns", "ignore_columns", "split", "limit") if k in kw
    }
    return DataConfig(
        train=DatasetSource(path=str(path), **source_keys),
        max_length=kw.pop("max_length", 64),
        **kw,
    )


def load(path, fmt, tok, quarantine=None, **kw):
    cfg = data_config(path, **kw)
    return load_split(cfg.train, cfg, fmt, tok, quarantine)


# ---------------------------------------------------------------- accepted formats


@pytest.mark.parametrize(
    "fmt, row",
    [
        ("preference", {"prompt": "Q?", "chosen": "good", "rejected": "bad"}),
        ("preference", {"chosen": "Q? good one", "rejected": "Q? bad one"}),
        (
            "preference",
            {
                "prompt": CHAT,
                "chosen": [{"role": "assistant", "content": "yes"}],
                "rejected": [{"role": "assistant", "content": "no"}],
            },
        ),
        (
            "preference",
            {
                "chosen": [*CHAT, {"role": "assistant", "content": "yes"}],
                "rejected": [*CHAT, {"role": "assistant", "content": "no"}],
            },
        ),
        ("sft", {"prompt": "Q?", "completion": "A."}),
        ("sft", {"messages": [*CHAT, {"role": "assistant", "content": "yes"}]}),
        ("sft", {"prompt": CHAT, "completion": [{"role": "assistant", "content": "yes"}]}),
        ("sft", {"text": "just text"}),
        ("prompt", {"prompt": "Write a review:"}),
        ("prompt", {"prompt": CHAT}),
        ("prompt", {"messages": CHAT}),
        ("unpaired", {"prompt": "Q?", "completion": "A.", "label": True}),
        ("unpaired", {"prompt": "Q?", "completion": "A.", "label": "false"}),
        ("classification", {"text": "great film", "label": 1}),
        ("classification", {"text": "great film", "label": "0"}),
    ],
)
def test_accepted_rows(fmt, row, tiny_tokenizer, tmp_path):
    ds = load(write_jsonl(tmp_path / "d.jsonl", [row]), fmt, tiny_tokenizer)
    assert len(ds) == 1 and ds.quarantine.count == 0


def test_implicit_prompt_split():
    assert split_common_prefix(
        "Human: hi Assistant: I like it", "Human: hi Assistant: I hate it"
    ) == (
        "Human: hi Assistant: I ",
        "like it",
        "hate it",
    )
    convo_c = (*CHAT, {"role": "assistant", "content": "yes"})
    convo_r = (*CHAT, {"role": "assistant", "content": "no"})
    prompt, chosen, rejected = split_common_prefix(convo_c, convo_r)
    assert (
        prompt == tuple(CHAT) and chosen[0]["content"] == "yes" and rejected[0]["content"] == "no"
    )


# ---------------------------------------------------------------- rejected rows


@pytest.mark.parametrize(
    "fmt, row, field, message",
    [
        ("preference", {"prompt": "Q", "chosen": "a"}, "rejected", "missing key 'rejected'"),
        (
            "preference",
            {"prompt": "Q", "chosen": "a", "rejected": "b", "id": 3},
            "id",
            "unexpected key 'id'",
        ),
        (
            "preference",
            {"prompt": "Q", "chosen": 5, "rejected": "b"},
            "chosen",
            "expected a string or a list of chat messages, got int",
        ),
        ("preference", {"prompt": "Q", "chosen": None, "rejected": "b"}, "chosen", "got null"),
        ("preference", {"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty string"),
        (
            "preference",
            {"prompt": "Q", "chosen": "  ", "rejected": "b"},
            "chosen",
            "only whitespace",
        ),
        (
            "preference",
            {"prompt": "Q", "chosen": "same", "rejected": "same"},
            "rejected",
            "chosen and rejected are identical",
        ),
        (
            "preference",
            {"chosen": "alpha", "rejected": "beta"},
            "chosen",
            "share no leading prompt",
        ),
        (
            "preference",
            {"chosen": "Q? yes", "rejected": "Q? "},
            "rejected",
            "has no response of its own",
        ),
        (
            "preference",
            {"prompt": CHAT, "chosen": "yes", "rejected": "no"},
            "chosen",
            "prompt is a message list but chosen is a string",
        ),
        (
            "preference",
            {
                "prompt": CHAT,
                "chosen": [{"role": "user", "content": "x"}],
                "rejected": [{"role": "assistant", "content": "y"}],
            },
            "chosen",
            "must start with an assistant message",
        ),
        (
            "preference",
            {"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},
            "prompt",
            "role 'robot'",
        ),
        (
            "preference",
            {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
            "prompt",
            "must be an object with 'role' and 'content'",
        ),
        (
            "preference",
            {"prompt": [{"role": "user", "content": ""}], "chosen": "a", "rejected": "b"},
            "prompt",
            "has empty content",
        ),
        (
            "preference",
            {"prompt": [], "chosen": "a", "rejected": "b"},
            "prompt",
            "empty message list",
        ),
        (
            "sft",
            {"messages": [{"role": "user", "content": "hi"}]},
            "messages",
            "no assistant message",
        ),
        ("sft", {"messages": "hi"}, "messages", "got a string"),
        ("sft", {"text": ["a"]}, "text", "expected a string, got list"),
        (
            "unpaired",
            {"prompt": "Q", "completion": "A", "label": "maybe"},
            "label",
            "expected true/false",
        ),
        ("classification", {"text": "t", "label": 7}, "label", "outside [0, 1]"),
        ("classification", {"text": "t", "label": "pos"}, "label", "expected an integer class id"),
    ],
)
def test_rejected_rows(fmt, row, field, message):
    with pytest.raises(RowError) as err:
        validate(row, fmt)
    assert err.value.field == field
    assert message in err.value.reason


def test_quarantine_file_counts_and_messages(tiny_tokenizer, tmp_path):
    good = {"prompt": "Q?", "chosen": "good", "rejected": "bad"}
    lines = [
        json.dumps(good),  # 1
        '{"prompt": "Q?", "chosen": "x"',  # 2 undecodable
        json.dumps({"prompt": "Q?", "chosen": "a", "rejected": "a"}),  # 3 identical
        "",  # 4 blank, skipped but counted as a line
        json.dumps([1, 2]),  # 5 not an object
        json.dumps(good),  # 6
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        ("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff\xfe"}\n'
    )  # 7 invalid UTF-8
    qfile = tmp_path / "out" / "quarantine.jsonl"
    ds = load(path, "preference", tiny_tokenizer, qfile, max_bad_fraction=1.0)
    assert len(ds) == 2 and ds.rows_read == 6 and ds.quarantine.count == 4
    records = [json.loads(line) for line in qfile.read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in records] == [
        (2, None),
        (3, "rejected"),
        (5, None),
        (7, None),
    ]
    reasons = [r["reason"] for r in records]
    assert reasons[0] == "line is not valid JSON (Expecting ',' delimiter at character 31)"
    assert reasons[1] == "chosen and rejected are identical"
    assert reasons[2] == "row is a JSON list, expected an object with named fields"
    assert reasons[3].startswith("line is not valid UTF-8")
    assert records[1]["content"] == {"prompt": "Q?", "chosen": "a", "rejected": "a"}
    assert all(r["source"] == str(path) for r in records)
    assert "2 of 6 rows usable" in ds.summary() and "4 quarantined" in ds.summary()


def test_strict_refuses_with_the_first_error(tiny_tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": "a"}],
    )
    with pytest.raises(DataError) as err:
        load(path, "preference", tiny_tokenizer, strict=True)
    assert f"{path} row 2, field 'rejected': missing key 'rejected'" in str(err.value)
    assert "data.strict" in str(err.value)


def test_too_many_bad_rows_refuse_to_start(tiny_tokenizer, tmp_path):
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b"}] + [{"prompt": "Q", "chosen": "a"}] * 3
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(
        DataError,
        match=r"3 of 4 rows are bad \(75%, above data.max_bad_fraction=0.5\); first: .* row 2",
    ):
        load(path, "preference", tiny_tokenizer)
    assert len(load(path, "preference", tiny_tokenizer, max_bad_fraction=0.8)) == 1
    with pytest.raises(DataError, match="none of its 3 rows is usable"):
        load(
            write_jsonl(tmp_path / "bad.jsonl", rows[1:]),
            "preference",
            tiny_tokenizer,
            max_bad_fraction=1.0,
        )


def test_missing_chat_template_is_an_early_clear_error(tiny_tokenizer, tmp_path):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "plain", "chosen": "a", "rejected": "b"},
            {
                "prompt": CHAT,
                "chosen": [{"role": "assistant", "content": "y"}],
                "rejected": [{"role": "assistant", "content": "n"}],
            },
        ],
    )
    with pytest.raises(
        DataError,
        match=r"row 2 is a chat conversation, but tokenizer .* has no chat template. Fix: set model.chat_template",
    ):
        load(path, "preference", tok)


# ---------------------------------------------------------------- sources


ROWS = [{"prompt": f"Q{i}?", "chosen": "good answer", "rejected": "bad answer"} for i in range(5)]


def test_sources_agree(tiny_tokenizer, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", ROWS),
        "json": tmp_path / "d.json",
        "json_obj": tmp_path / "obj.json",
        "json_lines": tmp_path / "lines.json",
        "parquet": tmp_path / "d.parquet",
        "csv": tmp_path / "d.csv",
        "tsv": tmp_path / "d.tsv",
        "disk": tmp_path / "saved",
    }
    paths["json"].write_text(json.dumps(ROWS))
    paths["json_obj"].write_text(json.dumps({"data": ROWS}))
    paths["json_lines"].write_text("\n".join(json.dumps(r) for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), paths["parquet"])
    for key, delim in (("csv", ","), ("tsv", "\t")):
        with paths[key].open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(ROWS[0]), delimiter=delim)
            w.writeheader()
            w.writerows(ROWS)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(
        str(paths["disk"])
    )
    reference = load(paths["jsonl"], "preference", tiny_tokenizer).features
    for name, path in paths.items():
        assert load(path, "preference", tiny_tokenizer).features == reference, name


def test_source_errors(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(read_rows(str(tmp_path / "nope.jsonl")))
    weird = tmp_path / "d.xml"
    weird.write_text("<a/>")
    with pytest.raises(DataError, match=r"unsupported file type '\.xml'"):
        list(read_rows(str(weird)))
    with pytest.raises(DataError, match="cannot load dataset 'no-such-org/no-such-dataset'"):
        list(read_rows("no-such-org/no-such-dataset"))
    ragged = tmp_path / "r.csv"
    ragged.write_text("prompt,chosen,rejected\nQ,a,b\nQ,a\nQ,a,b,c\n")
    rows = list(read_rows(str(ragged)))
    assert isinstance(rows[1][1], RowError) and "fewer cells" in rows[1][1].reason
    assert isinstance(rows[2][1], RowError) and "4 cells, the header names 3" in rows[2][1].reason
    with pytest.raises(DataError, match="no split 'test'"):
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(
            str(tmp_path / "s")
        )
        list(read_rows(str(tmp_path / "s"), split="test"))


def test_limit_and_columns(tiny_tokenizer, tmp_path):
    rows = [{"q": "Q?", "good": "yes", "bad": "no", "id": i} for i in range(10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = load(
        path,
        "preference",
        tiny_tokenizer,
        columns={"q": "prompt", "good": "chosen", "bad": "rejected"},
        ignore_columns=["id"],
        limit=4,
    )
    assert len(ds) == 4 and ds.rows_read == 4


# ---------------------------------------------------------------- presets


def test_stack_exchange_paired_preset(tiny_tokenizer, tmp_path):
    row = {
        "qid": 1,
        "question": "How do I sort?",
        "date": "2020",
        "metadata": ["x"],
        "response_j": "Use sorted().",
        "response_k": "Do not.",
    }
    path = write_jsonl(tmp_path / "se.jsonl", [row])
    ds = load(path, "preference", tiny_tokenizer, preset="stack_exchange_paired")
    f = ds[0]
    assert tiny_tokenizer.decode(f.prompt_ids) == "Question: How do I sort?\n\nAnswer: "
    assert tiny_tokenizer.decode(f.chosen_ids) == "Use sorted().<|im_end|>"
    assert tiny_tokenizer.decode(f.rejected_ids) == "Do not.<|im_end|>"
    sft = load(path, "sft", tiny_tokenizer, preset="stack_exchange_paired")
    assert (
        tiny_tokenizer.decode(sft[0].input_ids)
        == "Question: How do I sort?\n\nAnswer: Use sorted().<|im_end|>"
    )
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "response_j": "a"}])
    with pytest.raises(DataError, match="field 'response_k': missing column 'response_k'"):
        load(bad, "preference", tiny_tokenizer, preset="stack_exchange_paired", strict=True)


def test_ultrafeedback_binarized_preset(tiny_tokenizer, tmp_path):
    from rlhf.data.presets import hub_split

    user = {"role": "user", "content": "Name a colour."}
    row = {
        "prompt": "Name a colour.",
        "prompt_id": "abc",
        "chosen": [user, {"role": "assistant", "content": "Blue."}],
        "rejected": [user, {"role": "assistant", "content": "No."}],
        "messages": [user, {"role": "assistant", "content": "Blue."}],
        "score_chosen": 8.0,
        "score_rejected": 2.0,
    }
    path = write_jsonl(tmp_path / "uf.jsonl", [row])
    f = load(path, "preference", tiny_tokenizer, preset="ultrafeedback_binarized")[0]
    assert (
        tiny_tokenizer.decode(f.prompt_ids)
        == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tiny_tokenizer.decode(f.chosen_ids) == "Blue.<|im_end|>\n"
    assert tiny_tokenizer.decode(f.rejected_ids) == "No.<|im_end|>\n"
    assert hub_split("ultrafeedback_binarized", "preference", "train") == "train_prefs"
    assert hub_split("ultrafeedback_binarized", "preference", "test") == "test_prefs"
    assert hub_split("ultrafeedback_binarized", "sft", "train") == "train_sft"
    assert hub_split(None, "preference", "train") == "train"


def test_marc_ja_and_imdb_presets(tiny_tokenizer, tmp_path):
    marc = write_jsonl(
        tmp_path / "marc.jsonl",
        [
            {"sentence": "とても良い商品でした", "label": "positive", "review_id": "R1"},
            {"sentence": "最悪でした", "label": "negative", "review_id": "R2"},
            {"sentence": "良い", "label": 0, "review_id": "R3"},
            {"sentence": "悪い", "label": "neutral", "review_id": "R4"},
        ],
    )
    ds = load(marc, "classification", tiny_tokenizer, preset="marc_ja")
    assert [f.label for f in ds.features] == [1, 0, 1]
    assert (
        ds.quarantine.records[0]["row"] == 4
        and "MARC-ja label must be" in ds.quarantine.records[0]["reason"]
    )
    imdb = write_jsonl(
        tmp_path / "imdb.jsonl",
        [
            {"text": "one two three four five six seven eight nine ten", "label": i % 2}
            for i in range(8)
        ],
    )
    ds = load(imdb, "classification", tiny_tokenizer, preset="imdb")
    assert [f.label for f in ds.features] == [0, 1] * 4
    prompts = load(imdb, "prompt", tiny_tokenizer, preset="imdb")
    lengths = [len(f.prompt_text.split()) for f in prompts.features]
    assert lengths == [2, 3, 4, 5, 6, 7, 8, 2], "IMDb prompts are the first 2-8 words"


# ---------------------------------------------------------------- tokenisation


def test_preference_masks_and_eos(tiny_tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "Rate it:", "chosen": " Great film.", "rejected": " Bad."}],
    )
    f = load(path, "preference", tiny_tokenizer)[0]
    batch = make_collator("preference", tiny_tokenizer.pad_token_id)([f])
    assert batch.input_ids.shape[0] == 2
    for row, response in ((0, f.chosen_ids), (1, f.rejected_ids)):
        ids = batch.input_ids[row][batch.response_mask[row]].tolist()
        assert ids == response and ids[-1] == tiny_tokenizer.eos_token_id
        assert batch.input_ids[row][: len(f.prompt_ids)].tolist() == f.prompt_ids
        assert not batch.response_mask[row][: len(f.prompt_ids)].any()
    pad_positions = ~batch.attention_mask
    assert (batch.input_ids[pad_positions] == tiny_tokenizer.pad_token_id).all()
    assert not (batch.response_mask & pad_positions).any()


@pytest.mark.parametrize("mode", ["keep_end", "keep_start", "drop"])
def test_prompt_truncation(mode, tiny_tokenizer, tmp_path):
    words = " ".join(f"w{i}" for i in range(60))
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": words, "chosen": "yes", "rejected": "no"},
            {"prompt": "short", "chosen": "yes", "rejected": "no"},
        ],
    )
    full = tiny_tokenizer(words, add_special_tokens=False)["input_ids"]
    assert len(full) > 16
    ds = load(
        path,
        "preference",
        tiny_tokenizer,
        max_length=32,
        max_prompt_length=16,
        truncation_mode=mode,
        max_bad_fraction=1.0,
    )
    if mode == "drop":
        assert len(ds) == 1 and ds.quarantine.records[0]["field"] == "prompt"
        assert (
            f"prompt has {len(full)} tokens, more than data.max_prompt_length=16"
            == ds.quarantine.records[0]["reason"]
        )
    else:
        expected = full[-16:] if mode == "keep_end" else full[:16]
        assert ds[0].prompt_ids == expected


def test_response_truncation_and_identical_after_truncation(tiny_tokenizer, tmp_path):
    long_a = "same start " * 20 + "A"
    long_b = "same start " * 20 + "B"
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "P", "chosen": long_a, "rejected": long_b},
            {"prompt": "P", "chosen": "ok", "rejected": "no"},
        ],
    )
    ds = load(path, "preference", tiny_tokenizer, max_length=24, max_bad_fraction=1.0)
    assert len(ds) == 1
    assert (
        ds.quarantine.records[0]["reason"]
        == "chosen and rejected are identical after truncation to data.max_length=24"
    )
    assert all(len(f.prompt_ids) + len(f.chosen_ids) <= 24 for f in ds.features)


def test_bos_is_kept_when_the_tokenizer_adds_one(tiny_tokenizer, tmp_path):
    import copy

    from tokenizers import processors

    from rlhf.data.tokenize import Tokenizer, TokenizeSettings

    tok = copy.deepcopy(tiny_tokenizer)
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)]
    )
    t = Tokenizer(tok, TokenizeSettings(max_length=64, prompt_limit=8, truncation_mode="keep_end"))
    assert t.bos == tok.bos_token_id
    ids = t.prompt_ids(" ".join(["word"] * 30))
    assert ids[0] == tok.bos_token_id and len(ids) == 8


def test_sft_masks(tiny_tokenizer, tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Film?"},
        {"role": "assistant", "content": "Go see it."},
    ]
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": messages}, {"prompt": "Q: ", "completion": "A."}, {"text": "All of it."}],
    )
    ds = load(path, "sft", tiny_tokenizer)
    trained = [
        tiny_tokenizer.decode([t for t, m in zip(f.input_ids, f.loss_mask, strict=True) if m])
        for f in ds.features
    ]
    assert trained[0] == "Hello.<|im_end|>\nGo see it.<|im_end|>\n"
    assert trained[1] == "A.<|im_end|>"
    assert trained[2] == "All of it.<|im_end|>"
    full = load(path, "sft", tiny_tokenizer, completion_only_loss=False)
    assert all(all(f.loss_mask) for f in full.features)


def test_collators_left_pad_prompts_and_kto_pairs(tiny_tokenizer, tmp_path):
    prompts = load(
        write_jsonl(
            tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "a much longer prompt here"}]
        ),
        "prompt",
        tiny_tokenizer,
    )
    batch = make_collator("prompt", tiny_tokenizer.pad_token_id)(prompts.features)
    assert batch.attention_mask[:, -1].all(), "left padding: every prompt ends at the last column"
    assert not batch.attention_mask[0, 0]
    rows = [{"prompt": f"P{i}", "completion": f"C{i}", "label": i % 2 == 0} for i in range(3)]
    ds = load(write_jsonl(tmp_path / "u.jsonl", rows), "unpaired", tiny_tokenizer)
    kb = make_collator("unpaired", tiny_tokenizer.pad_token_id)(ds.features)
    assert kb.desirable.tolist() == [True, False, True]
    for i in range(3):
        text = tiny_tokenizer.decode(kb.kl_input_ids[i][kb.kl_attention_mask[i]])
        assert text == f"P{i}C{(i + 1) % 3}<|im_end|>", (
            "KL rows pair each prompt with the next completion"
        )


def test_pack_bins_first_fit_decreasing():
    lengths = [7, 5, 4, 3, 3, 2, 1]
    bins = pack_bins(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # total 25 tokens need at least 3 rows of 10
    with pytest.raises(ValueError, match="does not fit"):
        pack_bins([11], 10)


def test_packed_rows_attend_within_each_example(tiny_path, tiny_tokenizer):
    from rlhf.config import ModelConfig
    from rlhf.models import load_model

    cfg = DataConfig(
        train=DatasetSource(path="builtin:reviews", limit=8), max_length=64, packing=True
    )
    ds = load_split(cfg.train, cfg, "sft", tiny_tokenizer)
    batch = make_collator("sft", tiny_tokenizer.pad_token_id, 64)(ds.features)
    assert batch.input_ids.shape[0] < len(ds), "several examples share a row"
    model = load_model(ModelConfig(name_or_path=str(tiny_path)), trainable=False)
    with torch.no_grad():
        packed = model(**batch.model_inputs()).logits
        bins = pack_bins([len(f.input_ids) for f in ds.features], 64)
        for row, members in enumerate(bins):
            offset = 0
            for i in members:
                ids = torch.tensor([ds[i].input_ids])
                alone = model(input_ids=ids).logits[0]
                torch.testing.assert_close(
                    packed[row, offset : offset + ids.shape[1]], alone, atol=1e-5, rtol=1e-5
                )
                offset += ids.shape[1]
    assert batch.loss_mask.sum() == sum(sum(f.loss_mask) for f in ds.features)


def test_eval_fraction_split(tiny_tokenizer):
    from rlhf.data import load_datasets

    cfg = DataConfig(
        train=DatasetSource(path="builtin:reviews", limit=40), eval_fraction=0.25, max_length=64
    )
    train, evaluation = load_datasets(cfg, "preference", tiny_tokenizer)
    assert len(train) == 30 and len(evaluation) == 10
    assert [f.index for f in train.features] == list(range(30))
    assert [f.index for f in evaluation.features] == list(range(10))
    whole = load_datasets(
        DataConfig(train=DatasetSource(path="builtin:reviews", limit=40), max_length=64),
        "preference",
        tiny_tokenizer,
    )[0]
    assert len(whole) == 40

    def key(f):
        return (tuple(f.prompt_ids), tuple(f.chosen_ids), tuple(f.rejected_ids))

    # Every row lands in exactly one of the two splits.
    assert sorted(map(key, train.features + evaluation.features)) == sorted(
        map(key, whole.features)
    )


def test_builtin_reviews_splits_are_disjoint():
    from rlhf.data.synthetic import TEST_MOVIES, reviews

    train = list(reviews("train"))
    test = list(reviews("test"))
    assert len(train) == 512 and len(test) == 128
    assert all(any(m in r["prompt"] for m in TEST_MOVIES) for r in test)
    assert not any(any(m in r["prompt"] for m in TEST_MOVIES) for r in train)
    assert train == list(reviews("train")), "deterministic"
    with pytest.raises(DataError, match="splits"):
        list(reviews("validation"))


def test_chat_prompts_wraps_plain_prompts_as_a_user_turn(tiny_tokenizer):
    cfg = DataConfig(
        train=DatasetSource(path="builtin:reviews", limit=2), max_length=64, chat_prompts=True
    )
    ds = load_split(cfg.train, cfg, "prompt", tiny_tokenizer)
    text = ds[0].prompt_text
    assert text.startswith("<|im_start|>user\n") and text.endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )


# ---------------------------------------------------------------- prompt rows with ground truth


def test_prompt_rows_carry_their_other_fields(tiny_tokenizer, tmp_path):
    tests = ["assert f(1) == 2"]
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "What is 2+2?", "answer": "4", "metadata": {"level": 1}},
            {"messages": CHAT, "answer": 7, "tests": tests},
            {"prompt": "No answer here."},
        ],
    )
    ds = load(path, "prompt", tiny_tokenizer, max_bad_fraction=1.0, chat_prompts=True)
    assert [f.fields for f in ds.features] == [
        {"answer": "4", "metadata": {"level": 1}},
        {"answer": 7, "tests": tests},
        {},
    ]
    # The fields are not part of the prompt the model sees.
    assert "4" not in ds.features[0].prompt_text.replace("2+2", "")
    # The reward reads `answer`: a row without it is quarantined, naming file, row and field.
    qfile = tmp_path / "q.jsonl"
    cfg = data_config(path, max_bad_fraction=1.0)
    ds = load_split(cfg.train, cfg, "prompt", tiny_tokenizer, qfile, required=("answer",))
    assert len(ds) == 2 and ds.quarantine.count == 1
    record = json.loads(qfile.read_text())
    assert (record["row"], record["field"]) == (3, "answer")
    assert "the reward (roles.reward) reads it" in record["reason"]
    # A null counts as missing; strict mode refuses to start on the first such row.
    write_jsonl(path, [{"prompt": "Q", "answer": "1"}, {"prompt": "Q", "answer": None}])
    cfg = data_config(path, strict=True)
    with pytest.raises(DataError) as err:
        load_split(cfg.train, cfg, "prompt", tiny_tokenizer, None, required=("answer",))
    assert f"{path} row 2, field 'answer': field 'answer' is null" in str(err.value)
    # Both prompt and messages in one row is still a mistake, not a field.
    with pytest.raises(RowError, match="unexpected key 'messages'"):
        validate({"prompt": "Q", "messages": CHAT}, "prompt")


def test_math_presets_on_their_real_schemas(tiny_tokenizer):
    from rlhf.data.presets import MATH_INSTRUCTION

    samples = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "samples"
    gsm = load(samples / "gsm8k.jsonl", "prompt", tiny_tokenizer, preset="gsm8k", strict=True)
    assert [f.fields["answer"] for f in gsm.features] == ["71", "190", "168", "500", "57", "224"]
    assert all(MATH_INSTRUCTION in f.prompt_text for f in gsm.features)
    math = load(samples / "math.jsonl", "prompt", tiny_tokenizer, preset="math", strict=True)
    assert [f.fields["answer"] for f in math.features] == [
        "\\frac{19}{12}",
        "9",
        "9",
        "5\\sqrt{2}",
        "720",
        "2",
    ]
    deep = load(samples / "deepscaler.jsonl", "prompt", tiny_tokenizer, preset="deepscaler")
    assert [f.fields["answer"] for f in deep.features] == ["25", "120", "6", "31"]
    sft = load(samples / "gsm8k.jsonl", "sft", tiny_tokenizer, preset="gsm8k", max_length=512)
    assert len(sft) == 6
    bad = {"question": "Q", "answer": "no final line"}
    with pytest.raises(RowError, match="no '#### <number>' line"):
        from rlhf.data.presets import gsm8k

        gsm8k(bad, "prompt", 0)


def test_builtin_arithmetic_splits_are_disjoint_and_carry_answers(tiny_tokenizer):
    from rlhf.data.arithmetic import problems

    train = load("builtin:arithmetic", "prompt", tiny_tokenizer, split="train", strict=True)
    test = load("builtin:arithmetic", "prompt", tiny_tokenizer, split="test", strict=True)
    assert len(train) + len(test) == len(problems()) == 164 and len(test) == 36
    assert not {f.prompt_text for f in train.features} & {f.prompt_text for f in test.features}
    for f in train.features + test.features:
        a, op, b = f.prompt_text.split("?")[0].removeprefix("What is ").split()
        assert int(f.fields["answer"]) == (int(a) + int(b) if op == "+" else int(a) * int(b))
