"""Generation: the KV-cached decode equals recomputing the whole sequence, batched prompts of
different lengths (left padding) answer as they would alone, and greedy answers equal the
exported Hugging Face model's."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import ROOT

TOLERANCE = 1e-4


def _model(config):
    from megavl.convert.megavl_model import single_process_config
    from megavl.models.build import build_model

    config = single_process_config(config)
    torch.manual_seed(0)
    model = build_model(config)
    model.eval()
    return config, model


def _full_sequence_logits(model, config, prompt, new_tokens):
    """Last-position logits of prompt + each prefix of new_tokens, each from a full forward (no cache)."""
    from megavl.data.batch import collate_rows, pack_row
    from megavl.models import inputs
    from megavl.platform.features import detect

    platform = detect()
    sample = copy.deepcopy(prompt)
    out = []
    for token in [None, *new_tokens[:-1]]:
        if token is not None:
            sample.tokens.append(token)
            sample.labels.append(-100)
            sample.turn_ids.append(0)
        row = pack_row([sample], len(sample), config.model.lm.image_token_id, config.model.vision.spatial_merge_size)
        batch = inputs.to_device(collate_rows([row]), config, platform.device)
        with torch.no_grad():
            logits = inputs.forward(model, batch, config, platform, with_labels=False, gather_logits=True)
        out.append(logits[0, -1].float())
    return out


@pytest.mark.parametrize("config_name, image_attention", [
    ("tiny_cpu.yaml", "bidirectional"), ("tiny_cpu.yaml", "causal"), ("tiny_moe_cpu.yaml", "bidirectional"),
])
def test_cached_decoding_equals_recomputing_the_whole_sequence(megatron_world, config_name, image_attention):
    """Three prompts of different lengths (two with images, one text only) in one left-padded
    batch, tokens sampled so they differ: every step's logits equal a full forward of that
    prompt alone on its sequence so far."""
    from megavl.config import load_config
    from megavl.convert.verify import verification_inputs
    from megavl.eval.generation import GenerationSettings, Generator
    from megavl.platform.features import detect

    config = load_config(str(ROOT / "examples" / "configs" / config_name))
    config.model.lm.image_attention = image_attention
    config, model = _model(config)
    prompts = verification_inputs(config)[1].documents
    assert len({len(p) for p in prompts}) == 3
    generator = Generator(model, config, detect(), config.model.lm.vocab_size, pad_id=0, stop_ids=[])
    steps = []
    answers = generator.generate(prompts, GenerationSettings(max_new_tokens=5, temperature=1.0, seed=1),
                                 step_logits=steps)
    assert [len(a) for a in answers] == [5, 5, 5]
    assert len({tuple(a) for a in answers}) == 3 and any(len(set(a)) > 1 for a in answers)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        reference = _full_sequence_logits(model, config, prompt, answer)
        for step, expected in enumerate(reference):
            diff = (steps[step][row] - expected).abs().max().item()
            assert diff <= TOLERANCE, f"prompt {row}, step {step}: max |logit diff| {diff:.2e}"


def test_greedy_and_sampled_decoding_follow_the_settings(megatron_world):
    from megavl.config import load_config
    from megavl.convert.verify import verification_inputs
    from megavl.eval.generation import GenerationSettings, Generator
    from megavl.platform.features import detect

    config, model = _model(load_config(str(ROOT / "examples" / "configs" / "tiny_cpu.yaml")))
    prompts = verification_inputs(config)[0].documents
    generator = Generator(model, config, detect(), config.model.lm.vocab_size, pad_id=0, stop_ids=[])
    steps = []
    greedy = generator.generate(prompts, GenerationSettings(max_new_tokens=4), step_logits=steps)
    assert greedy[0] == [int(s[0].argmax()) for s in steps]
    same_seed = [generator.generate(prompts, GenerationSettings(4, temperature=2.0, seed=7)) for _ in range(2)]
    assert same_seed[0] == same_seed[1]
    # top_p this small keeps only the most likely token: sampling becomes greedy.
    assert generator.generate(prompts, GenerationSettings(4, temperature=2.0, top_p=1e-6, seed=3)) == greedy
    # A stop token ends the answer and is not part of it.
    stop_at = greedy[0][1]
    stopped = Generator(model, config, detect(), config.model.lm.vocab_size, pad_id=0, stop_ids=[stop_at])
    assert stopped.generate(prompts, GenerationSettings(max_new_tokens=4)) == [greedy[0][:greedy[0].index(stop_at)]]
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0)):
        with pytest.raises(ValueError):
            GenerationSettings(**bad)


def test_generation_refuses_layouts_it_cannot_run():
    from megavl.config import load_config
    from megavl.eval.generation import check_generation_layout

    config = load_config(str(ROOT / "examples" / "configs" / "tiny_cpu.yaml"), ["parallel.pipeline=2"])
    with pytest.raises(ValueError, match="parallel.pipeline = 2"):
        check_generation_layout(config)
    config = load_config(str(ROOT / "examples" / "configs" / "tiny_cpu.yaml"),
                         ["parallel.tensor=2", "parallel.sequence_parallel=true"])
    with pytest.raises(ValueError, match="sequence_parallel"):
        check_generation_layout(config)


@pytest.fixture(scope="module")
def exported(megatron_world, tmp_path_factory):
    """A tiny Qwen2.5-VL imported, given megavl's features (bidirectional image attention,
    random vision LoRA), and exported to megavl's remote-code class."""
    from test_convert_remote_code import with_megavl_features
    from workers.convert_tiny_models import quiet, save_tiny_model

    from megavl.convert import export_to_hf, import_from_hf

    root = tmp_path_factory.mktemp("generate_hf")
    save_tiny_model("qwen2_5_vl", str(root / "hf"))
    import_from_hf(str(root / "hf"), str(root / "ckpt"), verify=False, log=quiet)
    config = with_megavl_features(root / "ckpt", root / "features")
    export_to_hf(str(root / "features"), str(root / "hf_out"), verify=False, log=quiet)
    return root, config


