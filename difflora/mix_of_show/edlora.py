"""``difflora edlora``: ED-LoRA concept training for Mix-of-Show.

A concept is a few words (``<robot1>+<robot2>``). Each word gets one new token per UNet
cross-attention layer ("layer-wise embeddings"): the prompt is encoded once per layer with that
layer's tokens, the L encodings travel to the UNet side by side along the token axis, and
:class:`LayerwiseAttnProcessor` hands each ``attn2`` its own slice. The number of layers is counted
from the model, so any SD 1.x / 2.x or SDXL layout works.

SDXL has two text encoders: every word gets its layer tokens in both tokenizers, with its own
embedding rows in each encoder (their widths differ). Layer ``l``'s text is the family's usual
encoding of the layer-``l`` prompt (both encoders' penultimate states, concatenated). The pooled
embedding (second encoder, time-embedding path) is the *mean* of the L layers' pooled outputs:
it conditions the whole UNet rather than one cross-attention layer, so no single layer's tokens
have a claim on it; the mean treats every layer's tokens alike and does not depend on the layer
order, and for a prompt without concept words it is the plain pooled output. It costs
nothing extra, as all L prompt variants go through the second encoder for the token states anyway.

Trained: the concept's embedding rows (a separate small parameter, so no other row of the
embedding matrix can move), LoRA on the text encoders' and UNet's attention, each with its own
learning rate. The embeddings freeze once their mean norm reaches ``embedding_freeze_norm``
(Mix-of-Show's guard against tokens that drown the rest of the prompt).

Training runs on the shared engine (:mod:`difflora.train.engine`), as DreamBooth does: mixed
precision, accumulation, DDP, latent cache, checkpoints and bit-exact resume, the NaN and output-folder
rules. :class:`EDLoRAJob` adds only what is ED-LoRA's. The result is one file, ``edlora.safetensors``:
per-layer embeddings, LoRA weights in diffusers key style, and metadata (words, tokens, layers,
base model, rank, alpha); ``difflora fuse`` takes it directly.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflora.config import config_to_dict, parse_config
from difflora.errors import UserError
from difflora.families import Conditioning, ModelFamily, family_named, family_of_pipeline
from difflora.models import BaseModel
from difflora.output_dir import CHECKPOINT_PATTERN, Outputs, output_job, safetensors_metadata
from difflora.train.engine import EMA_DIR, Callback, Stream, Trainer, TrainingJob
from difflora.train.options import TrainingOptions, option

logger = logging.getLogger(__name__)

EDLORA_FILE = "edlora.safetensors"
META_KEY = "edlora"  # header key with the concept's words, tokens, layers, base model, rank, alpha
EMBEDDING_PREFIX = "edlora_embeddings."  # tensor key per word: (layers, width), first text encoder
POOLED_RULE = "layer_mean"  # how the pooled text embedding is made from the layer-wise prompts (SDXL)
_WORD = re.compile(r"^<[A-Za-z0-9_\-]+>$")
# Everything a run writes at the top of output_dir: what --overwrite replaces, and nothing else.
OUTPUTS = Outputs("edlora", (EDLORA_FILE, "samples", "loss.png", "metrics.json", EMA_DIR),
                  patterns=(CHECKPOINT_PATTERN,),
                  marker=EDLORA_FILE, recognise=lambda out: META_KEY in safetensors_metadata(out / EDLORA_FILE))


@dataclass(kw_only=True)
class EDLoRAConfig(TrainingOptions):
    """Train one ED-LoRA concept (layer-wise embeddings + LoRA) for Mix-of-Show fusion."""

    # Concept
    concept_words: str = option("the concept's new words, '+'-separated, e.g. '<robot1>+<robot2>'",
                                "<concept1>+<concept2>")
    initializer: str = option("per word 'rand' (N(0, init_std^2)) or a class word to start from, e.g. 'rand+robot'",
                              "rand+object")
    init_std: float = option("standard deviation of 'rand' initial embeddings", 0.013)
    # Data
    instance_prompt: str = option("prompt for images without a caption; <TOK> becomes the concept words",
                                  "a photo of <TOK>")
    captions: bool = option("read each image's caption from name.txt (beside it, or in caption_dir)", True)
    caption_dir: str | None = option("folder of name.txt captions (default: beside the images)")
    caption_placeholder: str = option("text in captions replaced by the concept words", "<TOK>")
    # Learning rates: three groups
    embedding_lr: float = option("learning rate of the concept's token embeddings", 1e-3)
    text_encoder_lr: float = option("text-encoder LoRA learning rate", 1e-5)
    unet_lr: float = option("UNet LoRA learning rate", 1e-4)
    embedding_freeze_norm: float = option("freeze the embeddings once their mean norm reaches this (0 disables); "
                                          "SDXL's second encoder: the same multiple of its table's mean row norm",
                                          0.55)
    # Defaults that differ from DreamBooth's (Mix-of-Show's settings)
    noise_offset: float = option("noise offset (Mix-of-Show uses 0.01)", 0.01)
    train_batch_size: int = option("images per process per micro-step", 2)
    device: str | None = option("torch device (default: cuda if available, else cpu)")
    output_dir: str = option("where edlora.safetensors, samples and checkpoints go", "edlora-concept")
    validation_prompt: str | None = option("prompt(s) for sample grids, '|'-separated, <TOK> = the concept words; "
                                           "default: instance_prompt")

    @property
    def words(self) -> list[str]:
        return parse_words(self.concept_words)

    @property
    def initializers(self) -> list[str]:
        return [w.strip() for w in self.initializer.split("+")]

    def validate(self) -> None:
        self.validate_shared()
        words = self.words
        if len(self.initializers) != len(words) or not all(self.initializers):
            raise UserError(f"--initializer needs one entry per concept word ({len(words)}), e.g. 'rand+dog'; "
                            f"got {self.initializer!r}")
        if self.caption_placeholder not in self.instance_prompt:
            raise UserError(f"--instance_prompt must contain {self.caption_placeholder!r} where the concept words "
                            "go, e.g. 'a photo of <TOK>'")


# ------------------------------------------------------------------------------------------------
# Words, tokens and layer-wise prompts (shared with fusion and regional sampling)
# ------------------------------------------------------------------------------------------------


def parse_words(text: str) -> list[str]:
    """``'<w1>+<w2>'`` -> ``['<w1>', '<w2>']``; refuse malformed or repeated words."""
    words = [w.strip() for w in str(text).split("+") if w.strip()]
    if not words:
        raise UserError(f"concept words {text!r} are empty; write them like '<robot1>+<robot2>'")
    for w in words:
        if not _WORD.match(w):
            raise UserError(f"concept word {w!r} must look like '<name>' (letters, digits, _ or -), "
                            "e.g. '<robot1>+<robot2>'")
    if len(set(words)) != len(words):
        raise UserError(f"concept words {text!r} repeat a word; give each word its own name")
    return words


def layer_tokens(word: str, num_layers: int) -> list[str]:
    """The token strings of ``word`` for each cross-attention layer: ``<w>`` -> ``<w_l0>``, ...

    Lower case, because CLIP tokenizers lower-case prompts; the closing ``>`` keeps ``<w_l1>``
    from matching the start of ``<w_l10>``.
    """
    stem = word[1:-1].lower()
    return [f"<{stem}_l{i}>" for i in range(num_layers)]


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of the UNet's cross-attention modules (``attn2``) in a fixed order."""
    from diffusers.models.attention_processor import Attention

    names = [n for n, m in unet.named_modules()
             if isinstance(m, Attention) and n.split(".")[-1] == "attn2" and m.is_cross_attention]
    if not names:
        raise UserError("the UNet has no cross-attention layers; ED-LoRA needs a text-conditioned UNet")
    return names


