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
SD 1.x / 2.x and SDXL base models: every text encoder of the family is fused (SDXL: both), and
prompts are encoded by the family's recipe (SDXL: both encoders' states plus the pooled embedding).
The output is a diffusers folder (the family's pipeline ``from_pretrained`` loads it) plus
``concepts.json`` (concept words -> the tokens the samplers use) and ``fusion_report.json``
(per-layer errors of the fused weight vs averaging).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from difflora.config import check_device, check_image_size, config_to_dict, parse_config, read_text
from difflora.errors import UserError
from difflora.families import Conditioning, ModelFamily, family_of_folder, family_of_pipeline
from difflora.lora_io import LoraLayer, check_fits, live_path, lora_deltas, module_names, read_lora_file
from difflora.mix_of_show import edlora
from difflora.mix_of_show.fusion import (
    DEFAULT_RIDGE,
    GramAccumulator,
    average_weight,
    layer_rows,
    solve_lbfgs,
)
from difflora.output_dir import (
    MIN_FREE_BYTES,
    Outputs,
    check_removable,
    claim_outputs,
    output_job,
    owned_entries,
    prepare_output_dir,
    remove_entry,
)

logger = logging.getLogger(__name__)

CONCEPTS_FILE = "concepts.json"
REPORT_FILE = "fusion_report.json"
INDEX_FILE = "model_index.json"
# Everything a fusion writes at the top of output_dir: what --overwrite replaces, and nothing else.
OUTPUTS = Outputs("fuse", (INDEX_FILE, "unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                           "scheduler", "safety_checker", "feature_extractor", "image_encoder", CONCEPTS_FILE,
                           REPORT_FILE),
                  recognise=lambda out: (out / REPORT_FILE).is_file() and (out / CONCEPTS_FILE).is_file())
DEFAULT_TEMPLATES = ["a photo of {}", "{} on the beach", "a painting of {}", "{} in the snow"]


@dataclass
class FuseConfig:
    """Fuse several concept LoRAs (diffusers / kohya / peft LoRAs with trigger words) into one model."""

    concepts: str = field(metadata={"help": "YAML list of {lora: PATH, words: '<w1>+<w2>', scale: 1.0}"})
    pretrained_model_name_or_path: str = field(metadata={"help": "base model folder the concepts were trained on"})
    output_dir: str = field(metadata={"help": "folder for the fused pipeline; must be empty or absent unless "
                                              "--overwrite"})
    method: Literal["closed_form", "lbfgs", "average"] = field(
        default="closed_form",
        metadata={"help": "closed_form: streamed Gram solve; lbfgs: Mix-of-Show's iterative solve (stores "
                          "activations); average: W0 + mean of the deltas"})
    ridge: float = field(default=DEFAULT_RIDGE, metadata={
        "help": "pull toward the base weight, relative to the mean input energy of each layer; 0 keeps the "
                "base weight exactly on inputs no concept produces"})
    concept_weighting: Literal["equal", "rows"] = field(default="equal", metadata={
        "help": "equal: each concept's error is averaged over its own recorded inputs, so every concept counts "
                "the same however many prompts, tokens or steps recorded it; rows: errors summed over all "
                "inputs (Mix-of-Show's objective), so a concept with more inputs weighs more"})
    prompt_templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES), metadata={
        "help": "prompts per concept, '{}' replaced by the concept words"})
    sample_steps: int = field(default=20, metadata={
        "help": "denoising steps per prompt while recording UNet inputs (more steps: more timesteps covered)"})
    guidance_scale: float = field(default=7.5, metadata={"help": "guidance while recording UNet inputs"})
    resolution: int | None = field(default=None, metadata={"help": "sampling size in pixels (default: model's)"})
    lbfgs_steps: int = field(default=500, metadata={"help": "LBFGS iterations per layer (method lbfgs)"})
    seed: int = field(default=0, metadata={"help": "seed of the recording samples"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    overwrite: bool = field(default=False, metadata={
        "help": "write into a non-empty output_dir, replacing an earlier fused model (other files are kept)"})

    def validate(self) -> None:
        if self.ridge < 0:
            raise UserError(f"ridge must be >= 0, got {self.ridge}")
        if self.sample_steps < 1:
            raise UserError(f"sample_steps must be >= 1, got {self.sample_steps}")
        if self.lbfgs_steps < 1:
            raise UserError(f"lbfgs_steps must be >= 1, got {self.lbfgs_steps}")
        if not self.prompt_templates or any("{}" not in t for t in self.prompt_templates):
            raise UserError("every prompt template needs a '{}' where the concept words go, e.g. 'a photo of {}'")
        for t in self.prompt_templates:
            try:
                t.format("x")
            except (IndexError, KeyError, ValueError):
                raise UserError(f"prompt template {t!r} may hold only '{{}}' as a placeholder; write other "
                                "braces as '{{' and '}}'") from None
        check_image_size(self.resolution, self.resolution, ("--resolution", "--resolution"))


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
    # ED-LoRA only: per text encoder, word -> (layers, width) token embeddings; words renamed to
    # avoid a clash.
    embeddings: list[dict[str, torch.Tensor]] | None = None
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


def _scale(value: Any, where: str) -> float:
    """A concept's scale: a finite number (checked before any model is loaded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{where}: scale must be a number, got {value!r}")
    try:
        scale = float(value)
    except ValueError:
        raise UserError(f"{where}: scale must be a number, got {value!r}") from None
    if not math.isfinite(scale):
        raise UserError(f"{where}: scale must be a finite number, got {value!r}; e.g. scale: 1.0")
    return scale


def _concept_entries(path: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"concepts file '{p}' does not exist; pass a YAML list of {{lora, words, scale}}")
    import yaml

    try:
        data = yaml.safe_load(read_text(p, "concepts file"))
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
                            f"(got {sorted(map(str, entry))})")
        entry["scale"] = _scale(entry.get("scale", 1.0), f"concept {i + 1} in '{p}'")
        for key in ("lora", "words", "name"):  # plain text (a bare number is read as its text)
            if key in entry and (isinstance(entry[key], (bool, dict, list)) or entry[key] is None):
                raise UserError(f"concept {i + 1} in '{p}': '{key}' must be text, got {entry[key]!r}")
            if key in entry:
                entry[key] = str(entry[key])
        lora = Path(str(entry["lora"]))
        if not lora.is_absolute():
            entry["lora"] = str((p.parent / lora) if (p.parent / lora).exists() else lora)
        if not Path(entry["lora"]).exists():
            raise UserError(f"concept {i + 1} in '{p}': LoRA '{lora}' does not exist (relative paths are read "
                            "from the concepts file's folder or the current one)")
    return data


def load_concepts(path: str, pipe: Any) -> list[Concept]:
    """Read the concepts YAML, check every file fits ``pipe`` and that no two concepts share words."""
    names = module_names(pipe)
    concepts: list[Concept] = []
    for i, entry in enumerate(_concept_entries(path)):
        scale = entry["scale"]
        if edlora.is_edlora_file(entry["lora"]):
            concepts.append(_edlora_concept(i, entry, scale, pipe, names))
            continue
        state, fmt, header, file = read_lora_file(entry["lora"])
        if "words" not in entry:
            raise UserError(f"concept {i + 1}: '{file}' is a plain LoRA; give its trigger words, "
                            "e.g. words: 'sks dog'")
        words = split_words(entry["words"])
        layers = lora_deltas(state, names, metadata=header)
        concept = Concept(name=str(entry.get("name") or file.parent.name or file.stem), words=words,
                          layers=layers, scale=scale, source=str(file), tokens={w: [w] for w in words})
        check_fits(concept.layers, pipe, source=f"concept {i + 1} ('{file}')")
        concepts.append(concept)
    family = family_of_pipeline(pipe)
    _resolve_word_clashes(concepts, {t for tok in family.tokenizers_of(pipe) for t in tok.get_vocab()})
    install_concept_tokens(pipe, concepts)
    return concepts


def _edlora_concept(i: int, entry: dict[str, Any], scale: float, pipe: Any, names: dict[str, list[str]]) -> Concept:
    """An ED-LoRA concept file: words, layer-wise tokens and embeddings come from the file."""
    file = Path(entry["lora"])
    file = file / edlora.EDLORA_FILE if file.is_dir() else file
    data = edlora.load_edlora(file)
    source = f"concept {i + 1} ('{file}')"
    edlora.check_base_model(data, pipe.unet, family_of_pipeline(pipe).text_encoders_of(pipe), source)
    words, embeddings = data.words, data.all_embeddings
    if "words" in entry:  # the user renames the concept's words
        new = edlora.parse_words(entry["words"])
        if len(new) != len(words):
            raise UserError(f"{source} has {len(words)} words ({'+'.join(words)}); 'words' must rename all of them")
        embeddings = [{n: table[w] for n, w in zip(new, words)} for table in embeddings]
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
                concept.embeddings = [{(new if w == word else w): e for w, e in table.items()}
                                      for table in concept.embeddings]
                concept.renamed[word] = new
                word = new
            taken.add(word)


def install_concept_tokens(pipe: Any, concepts: list[Concept]) -> None:
    """Add every ED-LoRA concept's layer-wise tokens to each tokenizer / text encoder pair of the
    pipeline, with that encoder's rows from the concept file (SDXL: both encoders)."""
    family = family_of_pipeline(pipe)
    for i, (tokenizer, encoder) in enumerate(zip(family.tokenizers_of(pipe), family.text_encoders_of(pipe))):
        rows: dict[str, torch.Tensor] = {}
        for concept in concepts:
            for word, emb in (concept.embeddings[i] if concept.embeddings else {}).items():
                rows.update(zip(concept.tokens[word], emb))
        if not rows:
            continue
        tokenizer.add_tokens(list(rows))
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = encoder.get_input_embeddings().weight
        with torch.no_grad():
            for token, row in rows.items():
                table[tokenizer.convert_tokens_to_ids(token)] = row.to(table)


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
            self.modules[key] = model.get_submodule(live_path(model, path))
        self.base = {k: m.weight.detach().clone() for k, m in self.modules.items()}
        self.fused: dict[str, torch.Tensor] = {}

    def merged(self, concept: Concept, key: str) -> torch.Tensor:
        base = self.base[key]
        if key not in concept.layers:
            return base
        # A DoRA layer's update is renormalised against the base weight, so it is computed from it.
        return base + concept.scale * concept.layers[key].delta(base).to(base)

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
        acc.weighting = cfg.concept_weighting
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
    """Encodes prompts for the fusion stages by the family's recipe, layer-wise when any concept has
    layer-wise tokens."""

    def __init__(self, pipe: Any, concepts: list[Concept], family: ModelFamily):
        self.pipe, self.family = pipe, family
        self.tokens = {w: t for c in concepts for w, t in c.tokens.items()}
        self.layerwise = edlora.is_layerwise(self.tokens)
        self.layers = edlora.cross_attention_layers(pipe.unet) if self.layerwise else []
        self.seq_len = pipe.tokenizer.model_max_length

    def encode(self, prompts: list[str]) -> Conditioning:
        return edlora.layerwise_conditioning(self.family, self.family.tokenizers_of(self.pipe),
                                             self.family.text_encoders_of(self.pipe), prompts, self.tokens,
                                             max(len(self.layers), 1), device=self.pipe.device)

    def for_layer(self, hidden: torch.Tensor, key: str) -> torch.Tensor:
        """The slice of a (layer-wise) encoding that the cross-attention layer of ``key`` reads."""
        if not self.layerwise:
            return hidden
        i = self.layers.index(key[len("unet."):].rsplit(".", 1)[0])
        return hidden[:, i * self.seq_len:(i + 1) * self.seq_len]


def _is_kv(key: str) -> bool:
    return key.startswith("unet.") and bool(re.search(r"attn2\.to_[kv]$", key))


def _largest_file(folder: Path) -> int:
    """Size of the biggest weight file under ``folder``: a lower bound of what a fused model takes."""
    sizes = [p.stat().st_size for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file()]
    return max(sizes, default=0)


@output_job
def fuse(cfg: FuseConfig) -> dict[str, Any]:
    """Run the three fusion stages and write the fused pipeline; returns a summary."""
    check_device(cfg.device)
    out = Path(cfg.output_dir)
    entries = _concept_entries(cfg.concepts)  # a bad concepts file fails before the slow model load
    base_dir = Path(cfg.pretrained_model_name_or_path)
    if not base_dir.is_dir():
        raise UserError(f"base model '{cfg.pretrained_model_name_or_path}' is not a folder; pass a local "
                        "diffusers model folder")
    inputs = [base_dir, Path(cfg.concepts), *(Path(e["lora"]) for e in entries)]
    # Every refusal about the output folder (in use, not writable, full, not ours) before the model loads.
    prepare_output_dir(out, OUTPUTS, overwrite=cfg.overwrite, clear=False, empty_unless_overwrite=True, lock=True,
                       inputs=inputs, need_bytes=max(MIN_FREE_BYTES, _largest_file(base_dir)))
    family = family_of_folder(base_dir)
    try:
        pipe = family.load_pipeline(cfg.pretrained_model_name_or_path)
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load base model '{cfg.pretrained_model_name_or_path}' "
                        f"({first}); pass a Stable Diffusion 1.x/2.x or SDXL folder") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.to(cfg.device)
    concepts = load_concepts(cfg.concepts, pipe)

    keys = sorted({k for c in concepts for k in c.layers})
    te_keys = [k for k in keys if not k.startswith("unet.")]  # every text encoder (SDXL: both)
    kv_keys = [k for k in keys if _is_kv(k)]
    other_keys = [k for k in keys if k.startswith("unet.") and k not in kv_keys]
    weights = _Weights(pipe, keys)
    keep_rows = cfg.method == "lbfgs"
    report: dict[str, Any] = {}
    text = _Text(pipe, concepts, family)

    def encode(concept: Concept) -> Conditioning:
        return text.encode(_prompts(concept, cfg))

    if te_keys:
        def run_te(concept: Concept) -> None:
            weights.use_concept(concept, te_keys)
            encode(concept)
        accs = _record(weights, te_keys, concepts, run_te, keep_rows, "text encoder")
        _solve(weights, accs, cfg, concepts, "text encoder", report)

    if kv_keys:
        def run_kv(concept: Concept) -> None:
            hidden = encode(concept).hidden_states  # the fused text encoders' outputs
            for k in kv_keys:
                weights.modules[k](text.for_layer(hidden, k))
        accs = _record(weights, kv_keys, concepts, run_kv, keep_rows, "cross-attention k/v")
        _solve(weights, accs, cfg, concepts, "cross-attention k/v", report)

    if other_keys:
        size = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor

        def run_unet(concept: Concept) -> None:
            weights.use_concept(concept, keys)
            embeds = encode(concept)
            negative = text.encode([""] * len(embeds.hidden_states))
            g = torch.Generator(pipe.device).manual_seed(cfg.seed)
            pipe(**family.pipeline_embeds(embeds, negative), num_inference_steps=cfg.sample_steps,
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

    concept_cfg = {"base_model": str(cfg.pretrained_model_name_or_path), "family": family.name,
                   "layerwise": text.layerwise,
                   "layers": text.layers, "concepts": [
        {"name": c.name, "words": c.words, "tokens": c.tokens, "source": c.source, "scale": c.scale,
         "kind": "edlora" if c.embeddings is not None else "lora", **({"renamed": c.renamed} if c.renamed else {})}
        for c in concepts]}
    summary = _write(pipe, out, concept_cfg, report, cfg, inputs)
    return summary


def _write(pipe: Any, out: Path, concept_cfg: dict, report: dict, cfg: FuseConfig,
           inputs: list[Path]) -> dict[str, Any]:
    """Write the pipeline into a staging folder inside ``out``, then move its entries into place.

    Staging inside ``out`` (not beside it: ``out`` may be ``.`` or ``..``) keeps every move a rename on
    one disk. An earlier fused model stays until the new one is complete; then only its entries are
    removed (``model_index.json`` first) and the new ones moved in (``model_index.json`` last), so a
    kill midway leaves no folder that loads as a mix of two models. Other files in ``out`` are kept.
    """
    staging = out / f".fuse-staging.tmp-{os.getpid()}"
    remove_entry(staging)
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / CONCEPTS_FILE).write_text(json.dumps(concept_cfg, indent=2))
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        summary = {
            "output_dir": str(out), "method": cfg.method, "layers": len(report),
            "mean_error": mean([mean(r["error"]) for r in report.values()]),
            "mean_average_error": mean([mean(r["average_error"]) for r in report.values()]),
        }
        (staging / REPORT_FILE).write_text(json.dumps(
            {"summary": summary, "config": config_to_dict(cfg), "layers": report}, indent=1))
        new = sorted(staging.iterdir(), key=lambda p: (p.name == INDEX_FILE, p.name))
        outputs = OUTPUTS.with_names(*(p.name for p in new))
        old = owned_entries(out, OUTPUTS)
        check_removable(old, inputs)
        for path in sorted(old, key=lambda p: p.name != INDEX_FILE):
            remove_entry(path)
        for path in new:
            if (out / path.name).exists():  # a name this job does not list, taken by the user's entry
                raise UserError(f"'{out / path.name}' exists and is not difflora's; move it away and fuse again")
            os.replace(path, out / path.name)
        claim_outputs(out, outputs)
    finally:
        remove_entry(staging)
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(FuseConfig, argv, prog="difflora fuse")
    summary = fuse(cfg)
    print(f"fused {summary['layers']} layers with {summary['method']}: mean per-concept error "
          f"{summary['mean_error']:.4f} (averaging: {summary['mean_average_error']:.4f}); wrote {summary['output_dir']}")


__all__ = ["Concept", "FuseConfig", "fuse", "load_concepts", "main", "split_words", "encode_prompts"]
