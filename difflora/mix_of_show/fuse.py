"""``difflora fuse``: gradient fusion of many concept LoRAs into one Stable Diffusion folder.

Stages follow Mix-of-Show, because each stage's inputs depend on the previous one's result:

1. text encoder: every LoRA layer of the text encoder, inputs recorded while each concept's own
   (LoRA-merged) text encoder encodes that concept's prompts;
2. UNet cross-attention keys / values: inputs are the *fused* text encoder's outputs for each
   concept's prompts (so the UNet reads what the fused encoder really produces);
3. every other UNet LoRA layer: inputs recorded while sampling each concept's prompts with that
   concept's own weights.

Inputs are never stored: forward pre-hooks stream them into per-layer Gram sums
(:mod:`difflora.mix_of_show.fusion`), so memory does not grow with steps or prompts.
The output is a diffusers folder (``StableDiffusionPipeline.from_pretrained`` loads it) plus
``concepts.json`` (concept words -> the tokens the samplers use) and ``fusion_report.json``
(per-layer errors of the fused weight vs averaging).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from difflora.config import config_to_dict, parse_config
from difflora.errors import UserError
from difflora.lora_io import LoraLayer, _live_path, _module_names, _read, check_fits, lora_deltas
from difflora.mix_of_show import edlora
from difflora.mix_of_show.fusion import (
    DEFAULT_RIDGE,
    GramAccumulator,
    average_weight,
    layer_rows,
    solve_lbfgs,
)

logger = logging.getLogger(__name__)

CONCEPTS_FILE = "concepts.json"
REPORT_FILE = "fusion_report.json"
DEFAULT_TEMPLATES = ["a photo of {}", "{} on the beach", "a painting of {}", "{} in the snow"]


@dataclass
class FuseConfig:
    """Fuse several concept LoRAs (diffusers / kohya / peft LoRAs with trigger words) into one model."""

    concepts: str = field(metadata={"help": "YAML list of {lora: PATH, words: '<w1>+<w2>', scale: 1.0}"})
    pretrained_model_name_or_path: str = field(metadata={"help": "base model folder the concepts were trained on"})
    output_dir: str = field(metadata={"help": "folder for the fused pipeline; must be empty or absent"})
    method: Literal["closed_form", "lbfgs", "average"] = field(
        default="closed_form",
        metadata={"help": "closed_form: streamed Gram solve; lbfgs: Mix-of-Show's iterative solve (stores "
                          "activations); average: W0 + mean of the deltas"})
    ridge: float = field(default=DEFAULT_RIDGE, metadata={
        "help": "pull toward the base weight, relative to the mean input energy of each layer"})
    prompt_templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES), metadata={
        "help": "prompts per concept, '{}' replaced by the concept words"})
    sample_steps: int = field(default=20, metadata={
        "help": "denoising steps per prompt while recording UNet inputs (more steps: more timesteps covered)"})
    guidance_scale: float = field(default=7.5, metadata={"help": "guidance while recording UNet inputs"})
    resolution: int | None = field(default=None, metadata={"help": "sampling size in pixels (default: model's)"})
    lbfgs_steps: int = field(default=500, metadata={"help": "LBFGS iterations per layer (method lbfgs)"})
    seed: int = field(default=0, metadata={"help": "seed of the recording samples"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output_dir"})

    def validate(self) -> None:
        if self.ridge < 0:
            raise UserError(f"ridge must be >= 0, got {self.ridge}")
        if self.sample_steps < 1:
            raise UserError(f"sample_steps must be >= 1, got {self.sample_steps}")
        if not self.prompt_templates or any("{}" not in t for t in self.prompt_templates):
            raise UserError("every prompt template needs a '{}' where the concept words go, e.g. 'a photo of {}'")


@dataclass
class Concept:
    """One concept to fuse: its LoRA layers, trigger words and scale."""

    name: str
    words: list[str]
    layers: dict[str, LoraLayer]
    scale: float = 1.0
    source: str = ""
    # word -> the token strings that stand for it in prompts (plain LoRAs: the word itself;
    # ED-LoRA: one token per cross-attention layer).
    tokens: dict[str, list[str]] = field(default_factory=dict)
    # ED-LoRA only: word -> (layers, width) token embeddings, and words renamed to avoid a clash.
    embeddings: dict[str, torch.Tensor] | None = None
    renamed: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The words as they appear in a prompt."""
        return " ".join(self.words)