def expand_prompt(prompt: str, tokens: dict[str, list[str]], layer: int) -> str:
    """``prompt`` as layer ``layer`` reads it: every concept word replaced by its token there.

    A word with a single token (a plain LoRA's trigger word) stays itself in every layer.
    """
    if not tokens:
        return prompt
    pattern = re.compile("|".join(re.escape(w) for w in sorted(tokens, key=len, reverse=True)))
    return pattern.sub(lambda m: tokens[m.group(0)][layer if len(tokens[m.group(0)]) > 1 else 0], prompt)


def is_layerwise(tokens: dict[str, list[str]]) -> bool:
    return any(len(t) > 1 for t in tokens.values())


def layerwise_conditioning(family: ModelFamily, tokenizers: list[Any], text_encoders: list[Any],
                           prompts: list[str], tokens: dict[str, list[str]], num_layers: int,
                           device: Any = None) -> Conditioning:
    """Each prompt encoded once per layer with that layer's tokens, by the family's own recipe.

    Hidden states ``(B, L*T, D)``: the L encodings side by side. Pooled ``(B, D2)`` (families that
    have one): the mean of the L pooled outputs (module docstring). Prompts without layer-wise words
    are encoded once and repeated, so their hidden and pooled outputs are exactly the plain ones.
    """
    device = device if device is not None else text_encoders[0].device  # a DDP wrapper has no .device
    per_layer = [[expand_prompt(p, tokens, layer) for layer in range(num_layers)] for p in prompts]
    flat = [v for variants in per_layer for v in dict.fromkeys(variants)]
    enc = family.encode_prompts(tokenizers, text_encoders, flat, device)
    states, pooled, i = [], [], 0
    for variants in per_layer:
        unique = list(dict.fromkeys(variants))
        index = {v: i + k for k, v in enumerate(unique)}
        states.append(torch.cat([enc.hidden_states[index[v]] for v in variants], dim=0))
        if enc.pooled is not None:
            pooled.append(enc.pooled[i] if len(unique) == 1
                          else torch.stack([enc.pooled[index[v]] for v in variants]).mean(0))
        i += len(unique)
    return Conditioning(torch.stack(states), torch.stack(pooled) if pooled else None)


