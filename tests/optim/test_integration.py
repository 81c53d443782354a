"""ScaledAdamW / ScaledSGD in real training set-ups: resume, accelerate, GradScaler, peft models."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from difflora.optim import ScaledAdamW, ScaledSGD


class _Lora(torch.nn.Module):
    """A linear and a conv LoRA (peft names) on frozen bases, plus a trainable embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 8)
        self.base = torch.nn.Linear(8, 8).requires_grad_(False)
        self.lin = torch.nn.ModuleDict({
            "lora_A": torch.nn.ModuleDict({"default": torch.nn.Linear(8, 2, bias=False)}),
            "lora_B": torch.nn.ModuleDict({"default": torch.nn.Linear(2, 8, bias=False)})})
        self.conv = torch.nn.ModuleDict({
            "lora_A": torch.nn.ModuleDict({"default": torch.nn.Conv2d(1, 2, 3, padding=1, bias=False)}),
            "lora_B": torch.nn.ModuleDict({"default": torch.nn.Conv2d(2, 1, 1, bias=False)})})

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = self.base(h) + self.lin["lora_B"]["default"](self.lin["lora_A"]["default"](h))
        img = h.reshape(-1, 1, 2, 4)
        return img + self.conv["lora_B"]["default"](self.conv["lora_A"]["default"](img))


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, 5, (6,), generator=g)
    return ((model(idx) - 0.5) ** 2).mean()


@pytest.mark.parametrize("cls,kw", [(ScaledAdamW, dict(lr=1e-2, amsgrad=True)),
                                    (ScaledSGD, dict(lr=1e-1, momentum=0.9, nesterov=True))])
def test_state_dict_round_trip_continues_bit_identically(cls, kw):
    torch.manual_seed(0)
    model = _Lora()
    opt = cls(model.named_parameters(), **kw)

    def train(m, o, steps):
        for s in steps:
            o.zero_grad()
            _loss(m, s).backward()
            o.step()

    train(model, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, range(3, 6))
    expected = copy.deepcopy(model.state_dict())

    torch.manual_seed(123)
    resumed = _Lora()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2 = cls(resumed.named_parameters(), **kw)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["param_names"] == opt.param_groups[0]["param_names"]
    train(resumed, opt2, range(3, 6))
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_persistent_state_is_exactly_adamws():
    torch.manual_seed(0)
    model = _Lora()
    opt = ScaledAdamW(model.named_parameters())
    _loss(model, 0).backward()
    opt.step()
    for p in model.parameters():
        if p.requires_grad:
            assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}


def test_gradscaler_and_clip_grad_norm_match_unscaled_run():
    torch.manual_seed(0)
    plain, scaled_model = _Lora(), None
    scaled_model = copy.deepcopy(plain)
    opt_a = ScaledAdamW(plain.named_parameters(), lr=1e-2)
    opt_b = ScaledAdamW(scaled_model.named_parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for s in range(3):
        opt_a.zero_grad()
        _loss(plain, s).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
        opt_a.step()
        opt_b.zero_grad()
        scaler.scale(_loss(scaled_model, s)).backward()
        scaler.unscale_(opt_b)
        torch.nn.utils.clip_grad_norm_(scaled_model.parameters(), 0.05)
        scaler.step(opt_b)
        scaler.update()
    for (n, a), b in zip(plain.named_parameters(), scaled_model.parameters()):
        torch.testing.assert_close(a, b, msg=n)


def test_accelerate_prepare():
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = _Lora()
    opt = ScaledAdamW(model.named_parameters(), lr=3e-2)
    acc = accelerate.Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    assert isinstance(opt.optimizer, ScaledAdamW)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = _loss(model, 0)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    state = opt.state_dict()
    assert "param_names" in state["param_groups"][0]


def _train(model, loss_fn, steps=12, lr=3e-3):
    opt = ScaledAdamW(model.named_parameters(), lr=lr, weight_decay=0.0)
    assert opt._pairing(), "no LoRA pairs found"
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return opt, losses


def test_peft_unet2d_condition_model():
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=16,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 32)
    target = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 500])
    opt, losses = _train(unet, lambda: ((unet(x, t, text).sample - target) ** 2).mean(), steps=8, lr=1e-2)
    # 4 transformer blocks (1 down, 2 up, 1 mid) x (attn1, attn2) x 4 targets
    assert len(opt._pairing()) == 4 * 2 * 4
    assert losses[-1] < losses[0]


def test_peft_clip_text_model_with_trainable_embedding():
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16)
    model = get_peft_model(CLIPTextModel(cfg), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj",
                                                                               "out_proj"]))
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)  # a textual-inversion style plain parameter beside the LoRA pairs
    before = emb.detach().clone()
    ids = torch.randint(0, 100, (2, 8))
    target = torch.randn(2, 8, 32)
    _, losses = _train(model, lambda: ((model(input_ids=ids).last_hidden_state - target) ** 2).mean(), lr=1e-2)
    assert losses[-1] < losses[0]
    assert not torch.equal(emb.detach(), before)


def test_peft_gpt2_causal_lm():
    """GPT-2's fused Conv1D attention (fan_in_fan_out): each step is AdamW on the hand-preconditioned gradients.

    B starts non-zero so that both factors' preconditioners act from the first step; plain AdamW on
    the raw gradients ends elsewhere, so the comparison would catch a preconditioner left out.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: the three copies see the same forward
    model = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    hand, plain = copy.deepcopy(model), copy.deepcopy(model)
    ids = torch.randint(0, 100, (2, 16))
    reg, kw = 1e-2, dict(lr=1e-2, weight_decay=0.0)
    opt = ScaledAdamW(model.named_parameters(), reg=reg, **kw)
    assert len(opt._pairing()) == 2  # one c_attn pair per layer
    hand_params = dict((n, p) for n, p in hand.named_parameters() if p.requires_grad)
    hand_opt = torch.optim.AdamW(hand_params.values(), **kw)
    plain_opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], **kw)
    losses = []
    for _ in range(5):
        for m, o in ((model, opt), (hand, hand_opt), (plain, plain_opt)):
            o.zero_grad()
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            if m is model:
                losses.append(loss.item())
        with torch.no_grad():  # the paper's formulas with explicit inverses, from the factors before the step
            precond = {}
            for name, a in hand_params.items():
                if "lora_A" not in name:
                    continue
                b = hand_params[name.replace("lora_A", "lora_B")]
                eye = torch.eye(a.shape[0])
                precond[a] = torch.linalg.inv(b.T @ b + reg * eye) @ a.grad
                precond[b] = b.grad @ torch.linalg.inv(a @ a.T + reg * eye)
            for p, g in precond.items():
                p.grad = g
        for o in (opt, hand_opt, plain_opt):
            o.step()
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, p in hand_params.items():
        torch.testing.assert_close(ours[name], p, rtol=1e-4, atol=1e-6)
    hand_gap = max(float((p - q).abs().max()) for p, q in zip(ours.values(), hand_params.values()))
    plain_gap = max(float((p - q).abs().max()) for p, q in
                    zip(ours.values(), (p for p in plain.parameters() if p.requires_grad)))
    assert plain_gap > 100 * max(hand_gap, 1e-7)
    assert losses[-1] < losses[0]
