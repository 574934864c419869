"""detect_format: llava-hf configs are read, an original LLaVA config is refused with the convert hint,
anything else names its model_type. Uses the real published config files in shared/real."""

import json
import os
from pathlib import Path

import pytest

from llava_core.model.config import ConfigError, LlavaConfig, detect_format

REAL = Path(os.environ.get("LLAVA_CORE_SHARED", Path(__file__).resolve().parents[1].parent / "shared")) / "real"


def real_config(name: str) -> Path:
    path = REAL / name / "config.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent (set LLAVA_CORE_SHARED to the folder holding real/)")
    return path


def test_real_llava_hf_config_is_read_with_its_own_values():
    path = real_config("llava-1.5-7b-hf")
    assert detect_format(json.loads(path.read_text())) == "llava"
    cfg = LlavaConfig.from_json(path)
    assert cfg.text.rms_norm_eps == 1e-5
    assert cfg.text.max_position_embeddings == 4096
    assert cfg.text.vocab_size == 32064
    assert cfg.num_image_tokens == 576
    assert (cfg.image_token_index, cfg.text.pad_token_id) == (32000, 32001)


def test_real_original_llava_config_is_refused_with_the_convert_hint():
    path = real_config("liuhaotian-llava-v1.5-7b")
    with pytest.raises(ConfigError) as e:
        LlavaConfig.from_json(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "original LLaVA checkpoint" in msg
    assert "llava-core convert SRC DST --vision-tower CLIP_DIR" in msg
    assert "openai/clip-vit-large-patch14-336" in msg  # the tower the file names


@pytest.mark.parametrize("model_type", ["llava_llama", "llava_mistral", "llava_mpt", None])
def test_original_configs_of_every_base_are_refused(model_type):
    d = json.loads(real_config("liuhaotian-llava-v1.5-7b").read_text())
    if model_type is None:
        d.pop("model_type")
    else:
        d["model_type"] = model_type
    with pytest.raises(ConfigError, match="original LLaVA checkpoint"):
        detect_format(d, "x/config.json")


def test_unknown_model_type_is_named_with_the_supported_ones():
    d = json.loads(real_config("llava-1.5-7b-hf").read_text())
    d["model_type"] = "idefics2"
    with pytest.raises(ConfigError, match=r"x/config.json: model_type='idefics2'.*'llava', 'llava_next'"):
        LlavaConfig.from_hf_dict(d, "x/config.json")
    with pytest.raises(ConfigError, match=r"model_type='llama'"):  # a plain LLaMA config
        detect_format({"model_type": "llama", "hidden_size": 64}, "x/config.json")


def test_llava_next_is_detected_and_read_by_its_own_class():
    d = json.loads(real_config("llava-1.5-7b-hf").read_text())
    d["model_type"] = "llava_next"
    assert detect_format(d) == "llava_next"
    with pytest.raises(ConfigError, match="model_type='llava_next', expected 'llava'.*read_config"):
        LlavaConfig.from_hf_dict(d, "x/config.json")  # the 1.5 class does not read a NeXT file
    from llava_core.model.next_config import LlavaNextConfig

    cfg = LlavaNextConfig.from_hf_dict(d, "x/config.json")  # NeXT's own defaults fill the pinpoints
    assert cfg.text.rms_norm_eps == 1e-5 and cfg.text.max_position_embeddings == 4096