def encode_layerwise(tokenizer, text_encoder, prompts: list[str], tokens: dict[str, list[str]],
                     num_layers: int, device: Any = None) -> torch.Tensor:
    """(B, L*T, D) with one text encoder (SD 1.x / 2.x): see :func:`layerwise_conditioning`."""
    return layerwise_conditioning(family_named("sd"), [tokenizer], [text_encoder], prompts, tokens, num_layers,
                                  device).hidden_states


class LayerwiseAttnProcessor:
    """Wraps a cross-attention processor so that layer ``index`` reads its own slice of the text.

    The UNet receives ``(B, L*T, D)``: L encodings of T tokens side by side. An input of any
    other length (e.g. a plain T-token prompt) passes through unchanged.
    """

    def __init__(self, inner: Any, index: int, num_layers: int, seq_len: int):
        self.inner, self.index, self.num_layers, self.seq_len = inner, index, num_layers, seq_len

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is not None and encoder_hidden_states.shape[1] == self.num_layers * self.seq_len:
            start = self.index * self.seq_len
            encoder_hidden_states = encoder_hidden_states[:, start:start + self.seq_len]
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def install_layerwise(unet: nn.Module, seq_len: int) -> dict[str, Any]:
    """Give every cross-attention layer its own text slice; returns the processors to restore."""
    layers = cross_attention_layers(unet)
    original = dict(unet.attn_processors)
    index = {f"{name}.processor": i for i, name in enumerate(layers)}
    unet.set_attn_processor({
        name: LayerwiseAttnProcessor(proc, index[name], len(layers), seq_len) if name in index else proc
        for name, proc in original.items()})
    return original


