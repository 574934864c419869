"""Token-order interventions (llava_core/token_order.py): the reorder moves tokens and nothing
else, and the model is left as it was."""

import pytest
import torch

from llava_core.checkpoints.loader import load_pretrained
from llava_core.model.processor import LlavaProcessor
from llava_core.research.token_order import format_route, logit_gaps, position_route, reorder_grid, reordered, scenes


@pytest.fixture(scope="module")
def ours(tiny_ckpt):
    return load_pretrained(tiny_ckpt).eval(), LlavaProcessor.from_pretrained(tiny_ckpt)


def test_reorder_grid_moves_whole_tokens():
    x = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)  # 2 images, a 2x3 grid, 3 channels
    ids = lambda y: (y[..., 0] / 3).long().tolist()  # token index of each row of features
    assert ids(reorder_grid(x, 2, 3, "none")) == ids(x)
    assert ids(reorder_grid(x, 2, 3, "rows_reversed"))[0] == [3, 4, 5, 0, 1, 2]
    assert ids(reorder_grid(x, 2, 3, "cols_reversed"))[0] == [2, 1, 0, 5, 4, 3]
    assert ids(reorder_grid(x, 2, 3, "transposed"))[0] == [0, 3, 1, 4, 2, 5]
    assert ids(reorder_grid(x, 2, 3, "transposed"))[1] == [6, 9, 7, 10, 8, 11]
    torch.testing.assert_close(reorder_grid(reorder_grid(x, 2, 3, "rows_reversed"), 2, 3, "rows_reversed"), x)


def test_reorder_grid_keeps_a_cls_token_first():
    x = torch.arange(7, dtype=torch.float32).view(1, 7, 1)  # CLS + a 2x3 grid
    assert reorder_grid(x, 2, 3, "rows_reversed").flatten().tolist() == [0, 4, 5, 6, 1, 2, 3]


@pytest.mark.parametrize("mode", ["none", "rows_reversed", "cols_reversed", "transposed"])
@pytest.mark.parametrize("kind", ["mlp2x_gelu_cols", "mlp2x_gelu_newline"])
def test_reorder_of_a_projectors_tokens_is_its_output_on_the_reordered_grid(kind, mode):
    """mlpNx_gelu_cols emits the grid row-major and then column-major, mlpNx_gelu_newline ends
    each row with a learned token: reordering their tokens must equal the projector's output on
    the reordered grid (every token moves with its twin; the newlines stay where rows end)."""
    from llava_core.model.config import ProjectorConfig
    from llava_core.model.projector import build_projector

    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(kind=kind), 4, 8, n_tokens=9)
    x = torch.randn(2, 9, 4)  # (B, 3x3 grid, Dv)
    with torch.no_grad():
        y = proj(x)  # (B, 18 or 12, 8)
        rebuilt = proj(reorder_grid(x, 3, 3, mode))
    torch.testing.assert_close(reorder_grid(y, 3, 3, mode), rebuilt, rtol=0, atol=0)
    assert torch.equal(reorder_grid(y, 3, 3, mode), y) == (mode == "none")


def test_reorder_of_a_non_square_grid_with_newlines():
    x = torch.arange(8, dtype=torch.float32).view(1, 8, 1)  # a 2x3 grid, a newline after each row: 0 1 2 N 4 5 6 N
    assert reorder_grid(x, 2, 3, "cols_reversed").flatten().tolist() == [2, 1, 0, 3, 6, 5, 4, 7]
    assert reorder_grid(x, 2, 3, "rows_reversed").flatten().tolist() == [4, 5, 6, 3, 0, 1, 2, 7]
    with pytest.raises(ValueError, match="transposing a 2x3 grid with a newline"):
        reorder_grid(x, 2, 3, "transposed")


@pytest.mark.parametrize("args, message", [((2, 2, "none"), "7 tokens per image"),
                                           ((2, 3, "sideways"), "mode='sideways'")])
