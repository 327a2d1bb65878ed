"""Image-text models: values equal autograd's <dW_a, dW_b> through each family's own forward
with its pixel values; no image token is a label; a bad image is a per-sample error; images
travel over gRPC as bytes."""

import base64
import copy
import json

import numpy as np
import pytest
import torch
from test_grpc import ServerThread

from forvalue.bindings import Client
from forvalue.bindings import forvalue_pb2 as pb
from forvalue.bindings.cli import main
from forvalue.bindings.cli.stream import stream_file
from forvalue.bindings.wire import BadSample, resolve_image_paths, sample_of
from forvalue.engine import ModelError, ReferenceMismatch, SampleError, Valuator, load_model, read_jsonl
from forvalue.engine.inputs.images import ImageLimits
from forvalue.engine.model.attention import PackingUnsupported

from tiny_models import autograd_gradient, frob, tiny_model
from tiny_vlms import FAMILIES, PLACEHOLDER, image, image_sample, png_bytes, tiny_processor, tiny_vlm


def train_samples():
    two_images = {"id": "two", "messages": [
        {"role": "user", "content": [{"type": "image", "image": image(3, (28, 28))},
                                     {"type": "text", "text": "the cat ?"},
                                     {"type": "image", "image": image(4, (56, 40))}]},
        {"role": "assistant", "content": "it is the cat on the mat"}]}
    text_only = {"id": "text", "messages": [{"role": "user", "content": "hello there"},
                                            {"role": "assistant", "content": "good bye"}]}
    return [image_sample("t0", image(1)), two_images, text_only,
            image_sample("t1", png_bytes(image(2, (40, 56))), answer="the cat sat on the mat")]


def valid_samples():
    return [image_sample("v0", image(5), question="what is it ?", answer="a cat"),
            image_sample("v1", image(6, (28, 28)))]


def gradients(vlm, model, samples):
    """G(x) by autograd through the float64 model's own forward, on the engine's ids and labels."""
    out = []
    for states in Valuator(model, progress=False).label_states(samples):
        sample = states.sample
        inputs = model.image_inputs(sample.images)
        out.append(autograd_gradient(vlm.model, list(sample.input_ids), list(sample.label_mask), inputs))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    vlm = tiny_vlm(request.param)
    float32 = copy.deepcopy(vlm.model)  # load_model converts the module it is given in place
    model = load_model(vlm.model, processor=vlm.processor, dtype=torch.float64)
    return vlm, model, float32


def test_values_equal_autograd(family):
    vlm, model, float32 = family
    train, valid = train_samples(), valid_samples()
    Ga, Gb = gradients(vlm, model, train), gradients(vlm, model, valid)
    expected = np.array([[frob(a, b) for b in Gb] for a in Ga])
    v = Valuator(model, progress=False)
    for route in ("gram", "outer"):
        np.testing.assert_allclose(v.pairwise(train, valid, route=route), expected, rtol=1e-9)
    np.testing.assert_allclose(v.self_value(train), [frob(a, a) for a in Ga], rtol=1e-9)
    np.testing.assert_allclose(v.score(train, v.reference(valid)), expected.mean(axis=1), rtol=1e-9)

    single = Valuator(load_model(float32, processor=vlm.processor, dtype=torch.float32), progress=False)
    np.testing.assert_allclose(single.pairwise(train, valid), expected, rtol=1e-4)


def test_no_image_token_is_a_label(family):
    vlm, model, _ = family
    tokenizer = vlm.processor.tokenizer
    picture = image(7)
    sample = image_sample("a", picture, answer="the cat sat on the mat")
    rendered = vlm.processor.apply_chat_template(
        [{**m, "content": [{"type": "image"}, m["content"][1]]} if m["role"] == "user" else m
         for m in sample["messages"]], tokenize=False)
    processed = vlm.processor(text=[rendered], images=[picture], add_special_tokens=False)
    image_ids = vlm.image_token_ids()

    (response,) = Valuator(model, progress=False).label_states([sample])
    assert list(response.sample.input_ids) == list(processed["input_ids"][0])
    assert image_ids & set(response.sample.input_ids)
    labels = [response.sample.input_ids[k] for k in response.positions]
    assert tokenizer.convert_ids_to_tokens(labels) == ["the", "cat", "sat", "on", "the", "mat", "<|im_end|>"]

    (every,) = Valuator(model, loss_on="all", progress=False).label_states([sample])
    labels = [every.sample.input_ids[k] for k in every.positions]
    assert not image_ids & set(labels)
    # Every text token of the render but the first, and nothing the processor inserted.
    text = [t for t in tokenizer(rendered, add_special_tokens=False)["input_ids"] if t not in image_ids]
    assert labels == text[1:]


