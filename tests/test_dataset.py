"""LLaVA-JSON datasets on real ShapesWorld samples: labels, media, bad samples, samplers."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from videollava.constants import IGNORE_INDEX, IMAGE_SLOT, VIDEO_SLOT
from videollava.data.datasets import (
    BadSample,
    CaptionDataset,
    CaptionSample,
    ConversationDataset,
    Sample,
    Skipped,
    collate_captions,
    collate_conversations,
    supervised_tokens,
)
from videollava.data.media import read_video_frames
from videollava.data.records import read_records
from videollava.data.regions import Region, parse_regions
from videollava.data.sample_media import MediaCache, MediaSpec
from videollava.data.samplers import (
    StepBatches,
    global_batches,
    grouped_batches,
    micro_batches,
    mixed_batches,
    shard,
)
from videollava.data.transforms import ImageTransformConfig, box_to_pixels
from videollava.train.bad_samples import BadSampleLog

FRAMES = 2
SIZE = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from videollava.shapesworld.generate import GenerationConfig, generate

    root = tmp_path_factory.mktemp("shapesworld")
    generate(root, GenerationConfig(seed=3, images=6, videos=4, test_images=2, test_videos=2))
    return root


def spec(root: Path) -> MediaSpec:
    return MediaSpec(
        root=root / "media",
        transform=ImageTransformConfig(size=SIZE, crop_size=SIZE),
        num_frames=FRAMES,
        image_rows=4,
        frame_rows=5,
    )


def dataset(root: Path, tokenizer, entries=None, template="vicuna_v1", max_length=512) -> ConversationDataset:
    if entries is None:
        records = read_records([root / "instruct.json"])
    else:
        path = root / "custom.json"
        path.write_text(json.dumps(entries))
        records = read_records([path])
    return ConversationDataset(records, spec(root), tokenizer, template, max_length)


def supervised_text(tokenizer, sample: Sample) -> str:
    return tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])


def test_labels_supervise_only_answers_and_eos(world, tiny_tokenizer):
    data = dataset(world, tiny_tokenizer)
    entries = json.loads((world / "instruct.json").read_text())
    for index in range(len(data)):
        sample = data.load(index)
        answers = [turn["value"] for turn in entries[index]["conversations"][1::2]]
        # Every answer is supervised, followed by its </s>; nothing else is.
        assert supervised_text(tiny_tokenizer, sample).replace(" ", "") == "".join(
            a + "</s>" for a in answers
        ).replace(" ", "")
        assert len(sample.labels) == len(sample.input_ids)
        for token, label in zip(sample.input_ids, sample.labels, strict=True):
            assert label in (IGNORE_INDEX, token)
        assert sample.input_ids[0] == tiny_tokenizer.bos_token_id and sample.labels[0] == IGNORE_INDEX
        slots = [t for t in sample.input_ids if t in (IMAGE_SLOT, VIDEO_SLOT)]
        if "image" in entries[index]:
            assert slots == [IMAGE_SLOT] and sample.images[0].shape == (3, SIZE, SIZE) and not sample.videos
        else:
            assert (
                slots == [VIDEO_SLOT]
                and sample.videos[0].shape == (FRAMES, 3, SIZE, SIZE)
                and not sample.images
            )
        # The question (and the system prompt) is context, not target.
        question = (
            entries[index]["conversations"][0]["value"].replace("<image>\n", "").replace("<video>\n", "")
        )
        assert question.split()[-1] not in supervised_text(tiny_tokenizer, sample).split()


def test_plain_template_supervises_the_caption(world, tiny_tokenizer):
    records = read_records([world / "captions.json"])
    data = ConversationDataset(records, spec(world), tiny_tokenizer, "plain", 512)
    sample = data.load(0)
    caption = records[0].raw["conversations"][1]["value"]
    assert supervised_text(tiny_tokenizer, sample) == caption + "\n"
    # plain: BOS, the slot, then the caption: no question, no roles.
    assert sample.input_ids[1] in (IMAGE_SLOT, VIDEO_SLOT)


def test_modality_and_length_come_from_json_alone(world, tiny_tokenizer, tmp_path):
    records = read_records([world / "instruct.json"])
    empty = MediaSpec(tmp_path, ImageTransformConfig(size=SIZE, crop_size=SIZE), FRAMES, 4, 5)
    data = ConversationDataset(records, empty, tiny_tokenizer, "vicuna_v1", 512)  # no media there at all
    expected = ["image" if "image" in r.raw else "video" for r in records]
    assert data.modalities == expected
    for length, record in zip(data.lengths, records, strict=True):
        visual = 4 if record.modality == "image" else FRAMES * 5
        assert length == record.text_words + visual
    # Decoding happens only when a sample is loaded: here it fails, naming the sample.
    item = data[0]
    assert isinstance(item, Skipped) and item.id == records[0].id and "file not found" in item.reason


def test_multi_media_and_text_only_samples(world, tiny_tokenizer):
    entries = json.loads((world / "instruct.json").read_text())
    image = next(e["image"] for e in entries if "image" in e)
    video = next(e["video"] for e in entries if "video" in e)
    data = dataset(
        world,
        tiny_tokenizer,
        [
            {
                "id": "two",
                "images": [image, image],
                "video": video,
                "conversations": [
                    {"from": "human", "value": "<video>\n<image> and <image>: same?"},
                    {"from": "gpt", "value": "yes"},
                ],
            },
            {
                "id": "text",
                "conversations": [
                    {"from": "human", "value": "Name a colour."},
                    {"from": "gpt", "value": "red"},
                ],
            },
        ],
    )
    assert data.modalities == ["mixed", "text"]
    batch = collate_conversations([data[0], data[1]])
    assert batch["ids"] == ["two", "text"] and batch["images"].shape == (2, 3, SIZE, SIZE)
    assert batch["videos"].shape == (1, FRAMES, 3, SIZE, SIZE)
    assert batch["input_ids"][0].count(IMAGE_SLOT) == 2 and batch["input_ids"][0].count(VIDEO_SLOT) == 1
    assert not any(t < 0 for t in batch["input_ids"][1])
    assert supervised_tokens(batch["labels"]) == sum(
        1 for row in batch["labels"] for label in row if label != IGNORE_INDEX
    )


@pytest.fixture()
def broken_world(world, tmp_path) -> Path:
    """A copy of the data with a corrupt mp4 and a truncated png."""
    root = tmp_path / "world"
    shutil.copytree(world, root)
    videos = sorted((root / "media" / "videos").glob("train_*"))
    videos[0].write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 200)  # an mp4 header, then garbage
    return root


def bad_entries(world: Path) -> list[dict]:
    entries = json.loads((world / "instruct.json").read_text())
    first_video = sorted(p.name for p in (world / "media" / "videos").glob("train_*"))[0]
    good = entries[0]
    convo = good["conversations"]
    return [
        good,
        {**good, "id": "missing", "image" if "image" in good else "video": "images/nope.png"},
        {
            "id": "corrupt",
            "video": f"videos/{first_video}",
            "conversations": [
                {"from": "human", "value": "<video>\nWhat moves?"},
                {"from": "gpt", "value": "a square"},
            ],
        },
        {**good, "id": "gpt-first", "conversations": [convo[1], convo[0]]},
        {
            **good,
            "id": "no-placeholder",
            "conversations": [
                {"from": "human", "value": "What is this?"},
                {"from": "gpt", "value": "a square"},
            ],
        },
        {
            **good,
            "id": "long",
            "conversations": [
                {"from": "human", "value": convo[0]["value"] + " why" * 600},
                {"from": "gpt", "value": "ok"},
            ],
        },
        "not an object",
    ]


def test_bad_samples_are_reported_by_id_and_reason(broken_world, tiny_tokenizer):
    data = dataset(broken_world, tiny_tokenizer, bad_entries(broken_world), max_length=256)
    items = [data[i] for i in range(len(data))]
    assert isinstance(items[0], Sample)
    reasons = {item.id: item.reason for item in items[1:]}
    assert all(isinstance(item, Skipped) for item in items[1:])
    assert "file not found" in reasons["missing"]
    assert "corrupt" in reasons["corrupt"] or "cannot be parsed" in reasons["corrupt"]
    assert "malformed conversation" in reasons["gpt-first"]
    assert "placeholder mismatch" in reasons["no-placeholder"]
    assert "too long" in reasons["long"] and "256" in reasons["long"]
    assert "not a JSON object" in reasons["custom.json#6"]
    batch = collate_conversations(items)
    assert batch["num_samples"] == 1 and len(batch["skipped"]) == 6  # nothing substituted


def test_bad_sample_policy_skip_logs_and_counts(broken_world, tiny_tokenizer, tmp_path, capsys):
    data = dataset(broken_world, tiny_tokenizer, bad_entries(broken_world), max_length=256)
    log = BadSampleLog(tmp_path / "bad_samples.jsonl", policy="skip", stage="finetune")
    # Through a DataLoader worker process: the bad samples cross the process boundary as records.
    loader = DataLoader(data, batch_size=4, collate_fn=collate_conversations, num_workers=1)
    good = 0
    for step, batch in enumerate(loader, 1):
        log.record(batch["skipped"], step)
        good += batch["num_samples"]
    assert good == 1 and log.count == 6
    lines = [json.loads(line) for line in (tmp_path / "bad_samples.jsonl").read_text().splitlines()]
    assert {line["id"] for line in lines} == {
        "missing",
        "corrupt",
        "gpt-first",
        "no-placeholder",
        "long",
        "custom.json#6",
    }
    assert all(line["reason"] and line["stage"] == "finetune" for line in lines)
    err = capsys.readouterr().err
    assert "bad sample missing (skipped)" in err and "file not found" in err


def test_bad_sample_policy_fail_names_the_sample(broken_world, tiny_tokenizer, tmp_path):
    data = dataset(broken_world, tiny_tokenizer, bad_entries(broken_world), max_length=256)
    log = BadSampleLog(tmp_path / "bad.jsonl", policy="fail", echo=False)
    batch = collate_conversations([data[0], data[1]])
    with pytest.raises(BadSample, match="sample missing: bad media.*file not found.*bad_samples: fail"):
        log.record(batch["skipped"], 1)
    assert log.count == 1 and "missing" in (tmp_path / "bad.jsonl").read_text()


def test_caption_dataset_pairs_media_with_the_gpt_turn(world):
    records = read_records([world / "captions.json"])
    images = CaptionDataset(records, spec(world), "image")
    videos = CaptionDataset(records, spec(world), "video")
    assert len(images) + len(videos) == len(records)
    sample = images.load(0)
    assert sample.pixels.shape == (3, SIZE, SIZE)
    assert sample.caption == images.records[0].raw["conversations"][1]["value"]
    assert videos.load(0).pixels.shape == (FRAMES, 3, SIZE, SIZE)


def test_caption_dataset_maps_regions_into_the_crop(world, tmp_path):
    from PIL import Image

    records = read_records([world / "captions.json"])
    cache = MediaCache()
    cached = MediaSpec(**{**spec(world).__dict__, "cache": cache})
    for modality in ("image", "video"):
        data = CaptionDataset(records, cached, modality, regions=True)
        raw = data.records[0].raw
        path = world / "media" / raw[modality]
        times: list[float] = []
        if modality == "image":
            width, height = Image.open(path).size
        else:
            frames = read_video_frames(path, num_frames=1)
            width, height = frames.shape[2], frames.shape[1]
            with av.open(str(path)) as container:  # the sampled frames' places in the clip
                n = sum(1 for _ in container.decode(video=0))
            times = [int(i) / (n - 1) for i in np.linspace(0, n - 1, FRAMES)]
        # crop mode: objects the centre crop cuts away have no region
        video = modality == "video"

        def crop(box, size=(width, height), video=video):
            return box_to_pixels(box, *size, cached.transform, video=video)

        def along_track(track, t):  # the keyframes of a straight path at constant speed
            (t0, b0), (t1, b1) = ((k["t"], k["box"]) for k in track)
            return [a + (b - a) * (t - t0) / (t1 - t0) for a, b in zip(b0, b1, strict=True)]

        expected = []
        for r in raw["regions"]:
            frame_boxes = tuple(crop(along_track(r["track"], t)) for t in times) if "track" in r else ()
            if crop(r["box"]) is not None and (not frame_boxes or any(frame_boxes)):
                motion = r.get("motion", "")
                # a standard-world object does one thing for the whole clip: its motion in every frame
                frame_motions = tuple(motion for _ in times) if motion else ()
                expected.append(
                    Region(
                        crop(r["box"]),
                        r["text"],
                        frame_boxes=frame_boxes,
                        motion=motion,
                        frame_motions=frame_motions,
                    )
                )
        if video:  # the mover is tracked: a box per sampled frame
            assert any(len(r.frame_boxes) == FRAMES for r in expected)
        sample = data.load(0)
        assert sample.regions == expected and len(expected) >= 1
        # pixels from the cache (another dataset decoded them): the regions come out the same
        again = CaptionDataset(records, cached, modality, regions=True)
        assert again.load(0).regions == expected
        assert CaptionDataset(records, cached, modality).load(0).regions == []
        assert set(data.region_texts()) == {r["text"] for rec in data.records for r in rec.raw["regions"]}
        motions = {r["motion"] for rec in data.records for r in rec.raw["regions"] if "motion" in r}
        assert set(data.region_motions()) == motions and bool(motions) == video
    assert collate_captions([data.load(0), data.load(1)])["regions"][1] == data.load(1).regions


@pytest.mark.parametrize(
    ("regions", "problem"),
    [
        ("a box", "must be a list"),
        ([{"box": [0, 0, 4, 4]}], "'box' and 'text'"),
        ([{"box": [0, 0, 4], "text": "red circle"}], "four numbers"),
        ([{"box": [5, 0, 4, 4], "text": "red circle"}], "is empty"),
        ([{"box": [0, 0, 4, 4], "text": " "}], "non-empty string"),
        ([{"box": [0, 0, 4, 4], "text": "red circle", "track": []}], "non-empty list"),
        ([{"box": [0, 0, 4, 4], "text": "red circle", "track": [{"t": 0}]}], "'t' and 'box'"),
        (
            [{"box": [0, 0, 4, 4], "text": "red circle", "track": [{"t": 2, "box": [0, 0, 4, 4]}]}],
            "in [0, 1]",
        ),
        (
            [{"box": [0, 0, 9, 4], "text": "red circle", "track": [{"t": 0.5, "box": [0, 0, 4, 4]}] * 2}],
            "must increase",
        ),
        (
            [{"box": [0, 0, 9, 4], "text": "red circle", "track": [{"t": 0, "box": [4, 0, 4, 4]}]}],
            "keyframe 0",
        ),
        ([{"box": [0, 0, 4, 4], "text": "red circle", "motion": ""}], "'motion' must be a non-empty string"),
        ([{"box": [0, 0, 4, 4], "text": "red circle", "motion": 3}], "'motion' must be a non-empty string"),
        (
            [
                {
                    "box": [0, 0, 4, 4],
                    "text": "red circle",
                    "track": [{"t": 0, "box": [0, 0, 4, 4], "motion": ""}],
                }
            ],
            "keyframe 0: 'motion' must be a non-empty string",
        ),
    ],
)
def test_malformed_regions_are_bad_samples(world, tmp_path, regions, problem):
    entry = json.loads((world / "captions.json").read_text())[0]
    entry = {**entry, "regions": regions}
    path = tmp_path / "custom.json"
    path.write_text(json.dumps([entry]))
    data = CaptionDataset(
        read_records([path]), spec(world), "image" if "image" in entry else "video", regions=True
    )
    item = data[0]
    assert isinstance(item, Skipped) and "malformed regions" in item.reason and problem in item.reason
    assert data.region_texts() == [] and data.region_motions() == []


def test_region_box_at_follows_the_track_between_keyframes():
    (region,) = parse_regions(
        [
            {
                "box": [0, 0, 30, 10],
                "text": "red circle moving right",
                "track": [{"t": 0.2, "box": [0, 0, 10, 10]}, {"t": 0.6, "box": [20, 0, 30, 10]}],
            }
        ]
    )
    assert region.box_at(0.0) == region.box_at(0.2) == (0.0, 0.0, 10.0, 10.0)  # held before the first
    assert region.box_at(0.4) == pytest.approx((10.0, 0.0, 20.0, 10.0))
    assert region.box_at(1.0) == (20.0, 0.0, 30.0, 10.0)  # and after the last
    (still,) = parse_regions([{"box": [1, 2, 3, 4], "text": "blue square standing still"}])
    assert still.box_at(0.7) == still.box == (1.0, 2.0, 3.0, 4.0)


def test_region_motion_at_reads_the_keyframe_that_holds_the_time():
    track = [
        {"t": 0.0, "box": [0, 0, 10, 10], "motion": "standing still"},
        {"t": 0.3, "box": [0, 0, 10, 10], "motion": "moving right"},
        {"t": 0.6, "box": [20, 0, 30, 10], "motion": "standing still"},
        {"t": 1.0, "box": [20, 0, 30, 10]},
    ]
    entry = {
        "box": [0, 0, 30, 10],
        "text": "red circle moving right",
        "motion": "moving right",
        "track": track,
    }
    (region,) = parse_regions([entry])
    assert region.track_motions == ("standing still", "moving right", "standing still", "")
    # at 1.0 the last keyframe names nothing: the whole clip's motion
    expected = ["standing still"] * 2 + ["moving right"] * 2 + ["standing still", "moving right"]
    assert [region.motion_at(t) for t in (0.0, 0.29, 0.3, 0.59, 0.6, 1.0)] == expected
    # keyframes that name nothing: the whole clip's motion throughout
    (plain,) = parse_regions(
        [{**entry, "track": [{k: v for k, v in key.items() if k != "motion"} for key in track]}]
    )
    assert plain.track_motions == () and {plain.motion_at(t) for t in (0.0, 0.5, 1.0)} == {"moving right"}


# ---------------------------------------------------------------------------------------- samplers


def test_mixed_sampler_is_a_deterministic_shuffle():
    batches = mixed_batches(50, 8, seed=1, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(50)) and [len(b) for b in batches] == [8] * 6 + [2]
    assert batches == mixed_batches(50, 8, seed=1, epoch=0)
    assert batches != mixed_batches(50, 8, seed=1, epoch=1)
    assert batches != mixed_batches(50, 8, seed=2, epoch=0)


def test_mixed_sampler_keeps_each_group_in_one_batch():
    groups = [f"g{i // 2}" if i < 40 else None for i in range(50)] + ["big"] * 11
    batches = mixed_batches(len(groups), 8, seed=3, epoch=0, groups=groups)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(groups))) and max(len(b) for b in batches) <= 8
    where = {i: k for k, b in enumerate(batches) for i in b}
    for pair in range(20):
        assert where[2 * pair] == where[2 * pair + 1]
    big = [i for i, g in enumerate(groups) if g == "big"]
    assert len({where[i] for i in big}) == 2  # larger than a batch: cut once, not scattered
    assert batches == mixed_batches(len(groups), 8, seed=3, epoch=0, groups=groups)
    assert batches != mixed_batches(len(groups), 8, seed=3, epoch=1, groups=groups)
    assert mixed_batches(50, 8, 1, 0, groups=[None] * 50) == mixed_batches(50, 8, 1, 0)


def test_media_cache_decodes_each_file_once(world, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(world, root)
    cache = MediaCache()
    cached = MediaSpec(**{**spec(root).__dict__, "cache": cache})
    records = read_records([root / "captions.json"])
    images = CaptionDataset(records, cached, "image")
    videos = CaptionDataset(records, cached, "video")
    first_image, first_video = images.load(0).pixels, videos.load(0).pixels
    assert len(cache) == 2
    for rel in (images.records[0].images[0], videos.records[0].videos[0]):
        (root / "media" / rel).write_bytes(b"gone")  # a second read would now fail
    assert images.load(0).pixels is first_image and videos.load(0).pixels is first_video
    assert isinstance(images[1], CaptionSample) and len(cache) == 3
    (root / "media" / images.records[2].images[0]).write_bytes(b"broken")
    assert isinstance(images[2], Skipped) and isinstance(images[2], Skipped) and len(cache) == 3


def test_media_cache_keeps_only_what_the_next_stage_reads(world):
    cache = MediaCache()
    cached = MediaSpec(**{**spec(world).__dict__, "cache": cache})
    records = read_records([world / "captions.json"])
    image = CaptionDataset(records, cached, "image").load(0).pixels
    CaptionDataset(records, cached, "video").load(0)
    assert len(cache) == 2
    cache.keep_only(cached.transform, FRAMES)  # the same reading: nothing goes
    assert len(cache) == 2
    cache.keep_only(cached.transform, FRAMES + 4)  # videos at another frame count go, images stay
    assert len(cache) == 1
    assert CaptionDataset(records, cached, "image").load(0).pixels is image
    other = dataclasses.replace(cached.transform, size=cached.transform.size + 16)
    cache.keep_only(other, FRAMES)  # another transform: the images go too
    assert len(cache) == 0


def grouped_fixture():
    modalities = ["image"] * 37 + ["video"] * 21 + ["text"] * 10
    lengths = [(i * 37) % 101 for i in range(len(modalities))]
    return lengths, modalities


def test_grouped_sampler_groups_by_modality_and_length():
    lengths, modalities = grouped_fixture()
    batches = grouped_batches(lengths, modalities, 8, seed=0, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    full = [b for b in batches if len(b) == 8]
    # Full batches hold one modality each (37 // 8 + 21 // 8 + 10 // 8 = 7 of them) and are sorted by length.
    assert len([b for b in full if len({modalities[i] for i in b}) == 1]) >= 7
    for batch in batches[:7]:
        assert len({modalities[i] for i in batch}) == 1
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    # The leftovers of every modality come last; order of the full batches is shuffled per epoch.
    assert batches == grouped_batches(lengths, modalities, 8, seed=0, epoch=0)
    assert batches != grouped_batches(lengths, modalities, 8, seed=0, epoch=1)
    kinds = [modalities[b[0]] for b in batches[:7]]
    assert Counter(kinds) == {"image": 4, "video": 2, "text": 1}


def test_mixed_batches_mix_modalities():
    lengths, modalities = grouped_fixture()
    batches = global_batches("mixed", lengths, modalities, 16, seed=0, epoch=0)
    assert sum(len({modalities[i] for i in b}) > 1 for b in batches) >= len(batches) - 1


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_together_see_exactly_the_global_batch(world_size):
    lengths, modalities = grouped_fixture()
    micro, global_batch = 2, 12
    accumulation = -(-global_batch // (micro * world_size))
    samplers = [
        StepBatches(
            "grouped",
            lengths,
            modalities,
            global_batch,
            micro,
            accumulation,
            seed=5,
            rank=r,
            world_size=world_size,
        )
        for r in range(world_size)
    ]
    reference = samplers[0].batches
    streams = [list(s) for s in samplers]
    for step, batch in enumerate(reference):
        union = []
        for stream in streams:
            union += [i for mb in stream[step * accumulation : (step + 1) * accumulation] for i in mb]
        assert sorted(union) == sorted(batch)
    # Every rank steps the same number of times (trailing micro-batches may be empty).
    assert len({len(stream) for stream in streams}) == 1


def test_resuming_a_sampler_skips_consumed_batches():
    lengths, modalities = grouped_fixture()
    full = list(StepBatches("mixed", lengths, modalities, 8, 4, 2, seed=1, epoch=2))
    resumed = list(StepBatches("mixed", lengths, modalities, 8, 4, 2, seed=1, epoch=2, start=3))
    assert resumed == full[3 * 2 :]


def test_shard_and_micro_batches():
    assert [shard(list(range(7)), r, 3) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert micro_batches([1, 2, 3], 2, 3) == [[1, 2], [3], []]
    with pytest.raises(ValueError):
        micro_batches([1, 2, 3], 1, 2)


def test_sorting_micro_batches_by_length_keeps_the_step_content():
    lengths, modalities = grouped_fixture()
    plain = StepBatches("mixed", lengths, modalities, 16, 4, 4, seed=0)
    ordered = StepBatches("mixed", lengths, modalities, 16, 4, 4, seed=0, sort_by_length=True)
    a, b = list(plain), list(ordered)
    for step in range(len(plain.batches)):
        assert sorted(i for mb in a[step * 4 : step * 4 + 4] for i in mb) == sorted(
            i for mb in b[step * 4 : step * 4 + 4] for i in mb
        )
    first = [i for mb in b[:4] for i in mb]
    assert [lengths[i] for i in first] == sorted((lengths[i] for i in first), reverse=True)


def test_collation_keeps_slot_order(world, tiny_tokenizer):
    data = dataset(world, tiny_tokenizer)
    samples = [data.load(i) for i in range(len(data))]
    batch = collate_conversations(samples)
    images = [img for s in samples for img in s.images]
    assert torch.equal(batch["images"], torch.stack(images))
    assert batch["videos"].shape[0] == sum(len(s.videos) for s in samples)
