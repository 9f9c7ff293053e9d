"""ROME/MEMIT hyperparameter files (``knowlm.edit.hparams``): the shipped ones read, EasyEdit's own keys accepted,
mistakes refused with one line."""
import pytest

from knowlm.edit.hparams import HPARAMS_DIR, EditHParams, default_hparams_file, read_hparams
from knowlm.errors import KnowLMError
from knowlm.models.config import KnowLMConfig
from reference import one_line_error


@pytest.mark.parametrize("model", ["smollm2", "knowlm-13b", "tiny"])
@pytest.mark.parametrize("method", ["rome", "memit"])
def test_shipped_files_read_and_fit_their_model(model, method):
    preset = {"knowlm-13b": "knowlm-13b-zhixi"}.get(model, model)
    config = KnowLMConfig.from_name(preset)
    path = default_hparams_file(config, method)
    assert path == HPARAMS_DIR / method.upper() / f"{model}.yaml"
    hparams = read_hparams(path).check(config.num_layers, method)
    assert hparams.v_lr == 0.5 and hparams.kl_factor == 0.0625 and hparams.fact_token == "subject_last"


def test_easyedit_yaml_keys_are_accepted_and_unknown_ones_refused(tmp_path):
    path = tmp_path / "llama-7b.yaml"
    path.write_text('alg_name: "ROME"\nmodel_name: "./hugging_cache/llama-2-7b"\nlayers: [5]\nv_lr: 5e-1\n'
                    'rewrite_module_tmp: "model.layers.{}.mlp.down_proj"\nstats_dir: "./data/stats"\n', "utf-8")
    assert read_hparams(path) == EditHParams(layers=(5,), v_lr=0.5)
    path.write_text("layers: [5]\nv_lrr: 0.5\n", encoding="utf-8")
    one_line_error(lambda: read_hparams(path), "unknown key.*v_lrr")
    path.write_text("layers: [5]\nv_lr: fast\n", encoding="utf-8")
    one_line_error(lambda: read_hparams(path), "v_lr must be a number")


def test_layer_choices_the_method_or_model_cannot_use_are_refused():
    one_line_error(lambda: EditHParams(layers=(4, 5)).check(30, "rome"), "ROME edits one layer")
    one_line_error(lambda: EditHParams(layers=(29,)).check(30, "memit"), r"allow 0\.\.28")
    one_line_error(lambda: EditHParams(layers=()), "non-empty")
    config = KnowLMConfig(hidden_size=32, num_layers=3, intermediate_size=64, vocab_size=100)
    with pytest.raises(KnowLMError, match="--hparams FILE.yaml"):
        default_hparams_file(config, "rome")
