"""Natural questions on the three images in weights/examples/, each asked alone (greedy), with
the answer a person would give (or several, where people would word it differently) and whether
the model's matches one of them (VQA normalisation).

    python benchmarks/example_questions.py default
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# image -> (question, the right answer or a tuple of right answers)
QUESTIONS = {
    "shapes.png": [("What shapes are in the image?", "triangle, star, square, cross and heart"),
                   ("How many shapes are there?", "6"), ("What colour is the star?", "blue"),
                   ("Is there a star?", "yes"), ("What colour is the circle?", "There is no circle."),
                   ("Is the heart on the left or the right?", "right")],
    "text.png": [("What does the text say?", "STOP"), ("What colour is the text?", "brown"),
                 ("Is there any text in the image?", "yes"), ("How many letters does the word have?", "4")],
    "document.png": [("What is the title of this document?", "ORDER"), ("What is the total?", "12"),
                     ("How much is SALT?", "8"), ("What kind of image is this?", ("a receipt", "a document"))],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="'default', a parts folder or a llava-hf folder")
    args = p.parse_args(argv)

    import torch
    from PIL import Image

    from llava_core.checkpoints.loader import load_pretrained
    from llava_core.default.cache import resolve_model
    from llava_core.eval import answer_batch
    from llava_core.eval.metrics import exact_match
    from llava_core.model.processor import LlavaProcessor

    folder = resolve_model(args.model)
    model = load_pretrained(folder, dtype=torch.float32).eval()
    proc = LlavaProcessor.from_pretrained(folder)
    right = total = 0
    for name, qa in QUESTIONS.items():
        image = Image.open(ROOT / "weights" / "examples" / name).convert("RGB")
        convs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q, _ in qa]
        answers = answer_batch(model, proc, convs, [[image]] * len(qa), max_new_tokens=40)
        for (q, want), got in zip(qa, answers):
            ok = any(exact_match(got, w) == 1.0 for w in ((want,) if isinstance(want, str) else want))
            right, total = right + ok, total + 1
            print(f"{'right' if ok else 'WRONG'}  {name}  {q}  -> {got!r}" + ("" if ok else f" (want {want!r})"))
    print(f"{right} of {total} right")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
