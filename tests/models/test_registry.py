"""Registration with MindFormers: yaml builders, AutoConfig/AutoModel, pipeline by instance and by name."""
import pytest
from mindformers import AutoConfig, AutoModel
from mindformers.models.build_model import build_network
from mindformers.pipeline import pipeline
from mindformers.tools.register import MindFormerConfig

from knowlm import PRESETS, KnowLMConfig, KnowLMError, KnowLMForCausalLM, KnowLMTokenizer
from knowlm.files import CONFIG_DIR
from knowlm.models.pipelines import PIPELINE_CONFIGS, checkpoint_variable, config_path

SHIPPED_YAMLS = sorted(CONFIG_DIR.glob("*/*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_YAMLS, ids=lambda p: p.name)
def test_every_shipped_yaml_matches_its_preset(path):
    model_config = MindFormerConfig(str(path)).model.model_config        # base_config resolved
    preset = {"tiny": "tiny", "smollm2": "smollm2"}.get(path.parent.name, "knowlm-13b-zhixi")
    for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "rms_norm_eps"):
        assert model_config[key] == PRESETS[preset][1][key], key
    assert model_config["type"] == "KnowLMConfig"


def test_presets_have_llama_13b_shape():
    config = KnowLMConfig.from_name("knowlm-13b-ie")
    assert (config.hidden_size, config.num_layers, config.num_heads, config.intermediate_size, config.vocab_size,
            config.rms_norm_eps, config.seq_length, config.pad_token_id) == (5120, 40, 40, 13824, 32000, 1e-6, 2048, 0)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KnowLMError, match="unknown preset 'knowlm-7b'; expected one of knowlm-13b-base"):
        KnowLMConfig.from_name("knowlm-7b")


def test_yaml_builds_through_mindformers_builders(model_dir, monkeypatch):
    monkeypatch.setenv(checkpoint_variable("knowlm_tiny"), str(model_dir))
    config = MindFormerConfig(str(config_path("knowlm_tiny")))
    model = build_network(config.model)
    assert isinstance(model, KnowLMForCausalLM)
    assert isinstance(AutoConfig.from_pretrained(str(config_path("knowlm_tiny"))), KnowLMConfig)
    assert isinstance(AutoModel.from_config(str(config_path("knowlm_tiny"))), KnowLMForCausalLM)


def test_pipeline_by_instance_generates(model_dir):
    pipe = pipeline("text_generation", model=KnowLMForCausalLM.from_pretrained(model_dir, use_past=True),
                    tokenizer=KnowLMTokenizer(vocab_file=str(model_dir)))
    out = pipe("你非常了解一些健康生活的习惯，请列举几个健康生活的建议", do_sample=True, top_k=3, top_p=0.95,
               repetition_penalty=1.3, max_length=64)
    assert out[0]["text_generation_text"][0].startswith("你非常了解一些健康生活的习惯")


def test_pipeline_by_name_equals_model_directory(model_dir, monkeypatch):
    monkeypatch.setenv(checkpoint_variable("knowlm_tiny"), str(model_dir))
    by_name = pipeline("text_generation", model="knowlm_tiny")("知识图谱", max_new_tokens=8, do_sample=False)
    direct = pipeline("text_generation", model=KnowLMForCausalLM.from_pretrained(model_dir, use_past=True),
                      tokenizer=KnowLMTokenizer(vocab_file=str(model_dir)))("知识图谱", max_new_tokens=8,
                                                                               do_sample=False)
    assert by_name == direct


def test_pipeline_name_without_checkpoint_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv("KNOWLM_13B_ZHIXI_CHECKPOINT", raising=False)
    with pytest.raises(KnowLMError, match="export KNOWLM_13B_ZHIXI_CHECKPOINT=<model dir or .ckpt> or set "
                                          "model.model_config.checkpoint_name_or_path in"):
        pipeline("text_generation", model="knowlm_13b_zhixi")


def test_unknown_pipeline_name_lists_the_known_ones():
    with pytest.raises(KnowLMError, match="unknown pipeline name 'knowlm_7b'; expected one of knowlm_13b_base"):
        config_path("knowlm_7b")


def test_all_pipeline_names_are_registered_with_mindformers():
    from mindformers.mindformer_book import MindFormerBook
    table = MindFormerBook.get_pipeline_support_task_list()["text_generation"]
    assert {name: table[name] for name in PIPELINE_CONFIGS} == {n: str(config_path(n)) for n in PIPELINE_CONFIGS}


def test_an_edited_copy_of_a_predict_yaml_reads_its_own_weights_and_tokenizer(model_dir, tmp_path, monkeypatch):
    from knowlm.generate import generate
    from knowlm.models.load import load_model
    monkeypatch.delenv(checkpoint_variable("knowlm_tiny"), raising=False)
    copy = tmp_path / "my_predict.yaml"
    copy.write_text(config_path("knowlm_tiny").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(KnowLMError, match=f"set model.model_config.checkpoint_name_or_path in {copy}"):
        load_model(copy)
    copy.write_text(config_path("knowlm_tiny").read_text(encoding="utf-8").replace(
        'checkpoint_name_or_path: ""', f'checkpoint_name_or_path: "{model_dir}"'), encoding="utf-8")
    model, tokenizer = load_model(copy)
    expected = generate(*load_model(str(model_dir), use_past=True), "知识图谱", max_new_tokens=6)
    assert generate(model, tokenizer, "知识图谱", max_new_tokens=6) == expected
