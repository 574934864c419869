"""Stage 2, visual instruction tuning: the projector and LoRA adapters on the decoder learn.

LoRA (Hu et al. 2021) comes from `peft`: `inject_adapter_in_model` puts `lora.Linear`
wrappers around the decoder's `nn.Linear` layers named in `target_modules` (our
`LlamaDecoder` keeps transformers' names: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj),
so peft fits it without a transformers model around it. The base weights stay frozen; the
vision tower is frozen too, as in LLaVA. Loss on assistant tokens only (every turn of a
multi-turn conversation), per-answer normalised, on the instruct mix, with a curriculum:
the mix moves linearly from EASY_MIX (colour, shape, short captions, OCR) to the full
INSTRUCT_MIX over the first `curriculum` fraction of the steps.

Each sample packs `turns` questions about one image, answered independently (the decoder's
segment mask: each turn reads the system prompt, the image and itself). One image's 49
tokens and the prompt then serve up to eight answers: in its ~30 minutes of stage 2 the first
shipped run (one question per sample) trained on 2,312 answers, the second on 7,527.

    python -m llava_core.train --out runs/r1 --stage 2 --budget-minutes 30   # after stages 0-1
    torchrun --nproc_per_node 2 -m llava_core.train --out runs/r1 --stage 2 --budget-minutes 30
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..data import INSTRUCT_MIX, DataConfig
from .batches import ChatBatches
from .common import LoopConfig, compiled_blocks, resolve_compile, set_trainable, setup_torch, train_loop
from .dist import Dist, init_distributed, to_device, wrap_ddp
from .stage1_align import AnswerStep

log = logging.getLogger(__name__)

EASY_MIX = {"colour": 1.0, "shape": 1.0, "caption_short": 0.5, "size": 0.5, "count": 0.5, "yesno": 0.5,
            "ocr": 0.75, "document": 0.25}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Stage2Config:
    batch_size: int = 4
    # questions per image in one sequence: 8 answers cost ~200 tokens where 8 one-answer
    # samples cost ~750 (49 image tokens and the system prompt each time)
    turns: int = 8
    lr: float = 5e-4  # LoRA adapters
    projector_lr: float = 2e-4
    weight_decay: float = 0.0
    lora_r: int = 8  # r 8 on all seven: 2.4M parameters, the parts stay fp32 within 25 MB
    lora_alpha: int = 16
    lora_targets: tuple = LORA_TARGETS
    mix: dict = field(default_factory=lambda: dict(INSTRUCT_MIX))
    easy_mix: dict = field(default_factory=lambda: dict(EASY_MIX))
    curriculum: float = 0.25  # fraction of the steps over which the mix moves from easy_mix to mix
    # every side_every-th window of `bucket` batches draws from side_mix alone (0: never):
    # whole runs of, say, position questions between the mix's, which mixing them in does not give
    side_mix: dict = field(default_factory=dict)
    side_every: int = 0
    # each shape scene followed by its mirror image, "left" and "right" swapped in its text
    # (data/mirror.py): pairs that differ only in the sides things are on
    mirror_twins: bool = False
    train_tower_blocks: int = 0  # > 0: also train the tower's last k blocks (LLaVA keeps it frozen)
    tower_lr: float = 1e-4
    autocast: str | None = None  # "bfloat16"/"auto": the step's forward under torch.autocast (Stage1Config)
    compile: bool | str = False  # True / "auto": the decoder's blocks through torch.compile (Stage1Config)
    bucket: int = 8
    max_len: int | None = None
    split: str = "train"
    offset: int = 20_000_000
    seed: int = 0
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(budget_s=1500, warmup=15, ckpt_every=100))


def lora_config(cfg: Stage2Config):
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(cfg.lora_targets))


def add_lora(decoder: nn.Module, config) -> nn.Module:
    """Wrap the decoder's target Linear layers with peft LoRA layers (in place); B starts at 0,
    so the decoder computes exactly what it did before."""
    from peft import inject_adapter_in_model
    set_trainable(decoder, False)
    inject_adapter_in_model(config, decoder, adapter_name="default")
    n = sum(1 for name, _ in decoder.named_modules() if name.endswith(".lora_A"))
    if n == 0:
        raise ValueError(f"LoRA target modules {config.target_modules} match no layer of the decoder")
    for name, p in decoder.named_parameters():
        p.requires_grad_("lora_" in name)
    return decoder


def lora_state(decoder: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors as peft saves them (`...q_proj.lora_A.weight`, adapter name removed)."""
    from peft import get_peft_model_state_dict
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(decoder, adapter_name="default").items()}