def test_image_sources_give_the_same_values(tmp_path, family):
    _, model, _ = family
    picture = image(8)
    data = png_bytes(picture)
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "cat.png").write_bytes(data)
    line = json.dumps(image_sample("file", "pictures/cat.png"))
    (tmp_path / "samples.jsonl").write_text(line + "\n")
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    samples = [image_sample(str(k), source) for k, source in enumerate(
        (picture, data, uri, str(tmp_path / "pictures" / "cat.png")))]
    v = Valuator(model, progress=False)
    values = v.self_value(samples)
    np.testing.assert_allclose(values, values[0], rtol=1e-12)
    # A relative path starts at the JSONL file's folder, wherever the job runs.
    np.testing.assert_allclose(v.self_value(read_jsonl(tmp_path / "samples.jsonl")), values[:1], rtol=1e-12)


@pytest.fixture(scope="module")
def llava():
    vlm = tiny_vlm("llava")
    return vlm, load_model(vlm.model, processor=vlm.processor, dtype=torch.float64)


def bad_samples(tmp_path):
    def with_image(sample_id, source, **part):
        part = {"type": "image", **({"image": source} if source is not None else {}), **part}
        return {"id": sample_id, "messages": [
            {"role": "user", "content": [part, {"type": "text", "text": "what is the cat ?"}]},
            {"role": "assistant", "content": "it is a cat"}]}

    truncated = png_bytes(image(9, (28, 28)))[:-30]
    return [
        (with_image("missing", "no-such.png"),
         "image 1 (messages[0].content[0], 'no-such.png'): no such image file"),
        (with_image("folder", str(tmp_path)), "cannot read image file"),
        (with_image("garbage", b"not an image at all"), "not a readable image"),
        (with_image("truncated", truncated), "the image is corrupt"),
        (with_image("url", "https://example.com/cat.png"), "URLs are refused"),
        (with_image("url-part", None, url="https://example.com/cat.png"), "URLs are refused"),
        (with_image("bad-base64", "data:image/png;base64,@@@"), "not valid base64"),
        (with_image("not-image-uri", "data:text/plain;base64,aGVsbG8="), "holds text/plain, not an image"),
        (with_image("huge", image(10, (60, 60))), "60x60 pixels, more than the limit of 3136"),
        (with_image("heavy", png_bytes(image(11))), "more than the limit of 8000"),
        (with_image("number", 12345), "an image is a path, bytes, a PIL image or a data URI"),
        (image_sample("extra-placeholder", image(12), question=f"look {PLACEHOLDER['llava']} ?"),
         "the sample has 1 image(s) but its render holds 2 image placeholder(s)"),
        ({"id": "long", "messages": [{"role": "user", "content": [
            {"type": "image", "image": image(13)}, {"type": "text", "text": "the cat " * 40}]},
            {"role": "assistant", "content": "it is"}]}, "never split into chunks"),
    ]


def test_bad_images_are_per_sample_errors(tmp_path, llava):
    vlm, _ = llava
    limits = ImageLimits(max_pixels=56 * 56, max_bytes=8000)
    model = load_model(vlm.model, processor=vlm.processor, dtype=torch.float64, image_limits=limits)
    v = Valuator(model, batch_tokens=64, progress=False)
    cases = bad_samples(tmp_path)
    good = image_sample("good", image(14))
    values, errors = v.self_value([good] + [sample for sample, _ in cases], errors="collect")
    assert np.isfinite(values[0]) and np.isnan(values[1:]).all()
    assert [e.sample_id for e in errors] == [sample["id"] for sample, _ in cases]
    for error, (sample, fragment) in zip(errors, cases, strict=True):
        assert fragment in str(error), (sample["id"], str(error))
        assert str(error).startswith(f"sample {sample['id']!r} (index ")
    with pytest.raises(SampleError, match=r"'missing'.*no such image"):
        v.self_value([good, cases[0][0]])


def test_text_only_model_refuses_images(tiny_tokenizer):
    v = Valuator(load_model(tiny_model("tied"), tokenizer=tiny_tokenizer), progress=False)
    with pytest.raises(SampleError, match=r"'a'.*this model is text-only"):
        v.self_value([image_sample("a", image(1))])


def test_model_refusals(llava):
    vlm, model = llava
    with pytest.raises(ModelError, match="pass its processor"):
        load_model(tiny_vlm("llava").model)
    with pytest.raises(ModelError, match="text-only model; processor= is for image-text models"):
        load_model(tiny_model("tied"), processor=vlm.processor)
    with pytest.raises(PackingUnsupported, match="image-text models run in buckets"):
        Valuator(model, attention="varlen", progress=False).self_value([image_sample("a", image(1))])


