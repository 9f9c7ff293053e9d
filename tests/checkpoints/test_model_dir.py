"""The knowlm model directory: saving, loading, and the one-line errors for checkpoints that do not fit."""
import json
import shutil

import mindspore as ms
import numpy as np
import pytest

from reference import hf_dir, knowlm_logits, one_line_error
from knowlm import KnowLMConfig, KnowLMError, KnowLMForCausalLM
from knowlm.checkpoints import stream
from knowlm.checkpoints.convert import convert_checkpoint
from knowlm.checkpoints.model_dir import load_weights, save_pretrained
from knowlm.cli import main
from knowlm.files import WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from knowlm.models.load import load_model
from knowlm.tokenizer.spm import BUILTIN_TOKENIZER


def tiny(**overrides):
    return KnowLMForCausalLM(KnowLMConfig.from_name("tiny", **overrides))


def saved(tmp_path, name, **overrides):
    return save_pretrained(tiny(**overrides), tmp_path / name, BUILTIN_TOKENIZER)


def test_save_then_load_reproduces_logits(model_dir, tmp_path):
    first = KnowLMForCausalLM.from_pretrained(model_dir, use_past=False)
    again = KnowLMForCausalLM.from_pretrained(save_pretrained(first, tmp_path / "copy", BUILTIN_TOKENIZER),
                                              use_past=False)
    ids = [[1, 5, 9, 200, 3]]
    np.testing.assert_array_equal(knowlm_logits(first, ids), knowlm_logits(again, ids))


def test_model_directory_holds_only_complete_files(model_dir):
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", WEIGHTS_NAME, "tokenizer.model"]


def test_existing_directory_is_not_overwritten_without_force(model_dir):
    with pytest.raises(KnowLMError, match=r"already holds a result \(config.json\); pass --force"):
        save_pretrained(tiny(), model_dir, BUILTIN_TOKENIZER)


def test_checkpoint_for_another_vocabulary_is_refused(tmp_path):
    other = saved(tmp_path, "v500", vocab_size=500)
    with pytest.raises(KnowLMError, match="vocabulary of 500 tokens in 'model.tok_embeddings.embedding_weight', "
                                          "but the config has vocab_size 1000"):
        load_weights(tiny(), other)


def test_checkpoint_for_another_size_is_refused(tmp_path):
    other = saved(tmp_path, "wide", intermediate_size=192)
    with pytest.raises(KnowLMError, match=r"'model.layers.0.feed_forward.w1.weight' has shape \(192, 64\), "
                                          r"expected \(176, 64\)"):
        load_weights(tiny(), other)


def test_checkpoint_missing_parameters_is_refused(tmp_path):
    other = saved(tmp_path, "shallow", num_layers=1)
    with pytest.raises(KnowLMError, match=r"9 parameter\(s\) missing, e.g. model.layers.1"):
        load_weights(tiny(), other)


def test_checkpoint_with_foreign_tensors_is_refused(tmp_path):
    path = tmp_path / "foreign.ckpt"
    ms.save_checkpoint([{"name": "encoder.weight", "data": ms.Tensor(np.zeros(3, np.float32))}], str(path))
    with pytest.raises(KnowLMError, match="unexpected tensor 'encoder.weight'"):
        load_weights(tiny(), path)


def test_truncated_checkpoint_is_refused(model_dir, tmp_path):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes((model_dir / WEIGHTS_NAME).read_bytes()[:1000])
    one_line_error(lambda: load_weights(tiny(), broken), f"^{broken}: truncated or corrupt MindSpore checkpoint")


# ----------------------------------------------------------------------------- damaged files and checksums

def copy_model(model_dir, target):
    shutil.copytree(model_dir, target)
    return target