def test_greedy_answers_equal_the_exported_hugging_face_models(exported):
    """megavl generates for three prompts in one padded batch; transformers' generate runs on
    each alone: the same tokens."""
    from transformers import AutoModelForImageTextToText

    from megavl.convert.megavl_model import build_single_process_model, load_megavl_config
    from megavl.convert.verify import reserved_token_ids, verification_inputs
    from megavl.eval.generation import GenerationSettings, Generator
    from megavl.platform.features import detect
    from megavl.training.checkpoint import load_model_weights

    root, config = exported
    config = load_megavl_config(str(root / "features"))
    model = build_single_process_model(config)
    load_model_weights(model, str(root / "features"))
    hf_config = json.loads((root / "hf_out" / "config.json").read_text())
    prompts = verification_inputs(config, reserved_token_ids(hf_config))[1].documents
    new = 6
    ours = Generator(model, config, detect(), config.model.lm.vocab_size, pad_id=0, stop_ids=[]).generate(
        prompts, GenerationSettings(max_new_tokens=new))

    hf = AutoModelForImageTextToText.from_pretrained(str(root / "hf_out"), trust_remote_code=True,
                                                     dtype=torch.float32)
    hf.eval()
    image_token = config.model.lm.image_token_id
    for prompt, answer in zip(prompts, ours):
        input_ids = torch.tensor([prompt.tokens])
        extra = {}
        if prompt.images:
            extra = dict(pixel_values=torch.cat([im.pixel_values for im in prompt.images]),
                         image_grid_thw=torch.tensor([im.grid_thw for im in prompt.images]))
        with torch.no_grad():
            output = hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 mm_token_type_ids=(input_ids == image_token).int(), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, **extra)
        assert output[0, input_ids.shape[1]:].tolist() == answer