def split_words(words: str) -> list[str]:
    """``"<w1>+<w2>"`` -> ``["<w1>", "<w2>"]``."""
    out = [w.strip() for w in str(words).split("+") if w.strip()]
    if not out:
        raise UserError(f"concept words {words!r} are empty; write them like '<potter1>+<potter2>'")
    return out


def _concept_entries(path: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"concepts file '{p}' does not exist; pass a YAML list of {{lora, words, scale}}")
    import yaml

    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"concepts file '{p}' is not valid YAML ({str(err).splitlines()[0]})") from None
    if isinstance(data, dict) and "concepts" in data:
        data = data["concepts"]
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise UserError(f"concepts file '{p}' must be a non-empty list of {{lora: PATH, words: ..., scale: 1.0}}")
    for i, entry in enumerate(data):
        unknown = set(entry) - {"lora", "words", "scale", "name"}
        if unknown or "lora" not in entry:
            raise UserError(f"concept {i + 1} in '{p}' needs 'lora' and may have words, scale, name "
                            f"(got {sorted(entry)})")
        lora = Path(str(entry["lora"]))
        if not lora.is_absolute():
            entry["lora"] = str((p.parent / lora) if (p.parent / lora).exists() else lora)
    return data


def load_concepts(path: str, pipe: Any) -> list[Concept]:
    """Read the concepts YAML, check every file fits ``pipe`` and that no two concepts share words."""
    names = _module_names(pipe)
    concepts: list[Concept] = []
    for i, entry in enumerate(_concept_entries(path)):
        try:
            scale = float(entry.get("scale", 1.0))
        except (TypeError, ValueError):
            raise UserError(f"concept {i + 1}: scale must be a number, got {entry.get('scale')!r}") from None
        if edlora.is_edlora_file(entry["lora"]):
            concepts.append(_edlora_concept(i, entry, scale, pipe, names))
            continue
        state, fmt, header, file = _read(entry["lora"])
        if "words" not in entry:
            raise UserError(f"concept {i + 1}: '{file}' is a plain LoRA; give its trigger words, "
                            "e.g. words: 'sks dog'")
        words = split_words(entry["words"])
        layers = lora_deltas(state, names, metadata=header)
        concept = Concept(name=str(entry.get("name") or file.parent.name or file.stem), words=words,
                          layers=layers, scale=scale, source=str(file), tokens={w: [w] for w in words})
        check_fits(concept.layers, pipe, source=f"concept {i + 1} ('{file}')")
        concepts.append(concept)
    _resolve_word_clashes(concepts, set(pipe.tokenizer.get_vocab()))
    install_concept_tokens(pipe, concepts)
    return concepts


def _edlora_concept(i: int, entry: dict[str, Any], scale: float, pipe: Any, names: dict[str, list[str]]) -> Concept:
    """An ED-LoRA concept file: words, layer-wise tokens and embeddings come from the file."""
    file = Path(entry["lora"])
    file = file / edlora.EDLORA_FILE if file.is_dir() else file
    data = edlora.load_edlora(file)
    source = f"concept {i + 1} ('{file}')"
    edlora.check_base_model(data, pipe.unet, pipe.text_encoder, source)
    words, embeddings = data.words, data.embeddings
    if "words" in entry:  # the user renames the concept's words
        new = edlora.parse_words(entry["words"])
        if len(new) != len(words):
            raise UserError(f"{source} has {len(words)} words ({'+'.join(words)}); 'words' must rename all of them")
        embeddings = {n: embeddings[w] for n, w in zip(new, words)}
        words = new
    layers = lora_deltas(data.lora, names, metadata=data.metadata["header"]) if data.lora else {}
    num_layers = len(data.layers)
    concept = Concept(name=str(entry.get("name") or (file.parent.name if file.name == edlora.EDLORA_FILE
                                                     else file.stem)),
                      words=words, layers=layers, scale=scale, source=str(file),
                      tokens={w: edlora.layer_tokens(w, num_layers) for w in words}, embeddings=embeddings)
    check_fits(concept.layers, pipe, source=source)
    return concept