def test_reorder_grid_names_the_bad_argument(args, message):
    with pytest.raises(ValueError, match=message):
        reorder_grid(torch.zeros(1, 7, 4), *args)


def test_reordered_changes_only_the_token_order_and_restores_the_model(ours):
    model, _ = ours
    px = torch.randn(1, 3, 336, 336)
    ids = torch.tensor([[1] + [model.cfg.image_token_index] * model.cfg.num_image_tokens + [5, 6]])
    plain_feats, plain_logits = model.image_features(px), model(ids, pixel_values=px)
    with reordered(model, "rows_reversed"):
        feats = model.image_features(px)
        logits = model(ids, pixel_values=px)
    torch.testing.assert_close(feats, reorder_grid(plain_feats, 24, 24, "rows_reversed"), rtol=0, atol=0)
    # the reordered pass equals one fed the reordered features directly
    direct = model.logits(model.language_model(model.embed(ids, image_features=feats)))
    torch.testing.assert_close(logits, direct, rtol=1e-5, atol=1e-5)
    assert (logits - plain_logits).abs().max() > 1e-4  # the order reached the decoder
    with pytest.raises(RuntimeError, match="boom"):
        with reordered(model, "transposed"):
            raise RuntimeError("boom")
    torch.testing.assert_close(model(ids, pixel_values=px), plain_logits, rtol=0, atol=0)
    with reordered(model, "rows_reversed"), reordered(model, "rows_reversed"):  # nested: twice is none
        torch.testing.assert_close(model.image_features(px), plain_feats, rtol=0, atol=0)
        with reordered(model, "cols_reversed"):
            pass
        torch.testing.assert_close(model.image_features(px), plain_feats, rtol=0, atol=0)
    assert "image_features" not in model.__dict__


def test_position_route_reports_the_logit_gaps_it_measured(ours):
    model, processor = ours
    items = scenes(4, model.cfg.vision.image_size)
    assert all(o["col"] != 1 and o["row"] != 1 for _, o in items)
    table = position_route(model, processor, n=4, modes=("none", "cols_reversed"))
    gaps = logit_gaps(model, processor, items)
    for axis, first, second in (("left/right", "left", "right"), ("top/bottom", "top", "bottom")):
        row = table["none"][axis]
        want = [g for a, g in gaps[axis] if a == first]
        if want:
            assert row[f"gap | {first}"] == pytest.approx(sum(want) / len(want), abs=1e-5)
            if any(a == second for a, _ in gaps[axis]):
                assert row["separation"] == pytest.approx(row[f"gap | {first}"] - row[f"gap | {second}"])
    assert table["cols_reversed"]["left/right"] != table["none"]["left/right"]
    assert "| cols_reversed |" in format_route(table)


def test_command_prints_and_writes_the_table(ours, tiny_ckpt, tmp_path, capsys):
    import json

    from llava_core.cli.main import main

    out = tmp_path / "route.json"
    assert main(["token-order", str(tiny_ckpt), "--n", "4", "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert set(table) == {"none", "rows_reversed", "cols_reversed", "transposed"}
    model, processor = ours
    want = position_route(model, processor, n=4, modes=("transposed",))["transposed"]["top/bottom"]
    got = table["transposed"]["top/bottom"]["separation"]
    assert got == pytest.approx(want["separation"], abs=1e-5)  # finite: rows 0 and 2 are both among the 4
    printed = capsys.readouterr().out
    assert "| image tokens | left/right separation | top/bottom separation |" in printed
    rows = [line.split(" | ")[0] for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == ["| none", "| rows_reversed", "| cols_reversed", "| transposed"]


def test_logit_gaps_refuses_answers_sharing_a_first_token(ours):
    class OneToken:  # every word starts with token 5
        def encode(self, text, add_special_tokens=False):
            return [5, 6]

    class Proc:
        tokenizer = OneToken()

    with pytest.raises(ValueError, match="'left' and 'right' start with the same token"):
        logit_gaps(ours[0], Proc(), [])