def load_lora_state(decoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict
    out = set_peft_model_state_dict(decoder, state, adapter_name="default")
    bad = [k for k in getattr(out, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise ValueError(f"LoRA state does not fit the decoder: unexpected {bad[:5]}")


def add_lora_from_parts(decoder: nn.Module, parts: str | Path, cfg: Stage2Config) -> nn.Module:
    """A parts folder's adapters (PARTS/lora/adapter_model.safetensors) on the decoder, unmerged,
    so that training continues from them."""
    from safetensors.torch import load_file
    path = Path(parts) / "lora" / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no LoRA adapters to continue from")
    add_lora(decoder, lora_config(cfg))
    load_lora_state(decoder, load_file(str(path)))
    return decoder


def merge_lora(decoder: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight (W + B A * alpha / r) and put the plain Linear back."""
    from peft.tuners.lora import LoraLayer
    for name, m in list(decoder.named_modules()):
        if isinstance(m, LoraLayer):
            m.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(decoder.get_submodule(parent_name) if parent_name else decoder, child, m.get_base_layer())
    return decoder


def mix_at(cfg: Stage2Config, step: int, total: int | None) -> dict:
    """The curriculum: easy_mix at step 0, then linearly to mix by `curriculum` of the total;
    side_mix instead in the last window of every side_every windows of `bucket` steps."""
    if cfg.side_every < 0 or bool(cfg.side_mix) != (cfg.side_every > 0):
        raise ValueError(f"side_mix={cfg.side_mix} with side_every={cfg.side_every}: set both "
                         "(side_every >= 1) or neither")
    if cfg.side_every > 0 and (step // cfg.bucket) % cfg.side_every == cfg.side_every - 1:
        return dict(cfg.side_mix)
    a = 0.0 if not total or cfg.curriculum <= 0 else min(1.0, step / (cfg.curriculum * total))
    if cfg.curriculum <= 0:
        a = 1.0
    keys = set(cfg.mix) | set(cfg.easy_mix)
    return {k: (1 - a) * cfg.easy_mix.get(k, 0.0) + a * cfg.mix.get(k, 0.0) for k in sorted(keys)}


def tower_params(model, blocks: int) -> list[nn.Parameter]:
    """The last `blocks` blocks the feature layer reads (blocks after it are unused)."""
    tower = model.vision_tower
    last = max(tower.block_indices)
    chosen = [tower.visual.transformer.resblocks[i] for i in range(max(0, last - blocks + 1), last + 1)]
    return [p for b in chosen for p in b.parameters()]


def train_stage2(out_dir: str | Path, model, processor, cfg: Stage2Config, resume: bool = False,
                 dist: Dist | None = None, threads: int | None = 2, name: str = "stage2"):
    """Add LoRA to `model.language_model` (unless it has adapters already: then they train on)
    and train it with the projector, in place.

    Trains on `dist.device` (the model is moved there). Returns (LoopResult, peft LoraConfig).
    Writes {name}.{jsonl,png,ckpt} under out_dir (the recipe's reading phase: "stage3")."""
    dist = dist or init_distributed()
    setup_torch(threads, cfg.seed)
    model.to(dist.device)
    set_trainable(model, False)
    lcfg = lora_config(cfg)
    if not any("lora_A" in n for n, _ in model.language_model.named_modules()):
        add_lora(model.language_model, lcfg)
    for n, p in model.language_model.named_parameters():
        p.requires_grad_("lora_" in n)
    set_trainable(model.projector, True)
    groups = [{"params": [p for p in model.language_model.parameters() if p.requires_grad], "lr": cfg.lr},
              {"params": list(model.projector.parameters()), "lr": cfg.projector_lr}]
    if cfg.train_tower_blocks:
        tp = tower_params(model, cfg.train_tower_blocks)
        for p in tp:
            p.requires_grad_(True)
        groups.append({"params": tp, "lr": cfg.tower_lr})
    model.eval()  # no dropout anywhere; eval() also keeps open_clip from patch dropout
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    data = DataConfig(image_size=model.cfg.vision.image_size, seed=cfg.seed, mix=dict(cfg.mix))
    holder = {"total": cfg.loop.steps}
    batches = ChatBatches(processor, data, cfg.batch_size, mix_at=lambda s: mix_at(cfg, s, holder["total"]),
                          split=cfg.split, offset=cfg.offset, bucket=cfg.bucket, max_len=cfg.max_len,
                          seed=cfg.seed, rank=dist.rank, world=dist.world, turns=cfg.turns,
                          mirror_twins=cfg.mirror_twins)
    step_module = wrap_ddp(AnswerStep(model, train_tower=cfg.train_tower_blocks > 0, autocast=cfg.autocast), dist)

    def step_fn(step, total=None):
        holder["total"] = total
        b = to_device(batches(step), dist.device)
        loss, metrics = step_module(b.input_ids, b.labels, b.pixel_values, b.segments)
        loss.backward()
        return {"loss": float(loss.detach()), "samples": b.size * dist.world, "seq_len": b.input_ids.shape[1],
                **metrics}  # metrics["answers"]: this rank's answers (samples x turns)

    names = {id(p): n for n, p in model.named_parameters()}
    trained = [names[id(p)] for p in params]

    def state():
        sd = model.state_dict(keep_vars=True)
        return {n: sd[n].detach().clone() for n in trained}

    def load_state(s):
        missing = set(trained) - set(s)
        if missing:
            raise ValueError(f"{name} checkpoint lacks {sorted(missing)[:5]}")
        out = model.load_state_dict(s, strict=False)  # a subset by design: what this stage trains
        if out.unexpected_keys:
            raise ValueError(f"{name} checkpoint holds tensors the model lacks: {out.unexpected_keys[:5]}")

    with compiled_blocks(model.language_model, resolve_compile(cfg.compile, dist.device.type)):
        result = train_loop(name, out_dir, cfg.loop, step_fn, opt, params, state=state, load_state=load_state,
                            resume=resume, dist=dist, meta={name: asdict(cfg)})
    set_trainable(model, False)
    return result, lcfg
