"""Samples -> token ids and label masks (engine/inputs/samples.py; docs/design.md, "Contracts", Samples)."""

import json
import pickle

import pytest

from forvalue.engine.inputs.readers import read_jsonl
from forvalue.engine.inputs.samples import EncodedSample, SampleError, SampleList, encode_sample, where_of

CHAT = [
    {"role": "system", "content": "you are a helpful bot ."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hello ! how are you ?"},
    {"role": "user", "content": "i am fine , thanks"},
    {"role": "assistant", "content": "good bye"},
]


def encode(sample, tokenizer, **kw) -> EncodedSample:
    return encode_sample(sample, tokenizer, where="index 7", **kw)


def tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(ids))


def labelled_runs(encoded: EncodedSample, tokenizer) -> list[str]:
    """The labelled tokens, one space-joined string per contiguous run."""
    runs, previous = [], None
    for k in encoded.label_positions():
        if previous != k - 1:
            runs.append([])
        runs[-1].append(encoded.input_ids[k])
        previous = k
    return [" ".join(tokens(tokenizer, run)) for run in runs]


# ---- label rules of each form ---------------------------------------------------------


def test_prompt_response_labels_the_response_only(tiny_tokenizer):
    enc = encode({"id": "a", "prompt": "what is two plus two ?", "response": "it is four"}, tiny_tokenizer)
    assert tokens(tiny_tokenizer, enc.input_ids) == ["<s>", *"what is two plus two ? it is four".split()]
    assert enc.label_mask == (False,) * 7 + (True,) * 3
    assert enc.id == "a" and enc.where == "index 7" and not enc.truncated
    assert enc.num_labels == 3 and enc.label_positions() == [7, 8, 9]


def test_append_eos_adds_a_labelled_eos(tiny_tokenizer):
    enc = encode({"prompt": "hello", "response": "good bye"}, tiny_tokenizer, append_eos=True)
    assert tokens(tiny_tokenizer, enc.input_ids) == ["<s>", "hello", "good", "bye", "</s>"]
    assert enc.label_mask == (False, False, True, True, True)


def test_text_labels_every_position_after_the_first(tiny_tokenizer):
    enc = encode({"text": "the cat sat"}, tiny_tokenizer, append_eos=True)
    assert tokens(tiny_tokenizer, enc.input_ids) == ["<s>", "the", "cat", "sat"]
    assert enc.label_mask == (False, True, True, True)


def test_messages_label_assistant_turns_with_end_of_turn(chat_tokenizer):
    enc = encode({"messages": CHAT}, chat_tokenizer)
    full = chat_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert list(enc.input_ids) == chat_tokenizer(full, add_special_tokens=False)["input_ids"]
    assert labelled_runs(enc, chat_tokenizer) == ["hello ! how are you ? <|im_end|>", "good bye <|im_end|>"]


def test_messages_single_turn_exact_mask(chat_tokenizer):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "i am fine"}]
    enc = encode({"messages": messages}, chat_tokenizer)
    assert tokens(chat_tokenizer, enc.input_ids) == [
        "<|im_start|>", "user", "\n", "hello", "<|im_end|>", "\n",
        "<|im_start|>", "assistant", "\n", "i", "am", "fine", "<|im_end|>", "\n",
    ]  # fmt: skip
    assert enc.label_mask == (False,) * 9 + (True,) * 4 + (False,)


def test_messages_starting_with_the_assistant(chat_tokenizer):
    messages = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "bye"}]
    enc = encode({"messages": messages}, chat_tokenizer)
    assert labelled_runs(enc, chat_tokenizer) == ["a <|im_end|>"]


def test_loss_on_all_labels_every_position_of_every_form(tiny_tokenizer):
    samples = [
        {"prompt": "hello there", "response": "hello"},
        {"messages": CHAT},
        {"messages": [{"role": "user", "content": "hello"}]},  # no assistant needed
        {"input_ids": [5, 6, 7], "loss_mask": [0, 0, 0]},
        {"input_ids": [5, 6, 7], "labels": [-100, -100, -100]},
    ]
    for sample in samples:
        enc = encode(sample, tiny_tokenizer, loss_on="all")
        assert enc.label_mask == (False,) + (True,) * (len(enc.input_ids) - 1)


