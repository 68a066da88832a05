import json
import shutil

import pytest
import torch
from conftest import write_tiny_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint, save_checkpoint
from rankdown.errors import RankdownError
from rankdown.factor import FactorizedLinear, shared_down_group
from rankdown.factor_record import FactorRecord


def _factorize_some(model):
    """One plain pair and one shared-down group, so both structures round-trip."""
    attn = model.model.layers[0].self_attn
    w = attn.o_proj.weight.detach()
    attn.o_proj = FactorizedLinear.from_factors(w[:16].clone(), torch.eye(64)[:, :16].clone())
    a = torch.randn(8, 64)
    q, k = shared_down_group(a, [torch.randn(64, 8), torch.randn(32, 8)], [None, None])
    attn.q_proj, attn.k_proj = q, k
    return model


def test_dense_load_matches_transformers(tiny_model_dir):
    ours = load_model(open_checkpoint(tiny_model_dir))
    theirs = LlamaForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    ids = torch.tensor([[0, 5, 9, 17, 3]])
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=0, rtol=0)


def test_save_then_load_is_bit_exact(tiny_model_dir, tmp_path):
    torch.manual_seed(1)
    model = _factorize_some(load_model(open_checkpoint(tiny_model_dir)))
    out = save_checkpoint(model, tiny_model_dir, tmp_path / "ckpt", dtype=torch.float32)
    ckpt = open_checkpoint(out)
    assert ckpt.record.modules["model.layers.0.self_attn.k_proj"].shares_down_with == "model.layers.0.self_attn.q_proj"
    again = load_model(ckpt)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert again.model.layers[0].self_attn.k_proj.shared_down is again.model.layers[0].self_attn.q_proj.down
    ids = torch.tensor([[0, 4, 8, 15]])
    assert torch.equal(model(ids).logits, again(ids).logits)
    stored = load_file(out / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.down.weight" in stored
    assert not any(k.startswith("model.layers.0.self_attn.k_proj.down") for k in stored)
    assert load_tokenizer(out).bos_token_id is not None


def test_half_precision_checkpoints_load(tmp_path, tiny_tokenizer):
    for dtype in (torch.float16, torch.bfloat16):
        folder = write_tiny_model(tmp_path / str(dtype), tiny_tokenizer, dtype=dtype)
        ckpt = open_checkpoint(folder)
        assert ckpt.stored_dtype == dtype
        assert load_model(ckpt).model.embed_tokens.weight.dtype == torch.float32


def test_tied_embeddings_round_trip(tmp_path, tiny_tokenizer):
    folder = write_tiny_model(tmp_path / "tied", tiny_tokenizer, tie_word_embeddings=True)
    model = load_model(open_checkpoint(folder))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = save_checkpoint(model, folder, tmp_path / "out", dtype=torch.float32)
    assert "lm_head.weight" not in load_file(out / "model.safetensors")


def _copy(src, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _error(path) -> str:
    with pytest.raises(RankdownError) as info:
        open_checkpoint(path)
    return str(info.value)


def test_missing_folder_and_missing_config(tmp_path):
    assert "no such folder" in _error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(tmp_path / "empty")


def test_non_llama_architecture_is_refused(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    assert "unsupported model type 'gpt2'" in _error(folder)


def test_pickle_only_folder_is_refused_without_unpickling(tiny_model_dir, tmp_path, monkeypatch):
    folder = _copy(tiny_model_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    import pickle

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    message = _error(folder)
    assert "no safetensors weights; pickle is not loaded" in message and "pytorch_model.bin" in message
    assert not sentinel.exists()


def test_config_that_disagrees_with_weights_names_the_tensor(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    assert "mlp.gate_proj.weight' has shape [128, 64] but the config implies [96, 64]" in _error(folder)
    config["intermediate_size"] = 128
    config["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    assert "model.layers.1" in _error(folder)


def test_non_finite_weight_is_named(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(RankdownError, match="model.layers.1.mlp.up_proj.weight' contains NaN"):
        load_model(open_checkpoint(folder))


def test_sharded_index_cannot_point_outside_the_folder(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path)
    names = list(load_file(folder / "model.safetensors"))
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "model.safetensors", outside)
    (folder / "model.safetensors").rename(folder / "shard.safetensors")
    for target in ("../outside.safetensors", str(outside)):
        index = {"weight_map": {n: target for n in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        assert "outside the model folder" in _error(folder)
    (folder / "link.safetensors").symlink_to(outside)
    index = {"weight_map": {n: "link.safetensors" for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "is a link" in _error(folder)
    index = {"weight_map": {n: "missing.safetensors" for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "is missing" in _error(folder)


def test_corrupt_factor_record_is_a_clean_error(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path)
    (folder / "factorization.json").write_text('{"schema_version": 1, "modules": {}, "extra": 1}')
    assert "invalid factorization record" in _error(folder)
    assert FactorRecord.read(tiny_model_dir).modules == {}


def test_finite_check_in_slices_finds_a_nan_past_the_first_slice():
    import torch

    from rankdown.checkpoint import FINITE_CHUNK, all_finite

    tensor = torch.zeros(FINITE_CHUNK + 10, dtype=torch.float16)
    assert all_finite(tensor)
    tensor[-1] = float("nan")
    assert not all_finite(tensor)
    tensor[-1] = float("-inf")
    assert not all_finite(tensor.reshape(2, -1))
    assert all_finite(torch.arange(10))  # integer tensors hold no NaN


def test_peak_rss_is_this_process_high_water_mark():
    from rankdown.memory import _status_bytes, peak_rss_mb

    assert peak_rss_mb() * 2**20 >= _status_bytes("VmRSS") > 0