def _rename(word: str, taken: set[str]) -> str:
    """``<cat>`` -> ``<cat_2>``, ``<cat_3>``... the first that is free (Mix-of-Show re-indexes)."""
    k = 2
    while f"{word[:-1]}_{k}>" in taken:
        k += 1
    return f"{word[:-1]}_{k}>"


def _resolve_word_clashes(concepts: list[Concept], vocab: set[str]) -> None:
    """Refuse two plain concepts that share a word; re-index clashing ED-LoRA words.

    A plain LoRA's trigger word is ordinary text: the same word in two concepts would reach the
    fused model as identical inputs and the concepts would silently blur into one, so the user
    must rename it. An ED-LoRA word stands for new tokens, so a clash is resolved by renaming it
    (``<cat>`` -> ``<cat_2>``), logged and recorded in ``concepts.json``.
    """
    seen: dict[str, int] = {}
    for ci, concept in enumerate(concepts):
        if concept.embeddings is not None:
            continue
        for word in concept.words:
            if word in seen:
                raise UserError(f"concepts {seen[word] + 1} and {ci + 1} both use the word '{word}'; give one of "
                                "them other trigger words in the concepts file")
            seen[word] = ci
    taken = set(seen)
    for concept in concepts:
        if concept.embeddings is None:
            continue
        for word in list(concept.words):
            tokens = concept.tokens[word]
            if word in taken or any(t in vocab for t in tokens):
                new = _rename(word, taken | {w for c in concepts for w in c.words})
                while any(t in vocab for t in edlora.layer_tokens(new, len(tokens))):
                    new = _rename(new, taken | {new})
                logger.warning("concept '%s': word %s is already used; renamed to %s", concept.name, word, new)
                concept.words[concept.words.index(word)] = new
                concept.tokens = {(new if w == word else w): (edlora.layer_tokens(new, len(tokens)) if w == word
                                                              else t) for w, t in concept.tokens.items()}
                concept.embeddings = {(new if w == word else w): e for w, e in concept.embeddings.items()}
                concept.renamed[word] = new
                word = new
            taken.add(word)


def install_concept_tokens(pipe: Any, concepts: list[Concept]) -> None:
    """Add every ED-LoRA concept's layer-wise tokens to the pipeline's tokenizer and text encoder."""
    rows: dict[str, torch.Tensor] = {}
    for concept in concepts:
        for word, emb in (concept.embeddings or {}).items():
            rows.update(zip(concept.tokens[word], emb))
    if not rows:
        return
    pipe.tokenizer.add_tokens(list(rows))
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    table = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token, row in rows.items():
            table[pipe.tokenizer.convert_tokens_to_ids(token)] = row.to(table)


# ----------------------------------------------------------------------------------------------
# The fusion stages
# ----------------------------------------------------------------------------------------------


class _Weights:
    """Base weights of every fused layer, and setting a layer to base / concept / fused values."""

    def __init__(self, pipe: Any, keys: list[str]):
        self.modules = {}
        for key in keys:
            component, _, path = key.partition(".")
            model = getattr(pipe, component)
            self.modules[key] = model.get_submodule(_live_path(model, path))
        self.base = {k: m.weight.detach().clone() for k, m in self.modules.items()}
        self.fused: dict[str, torch.Tensor] = {}

    def merged(self, concept: Concept, key: str) -> torch.Tensor:
        base = self.base[key]
        if key not in concept.layers:
            return base
        return base + concept.scale * concept.layers[key].delta().to(base)

    @torch.no_grad()
    def set(self, key: str, weight: torch.Tensor) -> None:
        module = self.modules[key]
        module.weight.copy_(weight.reshape(module.weight.shape).to(module.weight))

    def use_concept(self, concept: Concept, keys: list[str]) -> None:
        for k in keys:
            self.set(k, self.merged(concept, k))

    def use_fused(self, keys: list[str]) -> None:
        for k in keys:
            self.set(k, self.fused.get(k, self.base[k]))