def test_loss_on_must_be_known(tiny_tokenizer):
    with pytest.raises(ValueError, match="loss_on") as info:
        encode({"text": "hello there"}, tiny_tokenizer, loss_on="prompt")
    assert not isinstance(info.value, SampleError)


def test_loss_mask_form(tiny_tokenizer):
    enc = encode({"input_ids": [1, 5, 6, 7], "loss_mask": [1, 0, True, 1]}, tiny_tokenizer)
    assert enc.input_ids == (1, 5, 6, 7)
    assert enc.label_mask == (False, False, True, True)  # loss_mask[0] ignored


def test_hf_labels_form(tiny_tokenizer):
    enc = encode({"input_ids": [1, 5, 6, 7], "labels": [1, -100, 6, 7]}, tiny_tokenizer)
    assert enc.label_mask == (False, False, True, True)


def test_input_ids_must_be_in_the_vocabulary(tiny_tokenizer):
    n = len(tiny_tokenizer)
    assert encode({"input_ids": [1, n - 1], "loss_mask": [0, 1]}, tiny_tokenizer).input_ids == (1, n - 1)
    outside = rf"position 1 is {n}, outside the tokenizer's vocabulary \[0, {n}\)"
    with pytest.raises(SampleError, match=outside):
        encode({"input_ids": [1, n], "loss_mask": [0, 1]}, tiny_tokenizer)


def test_pre_tokenised_samples_need_no_tokenizer():
    enc = encode({"input_ids": [0, 50_000], "loss_mask": [0, 1]}, None)
    assert enc.input_ids == (0, 50_000) and enc.label_mask == (False, True)


# ---- length ---------------------------------------------------------------------------


def test_too_long_without_max_length_is_an_error(tiny_tokenizer):
    with pytest.raises(SampleError) as info:
        encode({"id": "long", "text": "the cat sat on the mat"}, tiny_tokenizer, context_length=4)
    assert "has 7 tokens" in str(info.value) and "context is 4" in str(info.value)
    assert "max_length=" in str(info.value)


def test_max_length_truncates_and_says_so(tiny_tokenizer):
    sample = {"text": "the cat sat on the mat"}
    enc = encode(sample, tiny_tokenizer, max_length=3)
    assert tokens(tiny_tokenizer, enc.input_ids) == ["<s>", "the", "cat"] and enc.truncated
    assert enc.label_mask == (False, True, True)
    assert len(encode(sample, tiny_tokenizer, max_length=5, context_length=4).input_ids) == 4
    fits = encode(sample, tiny_tokenizer, max_length=7, context_length=7)
    assert len(fits.input_ids) == 7 and not fits.truncated


def test_truncation_that_cuts_every_label_is_an_error(tiny_tokenizer):
    with pytest.raises(SampleError, match="nothing to value"):
        encode({"prompt": "the cat sat on the mat", "response": "hello"}, tiny_tokenizer, max_length=4)


@pytest.mark.parametrize("max_length", [0, 1, 2.5, True])
def test_max_length_must_leave_room_for_a_label(tiny_tokenizer, max_length):
    with pytest.raises(ValueError, match="max_length"):
        encode({"text": "hello there"}, tiny_tokenizer, max_length=max_length)


# ---- bad samples ----------------------------------------------------------------------