class LayerwisePipeline:
    """A Stable Diffusion (SD 1.x / 2.x or SDXL) pipeline that understands layer-wise concept words.

    ``pipe(prompts, negative_prompt=..., ...)`` encodes per layer and calls the wrapped pipeline
    with ``prompt_embeds`` (and SDXL's pooled embeddings); everything else (``device``, ``unet``...)
    is the wrapped pipeline's. Without a negative prompt it conditions as the stock pipeline does
    (SDXL: zeros). Install :func:`install_layerwise` on its UNet first.
    """

    def __init__(self, pipe: Any, tokens: dict[str, list[str]], num_layers: int, family: ModelFamily | None = None):
        self.pipe, self.tokens, self.num_layers = pipe, tokens, num_layers
        self.family = family if family is not None else family_of_pipeline(pipe)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def encode(self, prompts: list[str]) -> Conditioning:
        return layerwise_conditioning(self.family, self.family.tokenizers_of(self.pipe),
                                      self.family.text_encoders_of(self.pipe), prompts, self.tokens, self.num_layers)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        with torch.no_grad():
            cond = self.encode(prompts)
            if negative_prompt is None and self.family.zeros_for_empty_negative(self.pipe):
                negative = Conditioning(torch.zeros_like(cond.hidden_states),
                                        None if cond.pooled is None else torch.zeros_like(cond.pooled))
            else:
                negatives = negative_prompt if negative_prompt is not None else ""
                negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
                negative = self.encode(negatives)
        return self.pipe(**self.family.pipeline_embeds(cond, negative), **kwargs)


# ------------------------------------------------------------------------------------------------
# Concept embeddings: a small parameter in front of the frozen embedding table
# ------------------------------------------------------------------------------------------------


class ConceptEmbedding(nn.Module):
    """Token embedding whose rows ``start:`` come from a separate trainable parameter.

    Only the concept rows can change: they are the only trainable tensor; the table itself stays
    frozen (so weight decay or a stray gradient cannot touch another row).
    """

    def __init__(self, base: nn.Embedding, start: int, rows: torch.Tensor):
        super().__init__()
        self.base, self.start = base, start
        self.rows = nn.Parameter(rows.clone().float())

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight[: self.start], self.rows.to(self.base.weight)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        is_concept = ids >= self.start
        picked = self.rows[(ids - self.start).clamp(min=0)].to(out.dtype)
        return torch.where(is_concept[..., None], picked, out)

    def mean_norm(self) -> float:
        return float(self.rows.detach().norm(dim=-1).mean())


def add_concept_tokens(tokenizer, text_encoder, words: list[str], initializers: list[str], num_layers: int,
                       init_std: float, generator: torch.Generator) -> tuple[ConceptEmbedding, dict[str, list[str]]]:
    """Add ``len(words) x num_layers`` tokens, initialise them, and wrap the embedding table."""
    tokens = {w: layer_tokens(w, num_layers) for w in words}
    new = [t for w in words for t in tokens[w]]
    clash = [t for t in new if t in tokenizer.get_vocab()]
    if clash:
        raise UserError(f"the tokenizer already has the token '{clash[0]}'; pick other concept words")
    start = len(tokenizer)
    tokenizer.add_tokens(new)
    table = text_encoder.get_input_embeddings()
    width = table.weight.shape[1]
    rows = []
    for init in initializers:
        if init == "rand":  # each layer's token drawn on its own
            rows.append(torch.randn(num_layers, width, generator=generator) * init_std)
            continue
        ids = tokenizer(init, add_special_tokens=False).input_ids
        if not ids or any(i >= start for i in ids):
            raise UserError(f"--initializer word {init!r} is not in the tokenizer; use 'rand' or a class word")
        row = table.weight.detach()[ids].float().mean(0).cpu()  # a multi-token class word: their mean
        rows.append(row.expand(num_layers, width))
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings()
    table.requires_grad_(False)
    wrapped = ConceptEmbedding(table, start, torch.cat(rows).to(table.weight.device))
    text_encoder.set_input_embeddings(wrapped)
    return wrapped, tokens


# ------------------------------------------------------------------------------------------------
# The concept file
# ------------------------------------------------------------------------------------------------


