import pytest
from transformers import BertConfig, LlamaConfig, MambaConfig, OPTConfig, T5Config

from adapt import AdaptError
from adapt.conversion.architectures import ARCHITECTURES, check_architecture
from tiny_models import ARCHS


def test_case_table_covers_every_supported_architecture():
    assert sorted(ARCHITECTURES) == ARCHS


@pytest.mark.parametrize("config, kind", [
    (BertConfig(), "encoder-only"),
    (T5Config(), "encoder-decoder"),
    (MambaConfig(), "state-space"),
    (OPTConfig(), "has not verified"),
], ids=["bert", "t5", "mamba", "opt"])
def test_unsupported_architectures_get_one_clear_error(config, kind):
    with pytest.raises(AdaptError, match=f"unsupported architecture '{config.model_type}': .*{kind}.*llama, mistral"):
        check_architecture(config)


def test_supported_row_is_returned():
    assert check_architecture(LlamaConfig()).family.startswith("LLaMA")
