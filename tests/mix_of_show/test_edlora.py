"""ED-LoRA: layer-wise tokens, per-layer text, concept rows only, freezing, masks, concept file,
and the whole Mix-of-Show path (train two concepts -> fuse -> regional sampling) on the tiny model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difflora.cli import main as cli_main
from difflora.data import ImageSet
from difflora.errors import UserError
from difflora.mix_of_show import edlora
from difflora.train.engine import latent_mask
from difflora.train.loss import diffusion_loss

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "concepts"


def _base(path):
    from difflora.models import load_base_model

    return load_base_model(str(path))


def _attn2_count(unet) -> int:
    return sum(1 for name, _ in unet.named_modules() if name.endswith(".attn2"))


def _train_args(base, data: Path, out: Path, words: str, *extra: str, init: str = "rand+robot",
                placeholder: str = "ohwx") -> list[str]:
    return ["edlora", "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(data),
            "--concept_words", words, "--initializer", init, "--caption_placeholder", placeholder,
            "--instance_prompt", f"a photo of {placeholder}", "--resolution", "32", "--train_batch_size", "2",
            "--max_train_steps", "3", "--num_validation_images", "1", "--validation_inference_steps", "1",
            "--embedding_lr", "1e-2", "--text_encoder_lr", "1e-3", "--unet_lr", "1e-3",
            "--output_dir", str(out), *extra]


def _fails(argv, capsys, expect: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith("difflora ") and expect in err[-1], err[-1]
    return err[-1]


# ---- tokens and per-layer text ---------------------------------------------------------------------


def test_one_token_per_word_per_cross_attention_layer(tiny_sd):
    base = _base(tiny_sd)
    tok, te = base.tokenizers[0], base.text_encoders[0]
    n_layers = _attn2_count(base.unet)
    assert len(edlora.cross_attention_layers(base.unet)) == n_layers > 1
    before = len(tok)
    emb, tokens = edlora.add_concept_tokens(tok, te, ["<a1>", "<a2>"], ["rand", "robot"], n_layers, 0.013,
                                            torch.Generator().manual_seed(0))
    assert len(tok) - before == 2 * n_layers
    assert emb.rows.shape == (2 * n_layers, te.config.hidden_size)
    assert tokens["<a1>"] == [f"<a1_l{i}>" for i in range(n_layers)]
    # Each layer token is one id, and <a1_l1> is not confused with <a1_l10>-style prefixes.
    for i, t in enumerate(tokens["<a2>"]):
        assert tok(t, add_special_tokens=False).input_ids == [before + n_layers + i]
    # 'robot' initialises the second word: every layer starts at the class word's embedding.
    ids = tok("robot", add_special_tokens=False).input_ids
    expected = te.get_input_embeddings().base.weight[ids].mean(0)
    torch.testing.assert_close(emb.rows[n_layers:], expected.expand(n_layers, -1))
    assert 0.005 < float(emb.rows[:n_layers].std()) < 0.03  # N(0, 0.013^2)


def test_each_cross_attention_layer_reads_its_own_encoding(tiny_sd):
    base = _base(tiny_sd)
    tok, te, unet = base.tokenizers[0], base.text_encoders[0], base.unet
    layers = edlora.cross_attention_layers(unet)
    emb, tokens = edlora.add_concept_tokens(tok, te, ["<x>"], ["rand"], len(layers), 1.0,
                                            torch.Generator().manual_seed(0))
    edlora.install_layerwise(unet, tok.model_max_length)
    seen: dict[str, torch.Tensor] = {}
    hooks = [unet.get_submodule(f"{name}.to_k").register_forward_hook(
        lambda m, args, out, name=name: seen.__setitem__(name, args[0].detach()))
        for name in layers]
    with torch.no_grad():
        cond = edlora.encode_layerwise(tok, te, ["a photo of <x>"], tokens, len(layers))
        assert cond.shape == (1, len(layers) * tok.model_max_length, te.config.hidden_size)
        unet(torch.randn(1, unet.config.in_channels, 8, 8), torch.tensor([10]), cond)
        for i, name in enumerate(layers):
            ids = tok(f"a photo of <x_l{i}>", padding="max_length", max_length=tok.model_max_length,
                      return_tensors="pt").input_ids
            torch.testing.assert_close(seen[name], te(ids)[0])
    flat = [seen[n] for n in layers]
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            assert not torch.allclose(flat[i], flat[j])
    # A plain T-token prompt passes through every layer unchanged (no slicing).
    with torch.no_grad():
        plain = edlora.encode_layerwise(tok, te, ["a photo"], tokens, 1)
        unet(torch.randn(1, unet.config.in_channels, 8, 8), torch.tensor([10]), plain)
    assert all(torch.equal(seen[n], plain) for n in layers)
    for h in hooks:
        h.remove()


def test_only_concept_rows_change(tiny_sd):
    """Weight decay and gradients reach the concept rows only; every other row stays bit-identical."""
    from difflora.optim import build_optimizer

    base = _base(tiny_sd)
    tok, te = base.tokenizers[0], base.text_encoders[0]
    te.requires_grad_(False)
    table_before = te.get_input_embeddings().weight.detach().clone()
    emb, tokens = edlora.add_concept_tokens(tok, te, ["<c>"], ["rand"], 3, 0.013, torch.Generator().manual_seed(0))
    initial = emb.rows.detach().clone()
    opt = build_optimizer("adamw", [("emb", emb.rows)], lr=1e-2, weight_decay=0.5)
    for _ in range(3):
        out = edlora.encode_layerwise(tok, te, ["a <c> on the beach"], tokens, 3)
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    merged = emb.weight.detach()
    assert torch.equal(merged[: emb.start], table_before)
    assert not torch.allclose(merged[emb.start:], initial)


def test_mask_weights_the_loss_by_hand(tmp_path):
    """A left-half mask: the loss is the mean error over the left half only, also after a flip."""
    img = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    img.save(tmp_path / "0.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    data = ImageSet([tmp_path / "0.png"], ["p"], 32, center_crop=True, random_flip=True, seed=0,
                    masks=[tmp_path / "m.png"])
    flips = set()
    for epoch in range(8):
        m = data.example(0, epoch).mask
        assert m.shape == (1, 32, 32) and set(m.unique().tolist()) == {0.0, 1.0}
        flips.add(bool(m[0, 0, 0] == 0))  # flipped: the subject moved to the right half
    assert flips == {True, False}
    m = data.example(0, 0).mask
    lat = latent_mask([m], (4, 4))  # 8x8-pixel cells: fully in or fully out
    pred = torch.zeros(1, 2, 4, 4)
    target = torch.arange(32, dtype=torch.float32).view(1, 2, 4, 4)
    scheduler = type("S", (), {"config": type("C", (), {"prediction_type": "epsilon"})()})()
    loss = diffusion_loss(pred, target, torch.tensor([0]), scheduler, mask=lat)
    inside = (lat.expand_as(target) > 0)
    assert inside.sum() == 16
    assert float(loss) == pytest.approx(float(target[inside].pow(2).mean()))
    assert float(loss) != pytest.approx(float(target.pow(2).mean()))


def test_concept_file_round_trips(tiny_sd, tmp_path):
    from difflora.lora_io import collect_lora_layers, lora_deltas
    from difflora.models import LORA_TARGET_PRESETS, add_lora

    base = _base(tiny_sd)
    tok, te, unet = base.tokenizers[0], base.text_encoders[0], base.unet
    layers = edlora.cross_attention_layers(unet)
    emb, tokens = edlora.add_concept_tokens(tok, te, ["<p1>", "<p2>"], ["rand", "rand"], len(layers), 0.1,
                                            torch.Generator().manual_seed(1))
    add_lora(unet, 4, 2.0, LORA_TARGET_PRESETS["attention"]["unet"])
    add_lora(te, 4, 2.0, LORA_TARGET_PRESETS["attention"]["text_encoder"])
    with torch.no_grad():
        for p in [*unet.parameters(), *te.parameters()]:
            if p.requires_grad and p.dim() == 2:
                p.normal_()
    rows = emb.rows.detach()
    embeddings = {"<p1>": rows[: len(layers)], "<p2>": rows[len(layers):]}
    edlora.save_edlora(tmp_path / edlora.EDLORA_FILE, ["<p1>", "<p2>"], tokens, embeddings, unet, te,
                              layers, {"base_model": str(tiny_sd), "rank": 4, "alpha": 2.0})
    assert edlora.is_edlora_file(tmp_path) and not edlora.is_edlora_file(tmp_path / "nothing.safetensors")
    back = edlora.load_edlora(tmp_path)
    assert back.words == ["<p1>", "<p2>"] and back.tokens == tokens and back.layers == layers
    assert back.metadata["rank"] == 4 and back.metadata["alpha"] == 2.0
    for w in embeddings:
        assert torch.equal(back.embeddings[w], embeddings[w])
    deltas = lora_deltas(back.lora, metadata=back.metadata["header"])
    live = {**collect_lora_layers(unet, "unet"), **collect_lora_layers(te, "text_encoder")}
    assert set(deltas) == set(live) and len(live) > 0
    for key, layer in live.items():
        torch.testing.assert_close(deltas[key].delta(), layer.delta())
    edlora.check_base_model(back, unet, te, "this file")  # same model: accepted


# ---- training -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def robot_data(tmp_path_factory) -> Path:
    """The shipped robot set with captions in their own folder and a mask for two images."""
    root = tmp_path_factory.mktemp("robot")
    images, captions, masks = root / "images", root / "captions", root / "masks"
    captions.mkdir()
    masks.mkdir()
    shutil.copytree(ASSETS / "robot", images, ignore=shutil.ignore_patterns("*.txt", "*.json"))
    for txt in (ASSETS / "robot").glob("*.txt"):
        shutil.copy(txt, captions / txt.name)
    for name in ("0", "1"):
        size = Image.open(images / f"{name}.png").size
        Image.new("L", size, 255).save(masks / f"{name}.png")
    return root


def test_freeze_at_threshold(tiny_sd, robot_data, tmp_path, capsys):
    """The norm crosses the threshold at step k: embeddings stop there, the rest keeps training;
    and a resumed run equals an uninterrupted one."""
    free = tmp_path / "free"
    common = ["--instance_data_dir", str(robot_data / "images"), "--caption_dir", str(robot_data / "captions"),
              "--num_validation_images", "0", "--checkpointing_steps", "1", "--max_train_steps", "2"]
    cli_main([*_train_args(tiny_sd, robot_data / "images", free, "<r1>+<r2>"), *common,
              "--embedding_freeze_norm", "0"])
    norms = [float(load_file(free / f"checkpoint-{s}" / "weights.safetensors")["text_encoder.concept_embeddings"]
                   .norm(dim=-1).mean()) for s in (1,)]
    final_free = edlora.load_edlora(free)
    threshold = norms[0]  # reached exactly at step 1
    frozen = tmp_path / "frozen"
    cli_main([*_train_args(tiny_sd, robot_data / "images", frozen, "<r1>+<r2>"), *common,
              "--embedding_freeze_norm", repr(threshold)])
    metrics = json.loads((frozen / "metrics.json").read_text())
    assert metrics["embeddings_frozen_at"] == 1
    step1 = load_file(free / "checkpoint-1" / "weights.safetensors")["text_encoder.concept_embeddings"]
    got = edlora.load_edlora(frozen)
    torch.testing.assert_close(torch.cat([got.embeddings["<r1>"], got.embeddings["<r2>"]]), step1)
    assert not torch.allclose(torch.cat(list(final_free.embeddings.values())), step1)
    # The LoRA kept training after the freeze (B starts at zero).
    assert any(v.abs().sum() > 0 for k, v in got.lora.items() if "lora_B" in k)
    # Resuming the free run from its step-1 checkpoint gives the same file, bit for bit.
    cli_main([*_train_args(tiny_sd, robot_data / "images", free, "<r1>+<r2>"), *common,
              "--embedding_freeze_norm", "0", "--resume_from_checkpoint", "checkpoint-1"])
    resumed = edlora.load_edlora(free)
    assert all(torch.equal(resumed.embeddings[w], final_free.embeddings[w]) for w in ("<r1>", "<r2>"))
    assert resumed.lora.keys() == final_free.lora.keys()
    assert all(torch.equal(resumed.lora[k], final_free.lora[k]) for k in resumed.lora)


@pytest.fixture(scope="module")
def two_edloras(tiny_sd, robot_data, tmp_path_factory):
    """Two ED-LoRA concepts trained 3 steps each: robot (captions + masks) and checkered star."""
    root = tmp_path_factory.mktemp("edloras")
    robot, star = root / "robot", root / "star"
    cli_main([*_train_args(tiny_sd, robot_data / "images", robot, "<robot1>+<robot2>"),
              "--caption_dir", str(robot_data / "captions"), "--mask_dir", str(robot_data / "masks")])
    cli_main(_train_args(tiny_sd, ASSETS / "checkered_star", star, "<star1>+<star2>", init="rand+star",
                         placeholder="sks"))
    return robot, star


def test_training_writes_concept_file_and_samples(two_edloras, tiny_sd):
    robot, _ = two_edloras
    data = edlora.load_edlora(robot)
    n = _attn2_count(_base(tiny_sd).unet)
    assert data.words == ["<robot1>", "<robot2>"] and all(e.shape[0] == n for e in data.embeddings.values())
    assert data.metadata["base_model"] == str(tiny_sd) and data.metadata["steps"] == 3
    assert any(k.startswith("unet.") for k in data.lora) and any(k.startswith("text_encoder.") for k in data.lora)
    assert (robot / "samples" / "step-0.png").is_file() and (robot / "samples" / "step-3.png").is_file()
    # Different layers' tokens received different updates (they start equal for a class word).
    second = data.embeddings["<robot2>"]
    assert not torch.allclose(second[0], second[-1])


def test_fuse_and_sample_regions_end_to_end(two_edloras, tiny_sd, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    robot, star = two_edloras
    concepts = tmp_path / "concepts.yaml"
    concepts.write_text(f"- lora: {robot}\n- lora: {star / edlora.EDLORA_FILE}\n  scale: 1.0\n")
    fused = tmp_path / "fused"
    cli_main(["fuse", "--concepts", str(concepts), "--pretrained_model_name_or_path", str(tiny_sd),
              "--output_dir", str(fused), "--sample_steps", "2", "--prompt_templates", "a photo of {}"])
    info = json.loads((fused / "concepts.json").read_text())
    assert info["layerwise"] and [c["words"] for c in info["concepts"]] == [["<robot1>", "<robot2>"],
                                                                            ["<star1>", "<star2>"]]
    pipe = StableDiffusionPipeline.from_pretrained(fused, safety_checker=None, requires_safety_checker=False)
    table = pipe.text_encoder.get_input_embeddings().weight
    file = edlora.load_edlora(star)
    for i, token in enumerate(info["concepts"][1]["tokens"]["<star2>"]):
        torch.testing.assert_close(table[pipe.tokenizer.convert_tokens_to_ids(token)], file.embeddings["<star2>"][i])
    report = json.loads((fused / "fusion_report.json").read_text())
    assert {r["stage"] for r in report["layers"].values()} == {"text encoder", "cross-attention k/v", "UNet"}

    out = tmp_path / "regions"
    cli_main(["sample-regions", "--model", str(fused), "--prompt", "two toys", "--steps", "2",
              "--region", "0,0,0.5,1|a photo of <robot1> <robot2>", "--region", "0.5,0,1,1|a <star1> <star2>",
              "--output_dir", str(out)])
    assert Image.open(out / "image.png").size == (32, 32)
    assert len(json.loads((out / "settings.json").read_text())["regions"]) == 2

    # Bad input on the same model: an unknown concept word.
    _fails(["sample-regions", "--model", str(fused), "--prompt", "a <robot3>", "--output_dir", str(tmp_path / "x")],
           capsys, "unknown concept word '<robot3>'")


def test_duplicate_edlora_words_are_reindexed(two_edloras, tiny_sd, tmp_path):
    robot, _ = two_edloras
    concepts = tmp_path / "concepts.yaml"
    concepts.write_text(f"- lora: {robot}\n  name: a\n- lora: {robot}\n  name: b\n")
    fused = tmp_path / "fused"
    cli_main(["fuse", "--concepts", str(concepts), "--pretrained_model_name_or_path", str(tiny_sd),
              "--output_dir", str(fused), "--sample_steps", "1", "--prompt_templates", "{}", "--method", "average"])
    info = json.loads((fused / "concepts.json").read_text())
    a, b = info["concepts"]
    assert a["words"] == ["<robot1>", "<robot2>"] and b["words"] == ["<robot1_2>", "<robot2_2>"]
    assert b["renamed"] == {"<robot1>": "<robot1_2>", "<robot2>": "<robot2_2>"}
    assert not set(sum(a["tokens"].values(), [])) & set(sum(b["tokens"].values(), []))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fused, subfolder="tokenizer")
    ids = tok("<robot1_l0> <robot1_2_l0>", add_special_tokens=False).input_ids
    assert len(ids) == 2 and ids[0] != ids[1]


# ---- bad input ------------------------------------------------------------------------------------


def test_concept_file_from_another_base_model_refused(two_edloras, tiny_sd, tmp_path, capsys):
    """A file with SD1.5's shapes (16 layers, width 768) on the tiny model: one line, nothing written."""
    from safetensors.torch import save_file

    robot, _ = two_edloras
    header = edlora.load_edlora(robot).metadata["header"]
    meta = {"concept_words": ["<big>"], "tokens": {"<big>": edlora.layer_tokens("<big>", 16)},
            "layers": [f"layer{i}.attn2" for i in range(16)], "base_model": "runwayml/stable-diffusion-v1-5"}
    other = tmp_path / "other.safetensors"
    save_file({f"{edlora.EMBEDDING_PREFIX}<big>": torch.zeros(16, 768)}, str(other),
              metadata={**header, edlora.META_KEY: json.dumps(meta)})
    concepts = tmp_path / "c.yaml"
    concepts.write_text(f"- lora: {other}\n")
    line = _fails(["fuse", "--concepts", str(concepts), "--pretrained_model_name_or_path", str(tiny_sd),
                   "--output_dir", str(tmp_path / "out")], capsys, "trained on another base model")
    assert "16 cross-attention layers" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("words, expect", [("<a>+<a>", "repeat a word"), ("<a>+plain", "must look like '<name>'")])