def _record(weights: _Weights, keys: list[str], concepts: list[Concept], run: Callable[[Concept], None],
            keep_rows: bool, stage: str) -> dict[str, GramAccumulator]:
    """Run ``run(concept)`` for each concept with hooks streaming the inputs of ``keys``."""
    accs = {k: GramAccumulator(weights.base[k], keep_rows=keep_rows) for k in keys}
    for concept in tqdm(concepts, desc=f"{stage}: recording", unit="concept"):
        for k in keys:
            accs[k].begin(weights.merged(concept, k))
        handles = [
            weights.modules[k].register_forward_pre_hook(
                lambda mod, args, k=k: accs[k].add(layer_rows(mod, args[0])))
            for k in keys
        ]
        try:
            with torch.no_grad():
                run(concept)
        finally:
            for h in handles:
                h.remove()
        for k in keys:
            accs[k].end()
    return accs


def _solve(weights: _Weights, accs: dict[str, GramAccumulator], cfg: FuseConfig, concepts: list[Concept],
           stage: str, report: dict[str, Any]) -> None:
    for key in tqdm(list(accs), desc=f"{stage}: solving", unit="layer"):
        acc = accs[key]
        targets = [weights.merged(c, key) for c in concepts]
        avg = average_weight(weights.base[key], targets)
        if cfg.method == "closed_form":
            w = acc.solve(cfg.ridge)
        elif cfg.method == "lbfgs":
            w = solve_lbfgs(acc, steps=cfg.lbfgs_steps, ridge=cfg.ridge)
        else:
            w = avg
        weights.fused[key] = w.reshape(weights.base[key].shape).to(weights.base[key])
        weights.set(key, weights.fused[key])
        report[key] = {"stage": stage, "error": acc.errors(w), "average_error": acc.errors(avg)}