USER = {"role": "user", "content": "hello"}
BOT = {"role": "assistant", "content": "good bye"}
BAD = [
    ({"prompt": "hello"}, "has 'prompt' but not 'response'"),
    ({"response": "hello"}, "has 'response' but not 'prompt'"),
    ({"input_ids": [1, 5]}, "has 'input_ids' but not 'loss_mask' or 'labels'"),
    ({"prompt": "hello", "response": "bye", "text": "hi"}, "mixes several forms"),
    ({"input_ids": [1, 5], "loss_mask": [0, 1], "labels": [1, 5]}, "mixes several forms"),
    ({"prompt": "hello", "respone": "bye"}, "unknown key(s) 'respone' (did you mean 'response'?)"),
    ({"text": "hello", "source": "web"}, 'put your own fields under "meta"'),
    ({"meta": {"source": "web"}}, "no content"),
    ({"text": 5}, '"text" must be a string'),
    ({"text": ""}, '"text" is empty'),
    ({"prompt": "", "response": "bye"}, '"prompt" is empty'),
    ({"prompt": "hello", "response": None}, '"response" must be a string'),
    ({"input_ids": [1, "a"], "loss_mask": [0, 1]}, "position 1 is 'a'"),
    ({"input_ids": [1, True], "loss_mask": [0, 1]}, "position 1 is True"),
    ({"input_ids": [1, 5.0], "loss_mask": [0, 1]}, "position 1 is 5.0"),
    ({"input_ids": "1 5", "loss_mask": [0, 1]}, '"input_ids" must be a list of integers'),
    ({"input_ids": [1, -1], "labels": [1, -1]}, "position 1 is -1, outside"),
    ({"input_ids": [1, 5, 6], "loss_mask": [0, 1]}, '"input_ids" has 3 tokens but "loss_mask" has 2'),
    ({"input_ids": [1, 5], "labels": [-100, 5, 6]}, '"input_ids" has 2 tokens but "labels" has 3'),
    ({"input_ids": [1, 5], "loss_mask": [0, 2]}, "values must be 0 or 1"),
    ({"input_ids": [1, 5, 6], "labels": [-100, 6, 7]}, "forvalue shifts labels itself"),
    ({"input_ids": [1, 5, 6], "labels": [-100, -100, -100]}, "nothing to value (no label tokens)"),
    ({"input_ids": [1], "loss_mask": [1]}, "nothing to value (no label tokens)"),
    ({"input_ids": [], "loss_mask": []}, "no tokens"),
    ({"image": "cat.png", "text": "hello"}, "'image' is not a sample key; image-text samples are chat"),
    ({"pixel_values": [[0.5]], "text": "hello"}, "'pixel_values' is not a sample key"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}, BOT]}, "this model is text-only"),
    ({"messages": [USER]}, "nothing to value: no assistant message"),
    ({"messages": []}, "non-empty list"),
    ({"messages": "hello"}, "non-empty list"),
    ({"messages": ["hello", BOT]}, "messages[0] must be a dict"),
    ({"messages": [USER, {"role": "assistant", "content": 5}]}, 'messages[1]["content"] must be a string'),
    ({"messages": [{"role": "user"}, BOT]}, 'messages[0]["content"] must be a string'),
    ({"messages": [{"content": "hello"}, BOT]}, 'messages[0]["role"] must be a non-empty string'),
    ({"messages": [{**USER, "weight": 0}, BOT]}, "messages[0] has unknown key(s) 'weight'"),
    ({"messages": [USER, {"role": "assistant", "content": ""}]}, "messages[1] is an empty assistant message"),
]


@pytest.mark.parametrize(("sample", "fragment"), BAD)
def test_bad_samples_name_id_and_place(tiny_tokenizer, sample, fragment):
    with pytest.raises(SampleError) as info:
        encode({"id": "bad", **sample}, tiny_tokenizer)
    assert str(info.value).startswith("sample 'bad' (index 7): ")
    assert fragment in str(info.value)
    assert (info.value.sample_id, info.value.where) == ("bad", "index 7")
    assert isinstance(info.value, ValueError)


def test_integer_ids_are_named_as_strings(tiny_tokenizer):
    assert encode({"id": 12, "text": "hello there"}, tiny_tokenizer).id == "12"
    with pytest.raises(SampleError, match=r"^sample '12' \(index 7\): "):
        encode({"id": 12, "text": ""}, tiny_tokenizer)


@pytest.mark.parametrize("sample", [{"id": ["x"], "text": "hello"}, {"id": True, "text": "hello"}])
def test_bad_id(tiny_tokenizer, sample):
    with pytest.raises(SampleError, match=r'^sample \(index 7\): "id" must be a string or an integer'):
        encode(sample, tiny_tokenizer)