def test_bad_concept_words_refused(tiny_sd, tmp_path, capsys, words, expect):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(_train_args(tiny_sd, ASSETS / "robot", out, words), capsys, expect)
    assert (out / "keep.txt").read_text() == "mine"


def test_caption_without_placeholder_refused(tiny_sd, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(ASSETS / "robot", data)
    (data / "2.txt").write_text("a robot without its token")
    _fails(_train_args(tiny_sd, data, tmp_path / "out", "<r1>+<r2>"), capsys, "caption of '2.png'")
    assert not (tmp_path / "out").exists()


def test_finished_run_kept_without_overwrite(two_edloras, tiny_sd, capsys):
    robot, _ = two_edloras
    before = (robot / edlora.EDLORA_FILE).read_bytes()
    _fails(_train_args(tiny_sd, ASSETS / "robot", robot, "<robot1>+<robot2>"), capsys, "already holds a finished run")
    assert (robot / edlora.EDLORA_FILE).read_bytes() == before


def test_config_refuses_mismatched_initializer():
    with pytest.raises(UserError, match="one entry per concept word"):
        edlora.EDLoRAConfig(pretrained_model_name_or_path="m", instance_data_dir="d", concept_words="<a>+<b>",
                            initializer="rand").validate()


# ---- divergence and checkpoints: the DreamBooth rules hold here too ----------------------------------


def test_nan_loss_stops_and_names_a_finite_checkpoint(tiny_sd, tmp_path, capsys, monkeypatch):
    from difflora.train import engine

    real, calls = engine.diffusion_loss, [0]

    def nan_from_the_second_step(*args, **kwargs):
        calls[0] += 1
        value = real(*args, **kwargs)
        return value * math.nan if calls[0] >= 2 else value

    monkeypatch.setattr(engine, "diffusion_loss", nan_from_the_second_step)
    out = tmp_path / "out"
    _fails([*_train_args(tiny_sd, ASSETS / "robot", out, "<r1>+<r2>"), "--checkpointing_steps", "1"], capsys,
           "the loss became nan at step 2; the last good checkpoint is checkpoint-1")
    assert all(torch.isfinite(v).all() for v in load_file(out / "checkpoint-1" / "weights.safetensors").values())
    assert not (out / edlora.EDLORA_FILE).exists()


def test_pickled_checkpoint_is_refused_and_never_unpickled(tiny_sd, tmp_path, capsys):
    import builtins
    import pickle

    class Payload:
        def __reduce__(self):
            return builtins.open, (str(tmp_path / "pwned"), "w")

    out = tmp_path / "out"
    args = [*_train_args(tiny_sd, ASSETS / "robot", out, "<r1>+<r2>"), "--checkpointing_steps", "1",
            "--max_train_steps", "2", "--num_validation_images", "0"]
    cli_main(args)
    for stem in ("optimizer", "scheduler"):
        (out / "checkpoint-1" / f"{stem}.json").unlink()
        (out / "checkpoint-1" / f"{stem}.pt").write_bytes(pickle.dumps(Payload()))
    _fails([*args, "--resume_from_checkpoint", "checkpoint-1"], capsys, "old pickle format")
    assert not (tmp_path / "pwned").exists()


def test_config_refuses_nan_max_grad_norm():
    with pytest.raises(UserError, match="--max_grad_norm must be a finite number"):
        edlora.EDLoRAConfig(pretrained_model_name_or_path="m", instance_data_dir="d", initializer="rand+rand",
                            max_grad_norm=math.nan).validate()


def test_dora_concept_trains_and_fuses_against_the_base_weight(tiny_sd, tmp_path):
    """ED-LoRA with --use_dora: the concept file keeps the magnitudes, and fusing it alone (average
    of one concept) writes exactly W0 + its renormalised DoRA update, not the plain B A update."""
    from diffusers import StableDiffusionPipeline

    from difflora.lora_io import live_path, lora_deltas, module_names

    out = tmp_path / "star"
    cli_main(_train_args(tiny_sd, ASSETS / "checkered_star", out, "<star1>+<star2>", "--use_dora",
                         "--max_train_steps", "2", init="rand+star", placeholder="sks"))
    data = edlora.load_edlora(out)
    assert any("lora_magnitude_vector" in k for k in data.lora)
    concepts = tmp_path / "concepts.yaml"
    concepts.write_text(f"- lora: {out}\n")
    fused = tmp_path / "fused"
    cli_main(["fuse", "--concepts", str(concepts), "--pretrained_model_name_or_path", str(tiny_sd),
              "--output_dir", str(fused), "--method", "average", "--sample_steps", "1",
              "--prompt_templates", "a photo of {}"])
    base = _base(tiny_sd)
    layers = lora_deltas(data.lora, module_names(base), metadata=data.metadata["header"])
    key = next(k for k, v in layers.items() if k.startswith("unet.") and v.magnitude is not None)
    path = key.partition(".")[2]
    w0 = base.unet.get_submodule(path).weight.detach()
    got = StableDiffusionPipeline.from_pretrained(fused, safety_checker=None, requires_safety_checker=False) \
        .unet.get_submodule(live_path(base.unet, path)).weight.detach()
    layer = layers[key]
    torch.testing.assert_close(got, w0 + layer.delta(w0), rtol=1e-5, atol=1e-6)
    plain = w0 + layer.scale * layer.up.float() @ layer.down.float()
    assert (got - plain).abs().max() > 1e-4  # the magnitude mattered
