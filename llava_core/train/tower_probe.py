"""Linear probes of a vision tower: is what the assistant must say linearly readable from the
patch tokens the projector sees?

For shape scenes, the mean of the tokens over each 3x3 grid cell predicts that cell's colour
and shape (or "empty"); the mean over all tokens predicts the object count; each single token
predicts its own grid row and column (what the decoder reads when it attends to one token).
For OCR scenes, the tokens' mean and max predict the first character and the text length.
Each probe is a multinomial logistic regression fitted on `n_train` validation-split images
and scored on `n_test` test-split images (scenes never seen in training).

`probe_reading` asks what a linear probe cannot: can the tokens, read in sequence, give the
word? It trains a fresh 2-block reader (stage 0's `Reader`) on the frozen tower's tokens of
validation-split OCR scenes and counts the test-split words whose every character it gets
right (teacher-forced: the arg max given the true text before it). Any tower can be
probed so, trained with a reader or not, and it costs minutes, not a stage-2 run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import DataConfig, make_sample
from ..model.processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..model.vision import VisionTower
from .batches import images_to_tensor
from .common import lr_factor
from .stage0_clip import CaptionTokenizer, TextTowerConfig, caption_of
from .stage0_heads import CELL_TARGETS, Reader, cell_pool_matrix, cell_targets

CHARS = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [str(d) for d in range(10)]


@torch.no_grad()
def tower_tokens(tower: VisionTower, samples: list[dict], batch: int = 64) -> torch.Tensor:
    """(N, P, D) patch tokens of the tower's first feature layer."""
    out = []
    for i in range(0, len(samples), batch):
        px = images_to_tensor([s["image"] for s in samples[i:i + batch]], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        out.append(tower.hidden_states(px, tower.feature_layers[:1])[0][:, 1:])  # drop CLS
    return torch.cat(out)


def fit_linear(x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
               iters: int = 300, wd: float = 1e-3, seed: int = 0) -> float:
    """Test accuracy of a logistic regression (standardised features, full-batch Adam). Its
    initial weights come from `seed`, not from the caller's random state, which is left as it was."""
    mu, sd = x.mean(0), x.std(0) + 1e-5
    x, xt = (x - mu) / sd, (xt - mu) / sd
    k = int(max(y.max(), yt.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lin = torch.nn.Linear(x.shape[1], k)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=wd)
    with torch.enable_grad():
        for _ in range(iters):
            opt.zero_grad()
            F.cross_entropy(lin(x), y).backward()
            opt.step()
    return float((lin(xt).argmax(-1) == yt).float().mean())


def _samples(split: str, n: int, image_size: int, mix: dict, seed: int = 1) -> list[dict]:
    cfg = DataConfig(image_size=image_size, seed=seed, mix=mix)
    return [make_sample(split, i, cfg) for i in range(n)]


@torch.no_grad()
def probe_tower(tower: VisionTower, n_train: int = 1500, n_test: int = 500) -> dict[str, float]:
    """Accuracies: cell colour/shape (occupied cells), count, a patch's own row and column, OCR
    first character and length."""
    size = tower.cfg.image_size
    pool = cell_pool_matrix(tower.cfg)  # (9, P)
    res = {}
    tr = _samples("validation", n_train, size, {"caption_detailed": 1.0})
    te = _samples("test", n_test, size, {"caption_detailed": 1.0})
    ftr, fte = tower_tokens(tower, tr), tower_tokens(tower, te)
    ctr, cte = [torch.einsum("cp,bpd->bcd", pool, f).flatten(0, 1) for f in (ftr, fte)]  # (N*9, D)
    ttr, tte = cell_targets(tr), cell_targets(te)
    for k in ("colour", "shape"):
        y, yt = ttr[k].flatten(), tte[k].flatten()
        occ, occt = y > 0, yt > 0
        res[f"cell_{k}"] = round(fit_linear(ctr[occ], y[occ], cte[occt], yt[occt]), 4)
    res["cell_empty"] = round(fit_linear(ctr, (ttr["colour"].flatten() > 0).long(),
                                         cte, (tte["colour"].flatten() > 0).long()), 4)
    count = lambda ss: torch.tensor([len(s["meta"]["objects"]) - 1 for s in ss])  # noqa: E731
    res["count"] = round(fit_linear(ftr.mean(1), count(tr), fte.mean(1), count(te)), 4)
    # single patch tokens -> their own grid row / column (300 + 100 images' worth)
    g = tower.cfg.grid
    x, xt = ftr[:300].flatten(0, 1), fte[:100].flatten(0, 1)  # (N*P, D), image by image
    for k, y in (("row", torch.arange(g * g) // g), ("col", torch.arange(g * g) % g)):  # (P,) row-major
        res[f"patch_{k}"] = round(fit_linear(x, y.repeat(len(x) // (g * g)), xt, y.repeat(len(xt) // (g * g))), 4)
    tr = _samples("validation", n_train, size, {"ocr": 1.0})
    te = _samples("test", n_test, size, {"ocr": 1.0})
    ftr, fte = tower_tokens(tower, tr), tower_tokens(tower, te)
    pooled = lambda f: torch.cat([f.mean(1), f.amax(1)], -1)  # noqa: E731
    first = lambda ss: torch.tensor([CHARS.index(s["meta"]["text"][0]) for s in ss])  # noqa: E731
    length = lambda ss: torch.tensor([len(s["meta"]["text"]) - 3 for s in ss])  # noqa: E731
    res["ocr_first_char"] = round(fit_linear(pooled(ftr), first(tr), pooled(fte), first(te)), 4)
    res["ocr_length"] = round(fit_linear(pooled(ftr), length(tr), pooled(fte), length(te)), 4)
    return res


def probe_reading(tower: VisionTower, steps: int = 300, batch: int = 32, n_test: int = 256, lr: float = 1e-3,
                  seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Train a fresh reader on the frozen tower's tokens of `steps` x `batch` validation-split OCR
    scenes (warm-up then cosine decay); return the share of `n_test` test-split words read
    exactly ("read_ocr_exact") and of their characters ("read_ocr_char"), and the test captions'
    mean next-token cross-entropy ("read_loss")."""
    from tqdm import tqdm

    size = tower.cfg.image_size
    tok = CaptionTokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = TextTowerConfig()
        reader = Reader(tower.cfg, tok, text.width, text.heads, layers=2)
    opt = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=0.0)
    cfg = DataConfig(image_size=size, seed=seed + 1, mix={"ocr": 1.0})
    warm = max(1, steps // 10)
    for step in tqdm(range(steps), desc="reading probe", disable=not progress):
        samples = [make_sample("validation", step * batch + i, cfg) for i in range(batch)]
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, steps, warm, 0.0)
        with torch.enable_grad():
            loss, _ = reader(tower_tokens(tower, samples), tok([caption_of(s) for s in samples]),
                             torch.ones(batch, dtype=torch.bool))
            opt.zero_grad()
            loss.backward()
            opt.step()
    reader.eval()
    exact, chars, n_chars, loss = 0.0, 0.0, 0, 0.0
    test = [make_sample("test", i, cfg) for i in range(n_test)]
    for i in range(0, n_test, 64):
        part = test[i:i + 64]
        with torch.no_grad():
            batch_loss, m = reader(tower_tokens(tower, part), tok([caption_of(s) for s in part]),
                                   torch.ones(len(part), dtype=torch.bool))
        k = sum(len(s["meta"]["text"]) for s in part)  # every character is spelt: A-Z, 0-9
        exact, chars, n_chars = exact + m["reader_ocr_exact"] * len(part), chars + m["reader_char_acc"] * k, n_chars + k
        loss += float(batch_loss) * len(part)
    return {"read_ocr_exact": round(exact / n_test, 4), "read_ocr_char": round(chars / n_chars, 4),
            "read_loss": round(loss / n_test, 4)}


__all__ = ["probe_tower", "probe_reading", "fit_linear", "tower_tokens", "CELL_TARGETS"]