def test_local_folder_and_processor_identity(tmp_path, llava):
    vlm, model = llava
    vlm.model.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float64")
    assert loaded.vision is not None
    assert loaded.identity["processor_hash"] == model.identity["processor_hash"]
    samples = [image_sample("a", image(1)), image_sample("b", image(2))]
    np.testing.assert_allclose(Valuator(loaded, progress=False).self_value(samples),
                               Valuator(model, progress=False).self_value(samples), rtol=1e-12)

    reference = Valuator(model, progress=False).reference(samples)
    other = tiny_processor("llava")
    other.image_processor.image_mean = [0.5, 0.5, 0.5]
    changed = Valuator(load_model(vlm.model, processor=other, dtype=torch.float64), progress=False)
    with pytest.raises(ReferenceMismatch, match="processor_hash"):
        changed.score(samples, reference)


def test_grpc_carries_images_as_bytes(tmp_path, llava):
    _, model = llava
    picture = tmp_path / "cat.png"
    picture.write_bytes(png_bytes(image(20)))
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(image(21))).decode()
    train = [image_sample("bytes", png_bytes(image(22))), image_sample("path", str(picture)),
             image_sample("uri", uri), {"id": "text", "prompt": "hello", "response": "good bye"}]
    valid = [image_sample("v", png_bytes(image(23)))]
    v = Valuator(model, progress=False)
    expected = v.score(train, v.reference(valid))
    server = ServerThread(None, load=False)
    try:
        server.call(server.server.load(model, {"valid": valid}))
        with Client(server.address) as client:
            results = {r.id: r for r in client.score_stream(train, reference="valid")}
    finally:
        server.close()
    assert [results[s["id"]].error for s in train] == ["", "", "", ""]
    np.testing.assert_allclose([results[s["id"]].value for s in train], expected, rtol=1e-12)

    # The server opens no path for a client, and an image part must hold an image.
    with pytest.raises(BadSample, match="not a path"):
        sample_of(pb.ScoreRequest(id="r", json=json.dumps(image_sample("p", "cat.png"))))
    part = pb.ContentPart(image=pb.Image(data=b"hello", mime_type="text/plain"))
    message = pb.ChatMessage(role="user", parts=[part])
    with pytest.raises(BadSample, match="holds 'text/plain', not an image"):
        sample_of(pb.ScoreRequest(id="r", fields=pb.Sample(messages=[message])))


def test_cli_scores_image_samples_with_relative_paths(tmp_path, llava, monkeypatch):
    vlm, model = llava
    vlm.model.save_pretrained(tmp_path / "model")
    vlm.processor.save_pretrained(tmp_path / "model")
    (tmp_path / "data" / "pictures").mkdir(parents=True)
    for k in range(3):
        image(30 + k).save(tmp_path / "data" / "pictures" / f"{k}.png")
    train = [image_sample(f"t{k}", f"pictures/{k}.png") for k in range(2)]
    valid = [image_sample("v", "pictures/2.png")]
    for name, rows in (("train", train), ("valid", valid)):
        (tmp_path / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)  # not the samples' folder: paths start at each file's folder
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(tmp_path / "model"), "--dtype", "float64", "--train",
                 "data/train.jsonl", "--valid", "data/valid.jsonl", "--out", str(out)]) == 0
    values = [json.loads(line)["value"] for line in out.read_text().splitlines()]
    v = Valuator(model, progress=False)
    expected = v.score(read_jsonl(tmp_path / "data" / "train.jsonl"),
                       v.reference(read_jsonl(tmp_path / "data" / "valid.jsonl")))
    np.testing.assert_allclose(values, expected, rtol=1e-12)

    # forvalue stream: the client reads the images, from the same folder.
    server = ServerThread(None, load=False)
    try:
        # The server is given no folder: its reference samples name their images in full.
        in_full = [resolve_image_paths(s, tmp_path / "data") for s in valid]
        server.call(server.server.load(model, {"valid": in_full}))
        summary = stream_file(server.address, "valid", "data/train.jsonl", tmp_path / "streamed.jsonl",
                              progress=False)
    finally:
        server.close()
    assert summary["errors"] == 0
    streamed = [json.loads(line)["value"] for line in (tmp_path / "streamed.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(streamed, expected, rtol=1e-12)


def test_max_length_cuts_after_the_last_image_only(llava):
    _, model = llava
    sample = image_sample("a", image(40), question="the cat " * 5, answer="it is a cat")
    (whole,) = Valuator(model, progress=False).label_states([sample])
    ids = whole.sample.input_ids
    last_image = max(k for k, token in enumerate(ids) if token in model.vision.image_token_ids)
    cut = Valuator(model, max_length=len(whole.sample.input_ids) - 2, loss_on="all", progress=False)
    (kept,) = cut.label_states([sample])
    assert kept.sample.truncated and kept.sample.input_ids == whole.sample.input_ids[:-2]
    with pytest.raises(SampleError, match="would cut an image"):
        Valuator(model, max_length=last_image, progress=False).label_states([sample])