def embedding_prefix(encoder: int) -> str:
    """Tensor-key prefix of the ``encoder``-th text encoder's rows: ``edlora_embeddings.`` for the
    first (as in SD files), ``edlora_embeddings_2.`` for ``text_encoder_2`` and so on."""
    return EMBEDDING_PREFIX if encoder == 0 else f"edlora_embeddings_{encoder + 1}."


@dataclass
class EDLoRAFile:
    """The content of ``edlora.safetensors``."""

    words: list[str]
    tokens: dict[str, list[str]]
    embeddings: dict[str, torch.Tensor]  # word -> (layers, width), first text encoder
    lora: dict[str, torch.Tensor]  # diffusers-style keys (unet./text_encoder. ... lora_A/lora_B.weight)
    layers: list[str]  # cross-attention module names, in token order
    metadata: dict[str, Any]  # base_model, rank, alpha, ... and the lora_adapter_metadata header
    # The other text encoders' rows (SDXL: text_encoder_2), in the order of ``text_encoders``.
    extra_embeddings: list[dict[str, torch.Tensor]] = field(default_factory=list)

    @property
    def text_encoders(self) -> list[str]:
        """Component names of the text encoders the file holds rows for (SD files: one)."""
        return list(self.metadata.get("text_encoders", ["text_encoder"]))

    @property
    def all_embeddings(self) -> list[dict[str, torch.Tensor]]:
        """word -> (layers, width), one mapping per text encoder."""
        return [self.embeddings, *self.extra_embeddings]


def save_edlora(path: Path, words: list[str], tokens: dict[str, list[str]], embeddings: dict[str, torch.Tensor],
                unet: nn.Module, text_encoder: nn.Module, layers: list[str], info: dict[str, Any],
                extra_encoders: list[tuple[nn.Module, dict[str, torch.Tensor]]] = ()) -> Path:
    """Write the concept file atomically: embeddings, LoRA (diffusers keys + scales) and metadata.

    ``extra_encoders`` are the further text encoders (SDXL's ``text_encoder_2``) with their rows;
    their LoRA keys start ``text_encoder_2.`` and their rows ``edlora_embeddings_2.``.
    """
    from difflora.formats import DIFFUSERS
    from difflora.lora_io import collect_lora_layers
    from difflora.output_dir import atomic_save_safetensors

    encoders = [(text_encoder, embeddings), *extra_encoders]
    components = ["text_encoder"] + [f"text_encoder_{i + 1}" for i in range(1, len(encoders))]
    tensors: dict[str, torch.Tensor] = {f"{embedding_prefix(i)}{w}": rows[w].float()
                                        for i, (_, rows) in enumerate(encoders) for w in words}
    lora = {}
    for component, model in (("unet", unet), *((c, e) for c, (e, _) in zip(components, encoders))):
        lora.update(collect_lora_layers(model, component))
    lora_tensors, lora_header = DIFFUSERS.encode(lora)  # the LoRA part is in the diffusers layout
    meta = {"concept_words": words, "tokens": tokens, "layers": layers, "text_encoders": components, **info}
    atomic_save_safetensors(path, {**tensors, **lora_tensors},
                            {"format": "pt", META_KEY: json.dumps(meta), **lora_header,
                             "difflora_base_model": str(info.get("base_model", ""))})
    return path


def is_edlora_file(path: str | Path) -> bool:
    """Whether ``path`` (a file or a folder holding ``edlora.safetensors``) is an ED-LoRA file."""
    p = Path(path)
    p = p / EDLORA_FILE if p.is_dir() else p
    if p.suffix != ".safetensors" or not p.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            return META_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable files are reported by the LoRA reader
        return False