def flip_byte(path, at=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_converted_model_is_refused_naming_the_file(model_dir, tmp_path):
    damaged = copy_model(model_dir, tmp_path / "damaged")
    flip_byte(damaged / WEIGHTS_NAME)
    one_line_error(lambda: load_weights(tiny(), damaged),
                   f"^{damaged / WEIGHTS_NAME}: checksum mismatch: the file is damaged .*; copy or convert it again$")


def test_truncated_shard_is_refused_naming_the_shard(tmp_path):
    model = convert_checkpoint(hf_dir(tmp_path, sharded=True), tmp_path / "sharded").output
    shard = sorted(model.glob("mindspore_model-*.ckpt"))[1]
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size * 2 // 3])
    one_line_error(lambda: load_weights(tiny(), model), f"^{shard}: truncated or corrupt MindSpore checkpoint")


def test_shard_cut_between_two_tensors_is_named_by_its_missing_parameters(tmp_path):
    model = convert_checkpoint(hf_dir(tmp_path, sharded=True), tmp_path / "sharded").output
    shard = sorted(model.glob("mindspore_model-*.ckpt"))[1]
    first = stream.scan(shard)[0]
    shard.write_bytes(shard.read_bytes()[:first.segments[-1][0] + first.nbytes])    # one whole record, no trailer
    one_line_error(lambda: load_weights(tiny(), model), rf"^{shard}: \d+ parameter\(s\) missing")


def test_checkpoints_with_and_without_a_crc_trailer_both_load(model_dir, tmp_path):
    saved_dir = saved(tmp_path, "saved")
    assert stream.stored_crc(saved_dir / WEIGHTS_NAME) is not None     # save_pretrained: crc_check=True
    load_weights(tiny(), saved_dir)
    plain = copy_model(model_dir, tmp_path / "plain")                   # as older knowlm and MindSpore wrote them
    weights = ms.load_checkpoint(str(plain / WEIGHTS_NAME))
    (plain / WEIGHTS_NAME).unlink()
    ms.save_checkpoint([{"name": k, "data": v} for k, v in weights.items()], str(plain / WEIGHTS_NAME))
    assert stream.stored_crc(plain / WEIGHTS_NAME) is None
    ids = [[1, 5, 9, 200, 3]]
    np.testing.assert_array_equal(knowlm_logits(KnowLMForCausalLM.from_pretrained(plain, use_past=False), ids),
                                  knowlm_logits(KnowLMForCausalLM.from_pretrained(model_dir, use_past=False), ids))


def test_cli_generate_from_a_damaged_model_is_one_line_with_exit_status_2(model_dir, tmp_path, capsys):
    damaged = copy_model(model_dir, tmp_path / "damaged")
    flip_byte(damaged / WEIGHTS_NAME)
    assert main(["generate", "--model", str(damaged), "--max-new-tokens", "2", "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"knowlm: error: {damaged / WEIGHTS_NAME}: checksum mismatch: the file is damaged")
    assert len([line for line in err if line.startswith("knowlm: error:")]) == 1


def test_index_listing_a_missing_shard_is_refused(tmp_path):
    (tmp_path / WEIGHTS_INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "part-1.ckpt"}}))
    with pytest.raises(KnowLMError, match="lists shard\\(s\\) not in the directory: part-1.ckpt"):
        load_weights(tiny(), tmp_path)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(KnowLMError, match="config.json: not found; expected a knowlm model directory"):
        KnowLMForCausalLM.from_pretrained(tmp_path)


def test_load_model_accepts_directory_yaml_name_and_tiny(model_dir, monkeypatch):
    monkeypatch.setenv("KNOWLM_TINY_CHECKPOINT", str(model_dir))
    from knowlm.models.pipelines import config_path
    for spec in (str(model_dir), str(config_path("knowlm_tiny")), "knowlm_tiny", "tiny"):
        model, tokenizer = load_model(spec, use_past=False)
        assert isinstance(model, KnowLMForCausalLM) and tokenizer.vocab_size == 1000


@pytest.mark.parametrize("spec, message", [
    ("knowlm-13b-zhixi", "preset 'knowlm-13b-zhixi' has no weights"),
    ("nothing-here", r"model 'nothing-here': not a model directory, packaged model \(smollm2\), yaml file, pipeline name"),
])
def test_load_model_refuses_what_it_cannot_load(spec, message):
    with pytest.raises(KnowLMError, match=message):
        load_model(spec)