def encode_prompts(pipe: Any, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states for ``prompts``, padded to the tokenizer's length."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(pipe.device)
    return pipe.text_encoder(ids)[0]


def _prompts(concept: Concept, cfg: FuseConfig) -> list[str]:
    return [t.format(concept.text) for t in cfg.prompt_templates]


class _Text:
    """Encodes prompts for the fusion stages, layer-wise when any concept has layer-wise tokens."""

    def __init__(self, pipe: Any, concepts: list[Concept]):
        self.pipe = pipe
        self.tokens = {w: t for c in concepts for w, t in c.tokens.items()}
        self.layerwise = edlora.is_layerwise(self.tokens)
        self.layers = edlora.cross_attention_layers(pipe.unet) if self.layerwise else []
        self.seq_len = pipe.tokenizer.model_max_length

    def encode(self, prompts: list[str]) -> torch.Tensor:
        if not self.layerwise:
            return encode_prompts(self.pipe, prompts)
        return edlora.encode_layerwise(self.pipe.tokenizer, self.pipe.text_encoder, prompts, self.tokens,
                                       len(self.layers))

    def for_layer(self, hidden: torch.Tensor, key: str) -> torch.Tensor:
        """The slice of a (layer-wise) encoding that the cross-attention layer of ``key`` reads."""
        if not self.layerwise:
            return hidden
        i = self.layers.index(key[len("unet."):].rsplit(".", 1)[0])
        return hidden[:, i * self.seq_len:(i + 1) * self.seq_len]


def _is_kv(key: str) -> bool:
    return key.startswith("unet.") and bool(re.search(r"attn2\.to_[kv]$", key))


def fuse(cfg: FuseConfig) -> dict[str, Any]:
    """Run the three fusion stages and write the fused pipeline; returns a summary."""
    from diffusers import StableDiffusionPipeline

    out = Path(cfg.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise UserError(f"'{out}' is not empty; choose another output_dir or pass --overwrite")
    _concept_entries(cfg.concepts)  # a bad concepts file fails before the slow model load
    if not Path(cfg.pretrained_model_name_or_path).is_dir():
        raise UserError(f"base model '{cfg.pretrained_model_name_or_path}' is not a folder; pass a local "
                        "diffusers model folder")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            cfg.pretrained_model_name_or_path, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load base model '{cfg.pretrained_model_name_or_path}' "
                        f"({str(err).splitlines()[0]}); pass a Stable Diffusion 1.x/2.x folder") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.to(cfg.device)
    concepts = load_concepts(cfg.concepts, pipe)

    keys = sorted({k for c in concepts for k in c.layers})
    te_keys = [k for k in keys if k.startswith("text_encoder.")]
    kv_keys = [k for k in keys if _is_kv(k)]
    other_keys = [k for k in keys if k.startswith("unet.") and k not in kv_keys]
    weights = _Weights(pipe, keys)
    keep_rows = cfg.method == "lbfgs"
    report: dict[str, Any] = {}
    text = _Text(pipe, concepts)

    def encode(concept: Concept) -> torch.Tensor:
        return text.encode(_prompts(concept, cfg))

    if te_keys:
        def run_te(concept: Concept) -> None:
            weights.use_concept(concept, te_keys)
            encode(concept)
        accs = _record(weights, te_keys, concepts, run_te, keep_rows, "text encoder")
        _solve(weights, accs, cfg, concepts, "text encoder", report)

    if kv_keys:
        def run_kv(concept: Concept) -> None:
            hidden = encode(concept)  # the fused text encoder's outputs
            for k in kv_keys:
                weights.modules[k](text.for_layer(hidden, k))
        accs = _record(weights, kv_keys, concepts, run_kv, keep_rows, "cross-attention k/v")
        _solve(weights, accs, cfg, concepts, "cross-attention k/v", report)

    if other_keys:
        size = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor

        def run_unet(concept: Concept) -> None:
            weights.use_concept(concept, keys)
            embeds = encode(concept)
            negative = text.encode([""] * len(embeds))
            g = torch.Generator(pipe.device).manual_seed(cfg.seed)
            pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=cfg.sample_steps,
                 guidance_scale=cfg.guidance_scale, height=size, width=size, generator=g, output_type="latent")
        original = edlora.install_layerwise(pipe.unet, text.seq_len) if text.layerwise else None
        try:
            accs = _record(weights, other_keys, concepts, run_unet, keep_rows, "UNet")
        finally:
            if original is not None:
                pipe.unet.set_attn_processor(original)
        weights.use_fused(te_keys + kv_keys)
        _solve(weights, accs, cfg, concepts, "UNet", report)
    weights.use_fused(keys)

    concept_cfg = {"base_model": str(cfg.pretrained_model_name_or_path), "layerwise": text.layerwise,
                   "layers": text.layers, "concepts": [
        {"name": c.name, "words": c.words, "tokens": c.tokens, "source": c.source, "scale": c.scale,
         "kind": "edlora" if c.embeddings is not None else "lora", **({"renamed": c.renamed} if c.renamed else {})}
        for c in concepts]}
    summary = _write(pipe, out, concept_cfg, report, cfg)
    return summary


def _write(pipe: Any, out: Path, concept_cfg: dict, report: dict, cfg: FuseConfig) -> dict[str, Any]:
    """Write into a temporary sibling folder, then move it into place (never a half-written model)."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / CONCEPTS_FILE).write_text(json.dumps(concept_cfg, indent=2))
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        summary = {
            "output_dir": str(out), "method": cfg.method, "layers": len(report),
            "mean_error": mean([mean(r["error"]) for r in report.values()]),
            "mean_average_error": mean([mean(r["average_error"]) for r in report.values()]),
        }
        (tmp / REPORT_FILE).write_text(json.dumps(
            {"summary": summary, "config": config_to_dict(cfg), "layers": report}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(FuseConfig, argv, prog="difflora fuse")
    summary = fuse(cfg)
    print(f"fused {summary['layers']} layers with {summary['method']}: mean per-concept error "
          f"{summary['mean_error']:.4f} (averaging: {summary['mean_average_error']:.4f}); wrote {summary['output_dir']}")


__all__ = ["Concept", "FuseConfig", "fuse", "load_concepts", "main", "split_words", "encode_prompts"]