def load_edlora(path: str | Path) -> EDLoRAFile:
    """Read a concept file written by :func:`save_edlora` (files without ``text_encoders``: SD, one)."""
    from safetensors import safe_open

    p = Path(path)
    p = p / EDLORA_FILE if p.is_dir() else p
    try:
        with safe_open(str(p), framework="pt") as f:
            header = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(header[META_KEY])
        words = [str(w) for w in meta["concept_words"]]
        tokens = {str(w): [str(x) for x in t] for w, t in meta["tokens"].items()}
        layers = [str(x) for x in meta["layers"]]
        components = [str(c) for c in meta.get("text_encoders", ["text_encoder"])]
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot read ED-LoRA file '{p}' ({type(err).__name__}); re-train or re-copy it") from None
    tables = []
    for i, component in enumerate(components):
        missing = [w for w in words if f"{embedding_prefix(i)}{w}" not in state]
        if missing:
            raise UserError(f"ED-LoRA file '{p}' has no {component} embeddings for {missing[0]}; re-train or "
                            "re-copy it")
        tables.append({w: state.pop(f"{embedding_prefix(i)}{w}") for w in words})
    header_meta = {k: v for k, v in header.items() if k != META_KEY}
    return EDLoRAFile(words=words, tokens=tokens, embeddings=tables[0], lora=state, layers=layers,
                      metadata={**meta, "header": header_meta}, extra_embeddings=tables[1:])


def check_base_model(concept: EDLoRAFile, unet: nn.Module, text_encoders: nn.Module | list[nn.Module],
                     source: str) -> None:
    """Refuse a concept file made for another base model (layers, text encoders or their widths)."""
    encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    layers = cross_attention_layers(unet)
    widths = [int(e.get_input_embeddings().weight.shape[1]) for e in encoders]
    shapes = [tuple(next(iter(t.values())).shape) for t in concept.all_embeddings]
    if concept.layers != layers or shapes != [(len(layers), w) for w in widths]:
        def width(ws: list[int]) -> str:
            return f"text width{'s' if len(ws) > 1 else ''} {'+'.join(map(str, ws))}"

        raise UserError(f"{source} was trained on another base model ({concept.metadata.get('base_model')!r}: "
                        f"{shapes[0][0]} cross-attention layers, {width([s[1] for s in shapes])}; this model has "
                        f"{len(layers)} and {width(widths)}); use a concept trained on this base model")


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def _placeholder(text: str, cfg: EDLoRAConfig, source: str) -> str:
    if cfg.caption_placeholder not in text:
        raise UserError(f"{source} {text!r} has no {cfg.caption_placeholder!r}; write it where the concept "
                        "words go (or set --caption_placeholder)")
    return text.replace(cfg.caption_placeholder, " ".join(cfg.words))


def _text_targets(names: list[str], used: int, num_layers: int) -> list[str] | str:
    """LoRA targets of a text encoder: ``names`` in its first ``used`` layers (all: the plain list;
    fewer: a peft regular expression, so a layer the conditioning never reads gets no LoRA)."""
    if used >= num_layers:
        return names
    layers = "|".join(str(i) for i in range(used))
    return rf".*encoder\.layers\.({layers})\..*({'|'.join(re.escape(n) for n in names)})"


