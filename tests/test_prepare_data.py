"""tools/prepare_data.py: LLaVA / chat-messages input -> validated shards that energon and megavl load."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from conftest import tiny_tokenizer
from megavl.datasets import prepare as prepare_module
from megavl.datasets.prepare import MARKER, PrepareError, prepare

ROOT = Path(__file__).resolve().parent.parent
ARABIC_QUESTION = "<image>\nما لون المربع في الصورة؟"
ARABIC_ANSWER = "المربع أحمر."


# ---------------------------------------------------------------- fixtures


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))


def png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    (root / "red.png").write_bytes(encode(Image.new("RGB", (56, 56), (220, 40, 40)), "PNG"))
    (root / "sub" / "photo.jpg").write_bytes(encode(noise((64, 48), 1), "JPEG", quality=90))
    (root / "plain.bmp").write_bytes(encode(noise((40, 30), 2), "BMP"))
    (root / "square.jpeg").write_bytes(encode(noise((56, 84), 3), "JPEG"))
    (root / "icon.gif").write_bytes(encode(Image.new("P", (32, 32), 5), "GIF"))
    whole = encode(noise((64, 64), 4), "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (root / "not-an-image.png").write_bytes(b"this is text")
    return root


def user(text: str) -> dict:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


LLAVA = [
    {"id": "en-one", "image": "red.png", "conversations": [user("<image>\nWhat colour is it?"), gpt("Red.")]},
    {
        "id": "en-two", "image": ["sub/photo.jpg", "plain.bmp"],
        "conversations": [user("<image> and <image>: which is wider?"), gpt("The first."), user("Sure?"), gpt("Yes.")],
    },
    {
        "id": 7, "image": "square.jpeg",
        "conversations": [
            {"from": "system", "value": "أجب بإيجاز."}, user(ARABIC_QUESTION), gpt(ARABIC_ANSWER),
        ],
    },
    {"id": "missing", "image": "nope/missing.jpg", "conversations": [user("<image>Hi"), gpt("Hello.")]},
    {"id": "truncated", "image": "truncated.jpg", "conversations": [user("<image>Hi"), gpt("Hello.")]},
    {"id": "bomb", "image": "bomb.png", "conversations": [user("<image>Hi"), gpt("Hello.")]},
    {"id": "garbage", "image": "not-an-image.png", "conversations": [user("<image>Hi"), gpt("Hello.")]},
    {"id": "mismatch", "image": "red.png", "conversations": [user("<image><image>Compare."), gpt("Same.")]},
    {"id": "empty", "image": "red.png", "conversations": [user("<image>What?"), gpt("  \n ")]},
    {"id": "en-one", "image": "red.png", "conversations": [user("<image>Again?"), gpt("Red again.")]},
    {"id": "robot", "conversations": [user("Hi"), {"from": "robot", "value": "Beep."}]},
    {"id": "text-only", "conversations": [user("What is 2 + 2?"), gpt("4")]},
    {"id": "no-answer", "image": "red.png", "conversations": [user("<image>Look.")]},
    {"id": "answer-image", "image": "red.png", "conversations": [user("Draw it."), gpt("<image>")]},
    {"id": "surrogate", "conversations": [user("Hi \ud800 there"), gpt("Hello.")]},
    {"id": "invalid-bytes", "conversations": [user("caf@@"), gpt("Hello.")]},
    {"id": "no-conversations", "image": "red.png"},
]
# Where each one ends up: written (under the key), or skipped (reason).
EXPECTED_WRITTEN = {"s000000000": 0, "s000000001": 1, "s000000002": 2, "s000000011": 11}
EXPECTED_REPORT = [
    {"id": "missing", "index": 3, "reason": "missing_image"},
    {"id": "truncated", "index": 4, "reason": "bad_image"},
    {"id": "bomb", "index": 5, "reason": "image_too_large"},
    {"id": "garbage", "index": 6, "reason": "bad_image"},
    {"id": "mismatch", "index": 7, "reason": "placeholder_mismatch"},
    {"id": "empty", "index": 8, "reason": "empty_answer"},
    {"id": "en-one", "index": 9, "reason": "duplicate_id"},
    {"id": "robot", "index": 10, "reason": "bad_record"},
    {"id": "no-answer", "index": 12, "reason": "no_answer"},
    {"id": "answer-image", "index": 13, "reason": "bad_record"},
    {"id": "surrogate", "index": 14, "reason": "bad_text"},
    {"id": "invalid-bytes", "index": 15, "reason": "bad_text"},
    {"id": "no-conversations", "index": 16, "reason": "bad_record"},
]


def write_llava(path: Path, samples: list) -> None:
    # ensure_ascii keeps the lone surrogate as a \ud800 escape, as a real
    # file would carry it; "@@" is then swapped for bytes that are not UTF-8.
    text = json.dumps(samples, ensure_ascii=True, indent=1)
    path.write_bytes(text.encode("ascii").replace(b"caf@@", b"caf\xe9\xff"))


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} over the output's .tar files, checking each is complete."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        data = shard.read_bytes()
        assert data.endswith(b"\0" * 1024), f"{shard.name} lacks its end-of-archive blocks"
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def load_tool():
    spec = importlib.util.spec_from_file_location("prepare_data_tool", ROOT / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llava_output(images, tmp_path_factory):
    work = tmp_path_factory.mktemp("llava")
    write_llava(work / "llava.json", LLAVA)
    out = work / "out"
    argv = ["--format", "llava", "--input", str(work / "llava.json"), "--image-root", str(images),
            "--out", str(out), "--samples-per-shard", "3"]
    code = load_tool().main(argv)
    return out, code


# ---------------------------------------------------------------- llava


def test_llava_report_and_summary_are_exact(llava_output):
    out, code = llava_output
    assert code == 0
    report = [json.loads(line) for line in (out / "report.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [{k: r[k] for k in ("id", "index", "reason")} for r in report] == EXPECTED_REPORT
    assert all(set(r) == {"id", "index", "reason", "detail"} and r["detail"] for r in report)
    details = {r["id"]: r["detail"] for r in report}
    assert "100000x100000" in details["bomb"]
    assert "'robot'" in details["robot"] and "human, gpt, system" in details["robot"]
    assert "2 <image> placeholders but 1 images" in details["mismatch"]
    assert "U+D800" in details["surrogate"] and "U+FFFD" in details["invalid-bytes"]

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary == {
        "format": "llava",
        "split": "train",
        "written": 4,
        "skipped": {
            "bad_text": 2, "bad_record": 3, "duplicate_id": 1, "no_answer": 1, "empty_answer": 1,
            "placeholder_mismatch": 1, "missing_image": 1, "image_too_large": 1, "bad_image": 2,
        },
        "shards": ["train-000000.tar", "train-000001.tar"],
    }
    assert sorted(os.listdir(out)) == sorted(
        [".megavl-prepare", ".nv-meta", "report.jsonl", "summary.json"]
        + ["train-000000.tar", "train-000000.tar.idx", "train-000001.tar", "train-000001.tar.idx"]
    )


def test_llava_shards_hold_exactly_the_good_samples(llava_output, images):
    out, _ = llava_output
    samples = read_shards(out)
    assert sorted(samples) == sorted(EXPECTED_WRITTEN)

    assert json.loads(samples["s000000000"]["json"]) == {
        "id": "en-one",
        "conversations": [
            {"role": "user", "content": "<image>\nWhat colour is it?"}, {"role": "assistant", "content": "Red."},
        ],
    }
    assert samples["s000000000"]["img0.png"] == (images / "red.png").read_bytes()

    two = samples["s000000001"]
    assert set(two) == {"json", "img0.jpg", "img1.png"}
    assert two["img0.jpg"] == (images / "sub" / "photo.jpg").read_bytes()
    # BMP is not kept as it is: re-encoded to PNG, pixels unchanged.
    assert Image.open(io.BytesIO(two["img1.png"])).format == "PNG"
    assert Image.open(io.BytesIO(two["img1.png"])).tobytes() == Image.open(images / "plain.bmp").tobytes()
    assert [t["role"] for t in json.loads(two["json"])["conversations"]] == ["user", "assistant"] * 2

    arabic = samples["s000000002"]
    # The Arabic text is stored as UTF-8, not as \u escapes, and comes back exactly.
    assert ARABIC_ANSWER.encode("utf-8") in arabic["json"]
    assert json.loads(arabic["json"]) == {
        "id": 7,
        "conversations": [
            {"role": "system", "content": "أجب بإيجاز."},
            {"role": "user", "content": ARABIC_QUESTION},
            {"role": "assistant", "content": ARABIC_ANSWER},
        ],
    }
    assert arabic["img0.jpg"] == (images / "square.jpeg").read_bytes()
    assert set(samples["s000000011"]) == {"json"}


def test_output_loads_with_energon(llava_output):
    from megatron.energon import Cooker, DefaultTaskEncoder, WorkerConfig, get_loader, get_train_dataset, stateless

    out, _ = llava_output
    assert (out / ".nv-meta" / "dataset.yaml").read_text() == (
        "__module__: megatron.energon\n__class__: CrudeWebdataset\n"
    )

    @stateless
    def cook(crude: dict) -> dict:
        return crude

    class RawEncoder(DefaultTaskEncoder):
        decoder = None  # members arrive as the bytes in the tar
        cookers = [Cooker(cook)]

    dataset = get_train_dataset(
        str(out), split_part="train", worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
        batch_size=None, shuffle_buffer_size=None, max_samples_per_sequence=None,
        task_encoder=RawEncoder(), repeat=False,
    )
    loaded = {sample["__key__"]: sample for sample in get_loader(dataset)}
    assert sorted(loaded) == sorted(EXPECTED_WRITTEN)
    on_disk = read_shards(out)
    for key, sample in loaded.items():
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        assert members == on_disk[key]
        assert {"__restore_key__", "__subflavors__", "__sources__"} <= set(sample)


def build_tokenizer():
    return tiny_tokenizer(["system\n", "user\n", "assistant\n", "What colour is it?"], vocab_size=300)


def test_output_loads_with_megavl_stream(llava_output):
    from megavl.config import Config
    from megavl.data.energon_stream import EnergonDataStream

    out, _ = llava_output
    config = Config()
    config.train.seq_length = 512
    config.train.micro_batch_size = 1
    config.data.resolution.max_pixels = 112 * 112
    config.data.image_backend = "pillow"
    config.data.packing_buffer_size = len(EXPECTED_WRITTEN)
    stream = EnergonDataStream(out, build_tokenizer(), config, rank=0, world_size=1, seed=0)
    batch = next(stream)
    assert int(batch["loss_mask"].sum()) > 0
    # The first buffer holds every written sample once, and all of them encode.
    assert sum(stream.stats.read.values()) == len(EXPECTED_WRITTEN)
    assert stream.stats.skipped == {}
    stream.close()


def test_human_summary_is_printed(images, tmp_path, capsys):
    write_llava(tmp_path / "in.json", LLAVA[:6])
    code = load_tool().main(["--format", "llava", "--input", str(tmp_path / "in.json"),
                             "--image-root", str(images), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "wrote 3 samples in 1 shard to" in printed
    assert "skipped 3 samples:" in printed
    for reason in ("missing_image", "bad_image", "image_too_large"):
        assert reason in printed


# ---------------------------------------------------------------- messages


def test_messages_jsonl_with_parts_and_a_non_utf8_line(images, tmp_path):
    def line(obj) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"

    answer = {"role": "assistant", "content": "A red square."}
    lines = [
        line({"id": "parts", "messages": [
            {"role": "user", "content": [
                {"type": "image", "image": "red.png"}, {"type": "text", "text": "What is it?"},
            ]},
            answer,
        ]}),
        line({"id": "listed", "images": ["sub/photo.jpg"], "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nDescribe."}, answer,
        ]}),
        b'{"id": "latin1", "messages": [{"role": "user", "content": "caf\xe9"}, '
        b'{"role": "assistant", "content": "ok"}]}\n',
        b"\n",
        line({"id": "url", "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image_url", "image_url": {"url": "file://" + str(images / "icon.gif")}},
                {"type": "text", "text": " with "},
                {"type": "image_url", "image_url": {"url": "red.png"}},
            ]},
            {"role": "assistant", "content": "مختلفتان."},
        ]}),
        b"{not json\n",
        line({"id": "bot", "messages": [{"role": "bot", "content": "hi"}, answer]}),
        line({"id": "both", "images": ["red.png"], "messages": [
            {"role": "user", "content": [{"type": "image", "image": "red.png"}]}, answer,
        ]}),
        line({"id": "remote", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
            answer,
        ]}),
        line({"id": "parts", "messages": [{"role": "user", "content": "Again"}, answer]}),
        line({"id": "pathless", "images": ["red.png"], "messages": [
            {"role": "user", "content": [{"type": "text", "text": "See: "}, {"type": "image"}]}, answer,
        ]}),
    ]
    (tmp_path / "chat.jsonl").write_bytes(b"".join(lines))
    summary = prepare("messages", str(tmp_path / "chat.jsonl"), str(images), str(tmp_path / "out"))

    report = [json.loads(r) for r in (tmp_path / "out" / "report.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["line"], r["reason"]) for r in report] == [
        ("latin1", 3, "bad_text"),
        (None, 6, "bad_record"),
        ("bot", 7, "bad_record"),
        ("both", 8, "bad_record"),
        ("remote", 9, "bad_record"),
        ("parts", 10, "duplicate_id"),
    ]
    assert "invalid UTF-8 at byte" in report[0]["detail"]
    assert summary["written"] == 4 and summary["shards"] == ["train-000000.tar"]
    assert summary["skipped"] == {"bad_text": 1, "bad_record": 4, "duplicate_id": 1}

    samples = read_shards(tmp_path / "out")
    assert sorted(samples) == ["s000000000", "s000000001", "s000000004", "s000000010"]
    first = json.loads(samples["s000000000"]["json"])
    assert first["conversations"][0] == {"role": "user", "content": "<image>What is it?"}
    assert samples["s000000000"]["img0.png"] == (images / "red.png").read_bytes()
    assert samples["s000000001"]["img0.jpg"] == (images / "sub" / "photo.jpg").read_bytes()
    url = samples["s000000004"]
    assert json.loads(url["json"])["conversations"] == [
        {"role": "user", "content": "Compare <image> with <image>"},
        {"role": "assistant", "content": "مختلفتان."},
    ]
    # GIF is re-encoded to PNG with the same pixels.
    assert Image.open(io.BytesIO(url["img0.png"])).convert("RGB").tobytes() == (
        Image.open(images / "icon.gif").convert("RGB").tobytes()
    )
    assert url["img1.png"] == (images / "red.png").read_bytes()
    pathless = samples["s000000010"]
    assert json.loads(pathless["json"])["conversations"][0]["content"] == "See: <image>"
    assert pathless["img0.png"] == (images / "red.png").read_bytes()


# ---------------------------------------------------------------- output folder and interruption


def good_samples(count: int) -> list[dict]:
    return [
        {"id": f"g{i}", "image": "red.png", "conversations": [user("<image>Colour?"), gpt("Red.")]}
        for i in range(count)
    ]


def test_interrupted_run_leaves_only_complete_shards(images, tmp_path, monkeypatch):
    write_llava(tmp_path / "in.json", good_samples(5))
    real_load, calls = prepare_module.load_image, []

    def failing_load(*args):
        calls.append(args)
        if len(calls) == 4:  # the second image of the second shard
            raise KeyboardInterrupt
        return real_load(*args)

    monkeypatch.setattr(prepare_module, "load_image", failing_load)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare("llava", str(tmp_path / "in.json"), str(images), str(out), samples_per_shard=2)
    assert sorted(os.listdir(out)) == [MARKER, "train-000000.tar"]
    assert sorted(read_shards(out)) == ["s000000000", "s000000001"]

    # A run killed outright leaves its temporary shard; the next run clears it.
    (out / ".train-000001.tar.tmp").write_bytes(b"partial")
    monkeypatch.setattr(prepare_module, "load_image", real_load)
    summary = prepare("llava", str(tmp_path / "in.json"), str(images), str(out), samples_per_shard=2)
    assert summary["written"] == 5 and len(summary["shards"]) == 3
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


def test_refuses_a_foreign_non_empty_output_folder(images, tmp_path, capsys):
    write_llava(tmp_path / "in.json", good_samples(1))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="not empty and is not an earlier output"):
        prepare("llava", str(tmp_path / "in.json"), str(images), str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["notes.txt"]

    tool = load_tool()
    code = tool.main(["--format", "llava", "--input", str(tmp_path / "missing.json"),
                      "--image-root", str(images), "--out", str(tmp_path / "new")])
    assert code == 2
    assert "--input" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_no_usable_sample_exits_nonzero(images, tmp_path, capsys):
    write_llava(tmp_path / "in.json", LLAVA[3:5])
    code = load_tool().main(["--format", "llava", "--input", str(tmp_path / "in.json"),
                             "--image-root", str(images), "--out", str(tmp_path / "out")])
    assert code == 1
    assert "no sample" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["written"] == 0


def test_image_paths_stay_inside_the_image_root(images, tmp_path):
    """Absolute paths, file:// URLs, `..` and symbolic links may not read files outside --image-root."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes((images / "red.png").read_bytes())
    root = tmp_path / "root"
    root.mkdir()
    (root / "red.png").write_bytes((images / "red.png").read_bytes())
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "sub").mkdir()

    def sample(sample_id, path):
        return {"id": sample_id, "image": path, "conversations": [user("<image>Colour?"), gpt("Red.")]}

    write_llava(tmp_path / "in.json", [
        sample("relative", "red.png"),
        sample("inside-absolute", str(root / "red.png")),
        sample("inside-dots", "sub/../red.png"),
        sample("dots", "../outside/secret.png"),
        sample("absolute", str(outside / "secret.png")),
        sample("symlink", "link.png"),
    ])
    summary = prepare("llava", str(tmp_path / "in.json"), str(root), str(tmp_path / "out"))
    report = [json.loads(r) for r in (tmp_path / "out" / "report.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in report] == [
        ("dots", "image_outside_root"), ("absolute", "image_outside_root"), ("symlink", "image_outside_root")]
    assert all(str(outside / "secret.png") in r["detail"] and str(root) in r["detail"] for r in report)
    assert summary["written"] == 3 and summary["skipped"] == {"image_outside_root": 3}

    # The same for a messages file's file:// URL.
    chat = {"id": "url", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file://" + str(outside / "secret.png")}}]},
        {"role": "assistant", "content": "Red."}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    summary = prepare("messages", str(tmp_path / "chat.jsonl"), str(root), str(tmp_path / "out2"))
    assert summary["skipped"] == {"image_outside_root": 1}
