"""Mix-of-Show on SDXL, end to end on the tiny SDXL model: layer-wise tokens in both text encoders,
two ED-LoRAs trained, fused by ``difflora fuse`` and sampled by ``difflora sample-regions``.

Several checks fail if the second text encoder were ignored anywhere: its rows and LoRA must train,
reach the concept file, be installed and fused, and change the sampled image.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from difflora.cli import main as cli_main
from difflora.mix_of_show import edlora

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "concepts"


def _base(path):
    from difflora.models import load_base_model

    return load_base_model(str(path))


def _train_args(base, data: Path, out: Path, words: str, init: str, placeholder: str, *extra: str) -> list[str]:
    return ["edlora", "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(data),
            "--concept_words", words, "--initializer", init, "--caption_placeholder", placeholder,
            "--instance_prompt", f"a photo of {placeholder}", "--resolution", "32", "--train_batch_size", "2",
            "--max_train_steps", "3", "--num_validation_images", "0", "--embedding_lr", "1e-2",
            "--text_encoder_lr", "1e-2", "--unet_lr", "1e-3", "--output_dir", str(out), *extra]


def _fails(argv, capsys, expect: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith("difflora ") and expect in err[-1], err[-1]
    return err[-1]


def _image(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


# ---- layer-wise conditioning with two text encoders --------------------------------------------------


def test_layerwise_conditioning_reads_both_encoders(tiny_sdxl):
    """Layer l's text = both encoders' penultimate states of the layer-l prompt; pooled = the mean of
    the layers' pooled outputs; the second encoder's rows move the second half and the pooled vector."""
    base = _base(tiny_sdxl)
    family, toks, encs, unet = base.family, base.tokenizers, base.text_encoders, base.unet
    layers = edlora.cross_attention_layers(unet)
    n = len(layers)
    g = torch.Generator().manual_seed(0)
    embs = []
    for tok, enc in zip(toks, encs):
        emb, tokens = edlora.add_concept_tokens(tok, enc, ["<x>"], ["rand"], n, 1.0, g)
        embs.append(emb)
    assert all(len(tok) == len(toks[0]) for tok in toks) and embs[1].rows.shape == (n, 32)
    d1 = encs[0].config.hidden_size
    with torch.no_grad():
        cond = edlora.layerwise_conditioning(family, toks, encs, ["a photo of <x>"], tokens, n)
        assert cond.hidden_states.shape == (1, n * 77, unet.config.cross_attention_dim)
        expanded = family.encode_prompts(toks, encs, [f"a photo of <x_l{i}>" for i in range(n)], "cpu")
        torch.testing.assert_close(cond.hidden_states[0], expanded.hidden_states.reshape(n * 77, -1))
        torch.testing.assert_close(cond.pooled[0], expanded.pooled.mean(0))
        # A prompt without concept words: the plain encoding in every layer, the plain pooled output.
        plain = edlora.layerwise_conditioning(family, toks, encs, ["a photo"], tokens, n)
        stock = family.encode_prompts(toks, encs, ["a photo"], "cpu")
        assert torch.equal(plain.hidden_states[0, :77], stock.hidden_states[0]) and torch.equal(plain.pooled,
                                                                                                   stock.pooled)
        # Move only the second encoder's rows: the first encoder's half stays, its half and the pooled move.
        embs[1].rows.add_(torch.randn(embs[1].rows.shape, generator=g))  # not a constant: LayerNorm drops those
        moved = edlora.layerwise_conditioning(family, toks, encs, ["a photo of <x>"], tokens, n)
    assert torch.equal(moved.hidden_states[..., :d1], cond.hidden_states[..., :d1])
    assert not torch.allclose(moved.hidden_states[..., d1:], cond.hidden_states[..., d1:])
    assert not torch.allclose(moved.pooled, cond.pooled)

    # Each cross-attention layer of the SDXL UNet reads its own slice.
    edlora.install_layerwise(unet, 77)
    seen: dict[str, torch.Tensor] = {}
    hooks = [unet.get_submodule(f"{name}.to_k").register_forward_hook(
        lambda m, args, out, name=name: seen.__setitem__(name, args[0].detach())) for name in layers]
    extra = family.unet_kwargs(cond, [(32, 32)], [(0, 0)], (32, 32), torch.float32, "cpu")
    with torch.no_grad():
        unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), cond.hidden_states, **extra)
    for h in hooks:
        h.remove()
    for i, name in enumerate(layers):
        torch.testing.assert_close(seen[name], expanded.hidden_states[i:i + 1])


def test_sd_concept_files_without_encoder_list_still_load(tmp_path):
    """A file in the first format (no ``text_encoders`` entry) reads as one text encoder."""
    meta = {"concept_words": ["<a>"], "tokens": {"<a>": edlora.layer_tokens("<a>", 3)},
            "layers": [f"l{i}.attn2" for i in range(3)], "base_model": "sd"}
    save_file({f"{edlora.EMBEDDING_PREFIX}<a>": torch.ones(3, 8)}, str(tmp_path / edlora.EDLORA_FILE),
              metadata={edlora.META_KEY: json.dumps(meta)})
    back = edlora.load_edlora(tmp_path)
    assert back.text_encoders == ["text_encoder"] and back.extra_embeddings == [] and back.lora == {}
    assert torch.equal(back.all_embeddings[0]["<a>"], torch.ones(3, 8))


def test_each_encoders_rows_freeze_on_their_own_scale(tiny_sdxl):
    """The second encoder's threshold is the same multiple of its own table's mean row norm; its rows
    freeze alone, and the freeze steps survive a checkpoint."""
    def job():
        cfg = edlora.EDLoRAConfig(pretrained_model_name_or_path=str(tiny_sdxl), instance_data_dir="d",
                                  concept_words="<a>+<b>", initializer="rand+robot", embedding_freeze_norm=0.5)
        j = edlora.EDLoRAJob(cfg)
        j.attach(_base(tiny_sdxl))
        return j

    first = job()
    means = [float(e.base.weight[:e.start].norm(dim=-1).mean()) for e in first.embeddings]
    assert first.thresholds == pytest.approx([0.5, 0.5 * means[1] / means[0]])
    with torch.no_grad():
        first.embeddings[1].rows.mul_(100.0)
    first.after_step(5)
    assert first.frozen == [None, 5] and first.frozen_at is None
    assert first.embeddings[0].rows.requires_grad and not first.embeddings[1].rows.requires_grad
    state = first.state()
    assert state == {"frozen_at": None, "frozen_at_encoders": [None, 5]}
    second = job()
    second.load_state(state)
    assert second.frozen == [None, 5] and not second.embeddings[1].rows.requires_grad


# ---- training, fusion and regional sampling ----------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_edloras(tiny_sdxl, tmp_path_factory):
    """Two ED-LoRA concepts trained 3 steps each on the tiny SDXL model (robot: checkpoints and a
    sample grid through the layer-wise SDXL pipeline)."""
    root = tmp_path_factory.mktemp("sdxl-edloras")
    robot, star = root / "robot", root / "star"
    cli_main(_train_args(tiny_sdxl, ASSETS / "robot", robot, "<robot1>+<robot2>", "rand+robot", "ohwx",
                         "--checkpointing_steps", "2", "--num_validation_images", "1",
                         "--validation_inference_steps", "1"))
    cli_main(_train_args(tiny_sdxl, ASSETS / "checkered_star", star, "<star1>+<star2>", "rand+star", "sks"))
    return robot, star


def test_training_writes_both_encoders(sdxl_edloras, tiny_sdxl, tmp_path):
    robot, _ = sdxl_edloras
    data = edlora.load_edlora(robot)
    n = len(edlora.cross_attention_layers(_base(tiny_sdxl).unet))
    assert data.text_encoders == ["text_encoder", "text_encoder_2"]
    assert data.metadata["family"] == "sdxl" and data.metadata["pooled"] == edlora.POOLED_RULE
    assert [t["<robot2>"].shape for t in data.all_embeddings] == [(n, 32), (n, 32)]
    # Both encoders' rows trained: the class-word start is the same in every layer, the result is not.
    for table in data.all_embeddings:
        assert not torch.allclose(table["<robot2>"][0], table["<robot2>"][-1])
    # Both encoders carry LoRA, and every LoRA factor reached the loss (B starts at zero): none sits on
    # the first encoder's last layer, whose output SDXL never reads.
    te_b = {k: v for k, v in data.lora.items() if k.startswith("text_encoder") and "lora_B" in k}
    assert any(k.startswith("text_encoder_2.") for k in te_b) and any(k.startswith("text_encoder.") for k in te_b)
    assert all(v.abs().sum() > 0 for v in te_b.values())
    assert not any(k.startswith("text_encoder.") and ".layers.1." in k for k in data.lora)
    assert (robot / "samples" / "step-3.png").is_file()
    # Resuming from step 2 (rows of both encoders in the checkpoint) gives the same file, bit for bit.
    assert "text_encoder_2.concept_embeddings" in load_file(robot / "checkpoint-2" / "weights.safetensors")
    again = tmp_path / "resumed"
    cli_main(_train_args(tiny_sdxl, ASSETS / "robot", again, "<robot1>+<robot2>", "rand+robot", "ohwx",
                         "--resume_from_checkpoint", str(robot / "checkpoint-2")))
    a, b = load_file(again / edlora.EDLORA_FILE), load_file(robot / edlora.EDLORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fuse_and_sample_regions_on_sdxl(sdxl_edloras, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    robot, star = sdxl_edloras
    concepts = tmp_path / "concepts.yaml"
    concepts.write_text(f"- lora: {robot}\n- lora: {star / edlora.EDLORA_FILE}\n")
    fused = tmp_path / "fused"
    cli_main(["fuse", "--concepts", str(concepts), "--pretrained_model_name_or_path", str(tiny_sdxl),
              "--output_dir", str(fused), "--sample_steps", "2", "--prompt_templates", "a photo of {}"])
    info = json.loads((fused / "concepts.json").read_text())
    assert info["family"] == "sdxl" and info["layerwise"]
    pipe = StableDiffusionXLPipeline.from_pretrained(fused)
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    # Both encoders hold every token with the file's rows.
    file = edlora.load_edlora(star)
    for tokenizer, encoder, table in zip((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                                         file.all_embeddings):
        weight = encoder.get_input_embeddings().weight
        for i, token in enumerate(info["concepts"][1]["tokens"]["<star2>"]):
            torch.testing.assert_close(weight[tokenizer.convert_tokens_to_ids(token)], table["<star2>"][i])
    # Both encoders and the UNet were fused.
    report = json.loads((fused / "fusion_report.json").read_text())["layers"]
    assert {r["stage"] for r in report.values()} == {"text encoder", "cross-attention k/v", "UNet"}
    te2 = [k for k in report if k.startswith("text_encoder_2.")]
    assert te2 and any(k.startswith("text_encoder.") for k in report)
    path = te2[0][len("text_encoder_2."):].removeprefix("text_model.")
    fused_w = pipe.text_encoder_2.text_model.get_submodule(path).weight
    assert not torch.allclose(fused_w, base.text_encoder_2.text_model.get_submodule(path).weight)

    regions = ["--prompt", "two toys", "--steps", "2", "--region", "0,0,0.5,1|a photo of <robot1> <robot2>",
               "--region", "0.5,0,1,1|a <star1> <star2>"]
    cli_main(["sample-regions", "--model", str(fused), *regions, "--output_dir", str(tmp_path / "regions")])
    image = _image(tmp_path / "regions" / "image.png")
    assert image.shape == (32, 32, 3)
    settings = json.loads((tmp_path / "regions" / "settings.json").read_text())
    assert len(settings["regions"]) == 2

    # The second encoder's concept rows steer the image: reset them to the base's mean row and the
    # concepts' regions change.
    blind = tmp_path / "blind"
    shutil.copytree(fused, blind)
    weight = pipe.text_encoder_2.get_input_embeddings().weight
    start = len(base.tokenizer_2)
    with torch.no_grad():
        weight[start:] = weight[:start].mean(0)
    pipe.text_encoder_2.save_pretrained(blind / "text_encoder_2")
    cli_main(["sample-regions", "--model", str(blind), *regions, "--output_dir", str(tmp_path / "blind-out")])
    assert np.abs(_image(tmp_path / "blind-out" / "image.png") - image).mean() > 0.5  # out of 255


def test_concept_file_for_the_other_family_refused(sdxl_edloras, tiny_sd, tmp_path, capsys):
    """An SDXL concept on an SD model: one line naming both shapes, nothing written."""
    robot, _ = sdxl_edloras
    concepts = tmp_path / "c.yaml"
    concepts.write_text(f"- lora: {robot}\n")
    line = _fails(["fuse", "--concepts", str(concepts), "--pretrained_model_name_or_path", str(tiny_sd),
                   "--output_dir", str(tmp_path / "out")], capsys, "trained on another base model")
    assert "text widths 32+32" in line and "text width 32)" in line
    assert not (tmp_path / "out").exists()


def test_plain_regions_and_adapter_on_sdxl(tiny_sdxl, tmp_path):
    """Plain prompts on the SDXL base: a region redraws its box, and a T2I-Adapter (SDXL adapter
    pipeline) steers the image, adding nothing at weight 0."""
    from diffusers import T2IAdapter

    torch.manual_seed(0)
    T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=2,
               adapter_type="full_adapter").save_pretrained(tmp_path / "t2i")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "pose.png")

    def sample(name: str, *extra: str) -> np.ndarray:
        cli_main(["sample-regions", "--model", str(tiny_sdxl), "--prompt", "a photo of robot", "--steps", "2",
                  "--output_dir", str(tmp_path / name), *extra])
        return _image(tmp_path / name / "image.png")

    plain = sample("plain")
    region = sample("region", "--region", "0,0,0.5,1|a red teddy bear")
    assert np.abs(region - plain)[:, :16].mean() > 1.0  # out of 255
    adapter = ["--adapter", str(tmp_path / "t2i"), "--condition", str(tmp_path / "pose.png")]
    assert np.abs(sample("adapter", *adapter) - plain).mean() > 1.0
    assert np.abs(sample("off", *adapter, "--adapter_weight", "0") - plain).max() <= 1.0