class EDLoRAJob(TrainingJob):
    """Layer-wise concept embeddings + LoRA on the text encoder's and UNet's attention.

    Three learning-rate groups (embeddings, text-encoder LoRA, UNet LoRA); the embeddings freeze
    once their mean norm reaches ``embedding_freeze_norm``; captions name the concept with a
    placeholder; masks weight the loss. Everything else is the shared engine's.
    """

    name = "edlora"

    def outputs(self) -> Outputs:
        return OUTPUTS

    def inputs(self) -> list[Any]:
        return [*super().inputs(), self.cfg.caption_dir]

    def load_data(self) -> list[Stream]:
        from difflora.config import check_device
        from difflora.data import load_training_images

        cfg = self.cfg
        check_device(cfg.device)
        images = load_training_images(cfg, cfg.instance_prompt, captions=cfg.captions, caption_dir=cfg.caption_dir)
        images.prompts = [_placeholder(p, cfg, f"caption of '{path.name}'")
                          for p, path in zip(images.prompts, images.paths)]
        self._validation_prompts = [_placeholder(p.strip(), cfg, "validation prompt")
                                    for p in (cfg.validation_prompt or cfg.instance_prompt).split("|") if p.strip()]
        return [Stream(images)]

    def attach(self, base: BaseModel) -> None:
        from difflora.models import LORA_TARGET_PRESETS, add_lora

        cfg = self.cfg
        self.family = base.family
        self.components = list(base.family.text_encoder_subfolders)
        self.tokenizers, self.encoders = list(base.tokenizers), list(base.text_encoders)
        self.tokenizer, self.text_encoder = self.tokenizers[0], self.encoders[0]
        self.layers = cross_attention_layers(base.unet)
        g = torch.Generator().manual_seed(cfg.seed)  # one stream: the first encoder's draws come first
        self.embeddings: list[ConceptEmbedding] = []
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            embedding, self.tokens = add_concept_tokens(tokenizer, encoder, cfg.words, cfg.initializers,
                                                        len(self.layers), cfg.init_std, g)
            self.embeddings.append(embedding)
        self.embedding = self.embeddings[0]
        torch.manual_seed(cfg.seed)  # LoRA A factors come from the global generator
        self.alpha = cfg.lora_alpha if cfg.lora_alpha is not None else float(cfg.rank)
        targets = LORA_TARGET_PRESETS["attention"]
        add_lora(base.unet, cfg.rank, self.alpha, targets["unet"], use_dora=cfg.use_dora)
        for i, encoder in enumerate(self.encoders):
            used = base.family.text_layers_used(i, encoder.config.num_hidden_layers)
            add_lora(encoder, cfg.rank, self.alpha, _text_targets(targets["text_encoder"], used,
                                                                  encoder.config.num_hidden_layers),
                     use_dora=cfg.use_dora)
        for embedding in self.embeddings:
            embedding.rows.requires_grad_(True)  # peft freezes every non-LoRA parameter it finds
        install_layerwise(base.unet, self.tokenizer.model_max_length)
        self.thresholds = self._freeze_thresholds()
        self.frozen: list[int | None] = [None] * len(self.embeddings)
        self._freeze_if_due(0)

    def _freeze_thresholds(self) -> list[float]:
        """``embedding_freeze_norm`` for the first encoder; for the others the same multiple of their
        own table's mean row norm, because the encoders' embedding scales differ (SDXL's second table
        is not CLIP-L's, on which the 0.55 default was set)."""
        norm = self.cfg.embedding_freeze_norm
        means = [float(e.base.weight[:e.start].float().norm(dim=-1).mean()) for e in self.embeddings]
        return [norm] + [norm * m / means[0] for m in means[1:]]

    @property
    def frozen_at(self) -> int | None:
        """The step the first encoder's rows froze (SD 1.x / 2.x: the only ones)."""
        return self.frozen[0]

    def trained_text_encoders(self) -> list[nn.Module]:
        return list(self.encoders)

    def param_groups(self, lr_scale: float) -> list[dict[str, Any]]:
        cfg = self.cfg
        return [
            {"params": [(f"{c}.concept_embeddings", e.rows) for c, e in zip(self.components, self.embeddings)],
             "lr": cfg.embedding_lr * lr_scale},
            {"params": [(f"{c}.{n}", p) for c, encoder in zip(self.components, self.encoders)
                        for n, p in encoder.named_parameters() if p.requires_grad and "lora_" in n],
             "lr": cfg.text_encoder_lr * lr_scale},
            {"params": [(f"unet.{n}", p) for n, p in self.base.unet.named_parameters() if p.requires_grad],
             "lr": cfg.unet_lr * lr_scale},
        ]

    def identity(self) -> dict[str, Any]:
        return {"concept_words": self.cfg.words}

    def conditioning(self, prompts: list[str], text_encoders: list[nn.Module], device: Any) -> Conditioning:
        return layerwise_conditioning(self.family, self.tokenizers, text_encoders, prompts, self.tokens,
                                      len(self.layers), device=device)

    def _freeze_if_due(self, step: int) -> None:
        if not self.cfg.embedding_freeze_norm:
            return
        for i, (embedding, threshold) in enumerate(zip(self.embeddings, self.thresholds)):
            if self.frozen[i] is None and embedding.mean_norm() >= threshold:
                embedding.rows.requires_grad_(False)  # no grad -> the optimizer leaves the rows alone
                self.frozen[i] = step
                logger.info("%s embeddings frozen at step %d (mean norm %.3f)", self.components[i], step,
                            embedding.mean_norm())

    def after_step(self, step: int) -> dict[str, str]:
        self._freeze_if_due(step)
        return {"emb_norm": "/".join(f"{e.mean_norm():.3f}" for e in self.embeddings)}

    def state(self) -> dict[str, Any]:
        extra = {"frozen_at_encoders": list(self.frozen)} if len(self.frozen) > 1 else {}
        return {"frozen_at": self.frozen[0], **extra}

    def load_state(self, state: dict[str, Any]) -> None:
        frozen = state.get("frozen_at_encoders") or [state.get("frozen_at")]
        self.frozen = [*frozen, *[None] * len(self.embeddings)][:len(self.embeddings)]
        for embedding, at in zip(self.embeddings, self.frozen):
            if at is not None:
                embedding.rows.requires_grad_(False)

    def validation_prompts(self) -> list[str]:
        return self._validation_prompts

    def validation_pipeline(self, unet: nn.Module, text_encoders: list[nn.Module]) -> Any:
        return LayerwisePipeline(super().validation_pipeline(unet, text_encoders), self.tokens, len(self.layers),
                                 self.family)

    def save(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        from difflora.train.validation import write_metrics

        (path,) = self.save_weights(trainer, trainer.out)
        summary.update(file=str(path), embedding_norm=self.embedding.mean_norm(),
                       embeddings_frozen_at=self.frozen[0], tokens=sum(len(t) for t in self.tokens.values()))
        if len(self.embeddings) > 1:
            summary.update(embedding_norms=dict(zip(self.components, (e.mean_norm() for e in self.embeddings))),
                           embeddings_frozen_at_encoders=dict(zip(self.components, self.frozen)))
        write_metrics(trainer.out / "metrics.json",
                      {**summary, "losses": trainer.losses, "config": config_to_dict(self.cfg)})

    def save_weights(self, trainer: Trainer, folder: Path) -> list[Path]:
        cfg, words, n = self.cfg, self.cfg.words, len(self.layers)
        unet, encoders = trainer.unwrapped()
        tables = []
        for embedding in self.embeddings:
            rows = embedding.rows.detach().cpu()
            tables.append({w: rows[i * n:(i + 1) * n] for i, w in enumerate(words)})
        info = {"base_model": cfg.pretrained_model_name_or_path, "family": self.family.name, "rank": cfg.rank,
                "alpha": self.alpha, "steps": trainer.step, "optimizer": cfg.optimizer,
                "initializer": cfg.initializers, "embeddings_frozen_at": self.frozen[0]}
        if len(self.embeddings) > 1:
            info.update(embeddings_frozen_at_encoders=dict(zip(self.components, self.frozen)), pooled=POOLED_RULE)
        if cfg.use_ema:
            info["ema"] = folder == trainer.out / EMA_DIR
        folder.mkdir(parents=True, exist_ok=True)
        return [save_edlora(folder / EDLORA_FILE, words, self.tokens, tables[0], unet, encoders[0],
                            self.layers, info, extra_encoders=list(zip(encoders[1:], tables[1:])))]


@output_job
def train(cfg: EDLoRAConfig, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Train one ED-LoRA concept; return a summary (final loss, steps, output_dir, file)."""
    return Trainer(EDLoRAJob(cfg), callbacks).run()


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(EDLoRAConfig, argv, prog="difflora edlora")
    summary = train(cfg)
    if summary["is_main_process"]:
        print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, wrote {summary['file']}")