@pytest.fixture(scope="module", params=["tiny_cpu.yaml", "tiny_moe_cpu.yaml"])
def small_checkpoint(megatron_world, tmp_path_factory, request):
    """A randomly initialised tiny model (dense, or MoE: its experts split over the processes)
    saved as a converted checkpoint (megavl_config.yaml beside the weights), with a tokenizer,
    and an image to ask about."""
    from PIL import Image

    from conftest import tiny_tokenizer
    from megavl.config import dump_config, load_config
    from megavl.convert.megavl_model import CONFIG_FILE
    from megavl.training.checkpoint import save_model_weights

    root = tmp_path_factory.mktemp("generate_ckpt")
    tokenizer = tiny_tokenizer(["How many circles are there?", "Read the text in the image.", "0 1 2 3 4 5"])
    tokenizer.save_pretrained(str(root / "tokenizer"))
    config = load_config(str(ROOT / "examples" / "configs" / request.param),
                         [f"data.tokenizer={root / 'tokenizer'}", "data.image_backend=pillow",
                          "data.resolution.max_pixels=12544"])
    config, model = _model(config)
    save_model_weights(model, str(root / "ckpt"))
    (root / "ckpt" / CONFIG_FILE).write_text(dump_config(config))
    Image.new("RGB", (84, 56), (200, 30, 30)).save(root / "image.png")
    return root


def _generate(root, nproc: int, *extra) -> list[dict]:
    import os
    import subprocess
    import sys

    from conftest import _free_port

    args = ["--load", str(root / "ckpt"), "--image", str(root / "image.png"), "--prompt", "How many circles?",
            "--prompt", "Read the text in the image.", "--max-new-tokens", "6", "--json", *extra]
    if nproc == 1:
        command = [sys.executable, str(ROOT / "tools" / "generate.py"), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-port", str(_free_port()), str(ROOT / "tools" / "generate.py"), *args]
    # This process's own world set MASTER_ADDR / MASTER_PORT; a child must not reuse its port.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=dict(env, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_tensor_parallel_generation_answers_as_one_process(small_checkpoint):
    """tools/generate.py under torchrun with two processes (TP=2 for the dense model, EP=2 for the
    MoE one; the weights resharded on load) gives the one-process answers, printed once."""
    alone = _generate(small_checkpoint, 1)
    assert [a["prompt"] for a in alone] == ["How many circles?", "Read the text in the image."]
    assert all(len(a["tokens"]) > 0 for a in alone)
    assert _generate(small_checkpoint, 2) == alone
    # Sampling is seeded: the same seed gives the same answers on both layouts.
    sampled = _generate(small_checkpoint, 1, "--temperature", "1.5", "--seed", "4")
    assert _generate(small_checkpoint, 2, "--temperature", "1.5", "--seed", "4") == sampled


def test_generate_tool_reports_bad_input(small_checkpoint, capsys):
    import subprocess
    import sys

    command = [sys.executable, str(ROOT / "tools" / "generate.py"), "--load", str(small_checkpoint / "ckpt"),
               "--image", str(small_checkpoint / "missing.png"), "--prompt", "?"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "missing.png" in result.stderr


def test_the_generation_layout_splits_tensors_or_experts():
    from megavl.config import load_config
    from megavl.eval.loading import generation_config

    dense = load_config(str(ROOT / "examples" / "configs" / "tiny_cpu.yaml"), ["parallel.pipeline=2"])
    layout = generation_config(dense, 2, ["train.seed=5"]).parallel
    assert (layout.tensor, layout.pipeline, layout.expert, layout.sequence_parallel) == (2, 1, 1, False)
    assert generation_config(dense, 2, ["train.seed=5"]).train.seed == 5
    moe = load_config(str(ROOT / "examples" / "configs" / "tiny_moe_cpu.yaml"))
    layout = generation_config(moe, 2).parallel
    assert (layout.tensor, layout.expert) == (1, 2)
    with pytest.raises(ValueError, match="4 experts split over the processes; 3 processes"):
        generation_config(moe, 3)
    from megavl.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        generation_config(dense, 1, ["train.no_such_field=1"])