def test_non_dict_sample(tiny_tokenizer):
    with pytest.raises(SampleError, match=r"^sample \(index 7\): expected a dict, got str"):
        encode("hello there", tiny_tokenizer)


# ---- what the tokenizer must offer ----------------------------------------------------


def test_messages_need_a_chat_template(no_template_tokenizer):
    with pytest.raises(SampleError, match="no chat template"):
        encode({"id": "c", "messages": CHAT}, no_template_tokenizer)


def test_messages_need_a_fast_tokenizer(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(type(tiny_tokenizer), "is_fast", False)
    with pytest.raises(SampleError, match="fast tokenizer"):
        encode({"messages": CHAT}, tiny_tokenizer)


def test_inconsistent_prefix_renders_are_refused(tiny_tokenizer):
    tiny_tokenizer.chat_template = "{{ messages | length }}" + tiny_tokenizer.chat_template
    with pytest.raises(SampleError, match="does not render prefixes consistently"):
        encode({"messages": CHAT}, tiny_tokenizer)


def test_template_errors_become_sample_errors(tiny_tokenizer):
    tiny_tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(SampleError, match=r"chat template failed.*roles must alternate"):
        encode({"messages": CHAT}, tiny_tokenizer)


def test_append_eos_needs_an_eos_token(tiny_tokenizer):
    tiny_tokenizer.eos_token = None
    assert tiny_tokenizer.eos_token_id is None
    with pytest.raises(SampleError, match="no EOS token"):
        encode({"prompt": "hello", "response": "bye"}, tiny_tokenizer, append_eos=True)


def test_text_needs_a_tokenizer():
    with pytest.raises(SampleError, match="needs a tokenizer"):
        encode({"text": "hello"}, None)


# ---- files and batches ----------------------------------------------------------------


def write_lines(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_read_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path, tiny_tokenizer):
    path = write_lines(
        tmp_path,
        ['\ufeff{"text": "hello there"}', "", "   ", '{"id": "x", "text": ""}', '{"text": "good bye"}'],
    )
    samples = read_jsonl(path)
    assert isinstance(samples, SampleList) and len(samples) == 3
    assert [samples.where(i) for i in range(3)] == [f"{path} line {n}" for n in (1, 4, 5)]
    assert where_of(samples, 2) == f"{path} line 5" and where_of(list(samples), 2) == "index 2"
    with pytest.raises(SampleError) as info:
        encode_sample(samples[1], tiny_tokenizer, where=where_of(samples, 1), index=1)
    assert str(info.value) == f"sample 'x' ({path} line 4): \"text\" is empty" and info.value.index == 1
    encoded = encode_sample(samples[2], tiny_tokenizer, where=where_of(samples, 2), index=2)
    assert encoded.where == f"{path} line 5" and encoded.id == "2"


@pytest.mark.parametrize(
    ("line", "fragment"),
    [('{"text": "hello"', "not valid JSON"), ('["hello"]', "expected a JSON object")],
)
def test_read_jsonl_names_the_bad_line(tmp_path, line, fragment):
    path = write_lines(tmp_path, ['{"text": "hello"}', "", line])
    with pytest.raises(SampleError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"sample ({path} line 3): {fragment}")


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sample file not found: .*nope\.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_sample_errors_survive_pickling():
    error = pickle.loads(pickle.dumps(SampleError("oops", sample_id="a", where="index 1")))
    assert (str(error), error.message, error.sample_id, error.where) == (
        "sample 'a' (index 1): oops",
        "oops",
        "a",
        "index 1",
    )


def test_sample_list_pickles_with_its_lines(tmp_path):
    samples = read_jsonl(write_lines(tmp_path, ["", json.dumps({"text": "hello"})]))
    copy = pickle.loads(pickle.dumps(samples))
    assert copy == samples and copy.where(0) == f"{samples.source} line 2"
    copy.append({"text": "bye"})  # added after reading: no line to name
    assert copy.where(1) == "index 1"
