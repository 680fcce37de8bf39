"""transformers' own loaders on compressed checkpoints (hf_gb.io.loader): after `import hf_gb`, from_pretrained and
pipeline give the model load_compressed gives; without hf_gb, every route fails loudly (in a subprocess that never
imports hf_gb)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import HubServer, point_client_at  # noqa: E402

import hf_gb  # noqa: E402
from hf_gb import GBConfig, GenomicBottleneck  # noqa: E402
from hf_gb.files import MODEL_CONFIG_NAME, TRANSFORMERS_WEIGHTS_NOTE, WEIGHTS_NAME  # noqa: E402
from hf_gb.io.hub import push_folder  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf_gb-0.1.0")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 0, 8, 6, 1]])
VOCAB = 64


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32))


def gpt2():  # tied input and output embeddings
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2,
                                                                n_head=2, bos_token_id=0, eos_token_id=0))


def bert(head: bool):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    return (transformers.BertForMaskedLM if head else transformers.BertModel)(config)


# name: (model builder, the Auto class that loads it)
CASES = {
    "llama": (llama, transformers.AutoModelForCausalLM),
    "gpt2": (gpt2, transformers.AutoModelForCausalLM),
    "bert": (lambda: bert(False), transformers.AutoModel),
    "bert_mlm": (lambda: bert(True), transformers.AutoModelForMaskedLM),
}


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1")


def save(model, folder, **kwargs) -> str:
    torch.manual_seed(1)
    gb = GenomicBottleneck(model, GBConfig(hidden_dim=4, tile_size=16, gains="rows"))
    with torch.no_grad():  # g-nets other than the init, so that a load that skipped them would show
        for p in gb.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gb.predict_weights(sample=False, keep_graph=False)
    return gb.save_pretrained(str(folder), **kwargs)


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT)[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, (build, _) in CASES.items():
        torch.manual_seed(0)
        out[name] = save(build(), tmp_path_factory.mktemp(name), model_card=False)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_auto_and_concrete_from_pretrained_give_the_load_compressed_model(name, folders):
    expected = hf_gb.load_compressed(folders[name])
    for loader in (CASES[name][1], type(expected)):
        model = loader.from_pretrained(folders[name])
        assert type(model) is type(expected) and not model.training
        torch.testing.assert_close(outputs(model), outputs(expected), rtol=0, atol=0)
        assert model.hf_quantizer.bottleneck.model is model
        assert model.config.quantization_config.quant_method == "hf_gb"


def test_from_pretrained_honours_dtype_and_reports_no_missing_keys(folders):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folders["llama"], dtype=torch.float64,
                                                                    output_loading_info=True)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    # Only the covered weights are missing for transformers (hf_gb predicts them), and they are not reported.
    assert not info["unexpected_keys"] and not info["mismatched_keys"] and not info["missing_keys"]
    expected = hf_gb.load_compressed(folders["llama"], dtype=torch.float64)
    torch.testing.assert_close(outputs(model), outputs(expected), rtol=0, atol=0)


def test_pipeline_generates_what_the_load_compressed_model_generates(tmp_path):
    torch.manual_seed(0)
    folder = save(llama(), tmp_path / "lm", processing_class=tokenizer())
    generated = transformers.pipeline("text-generation", model=folder)("t3 t5 t7", max_new_tokens=4,
                                                                          do_sample=False)
    expected = transformers.pipeline("text-generation", model=hf_gb.load_compressed(folder),
                                     tokenizer=tokenizer())("t3 t5 t7", max_new_tokens=4, do_sample=False)
    assert generated == expected and generated[0]["generated_text"].startswith("t3 t5 t7")


def test_save_pretrained_writes_the_compressed_format_again(folders, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(folders["gpt2"])
    model.save_pretrained(tmp_path / "again")
    names = set(os.listdir(tmp_path / "again"))
    assert {WEIGHTS_NAME, "gb_config.json", MODEL_CONFIG_NAME} <= names
    assert not any(n.startswith(("model", "pytorch_model")) for n in names)  # no dense weights
    with open(tmp_path / "again" / MODEL_CONFIG_NAME) as f:
        config = json.load(f)
    assert config["transformers_weights"] == TRANSFORMERS_WEIGHTS_NOTE
    for again in (hf_gb.load_compressed(tmp_path / "again"),
                  transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")):
        torch.testing.assert_close(outputs(again), outputs(model), rtol=0, atol=0)


def test_save_pretrained_refuses_weights_changed_after_the_load(folders, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(folders["llama"])
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(ValueError, match="changed after hf_gb predicted them"):
        model.save_pretrained(tmp_path / "stale")
    assert not (tmp_path / "stale").exists()
    with pytest.raises(ValueError, match="variant is not supported"):
        transformers.AutoModelForCausalLM.from_pretrained(folders["llama"]).save_pretrained(tmp_path / "v",
                                                                                           variant="fp16")


def test_dequantize_leaves_a_plain_model_that_saves_dense_weights(folders, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(folders["llama"])
    before = outputs(model)
    model = model.dequantize()
    assert not hasattr(model, "hf_quantizer") and not getattr(model.config, "quantization_config", None)
    model.save_pretrained(tmp_path / "dense")
    assert os.path.isfile(tmp_path / "dense" / "model.safetensors")
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(outputs(dense), before, rtol=0, atol=0)


def test_a_hub_repo_id_loads_through_from_pretrained(folders, monkeypatch, tmp_path):
    with HubServer() as server:
        point_client_at(monkeypatch, server, str(tmp_path / "hub-cache"))
        push_folder(folders["llama"], "tester/gb-llama")
        model = transformers.AutoModelForCausalLM.from_pretrained("tester/gb-llama")
    torch.testing.assert_close(outputs(model), outputs(hf_gb.load_compressed(folders["llama"])), rtol=0, atol=0)


def test_push_to_hub_of_the_loaded_model_pushes_the_compressed_files(folders, monkeypatch, tmp_path):
    with HubServer() as server:
        point_client_at(monkeypatch, server, str(tmp_path / "hub-cache"))
        model = transformers.AutoModelForCausalLM.from_pretrained(folders["gpt2"])
        model.push_to_hub("tester/gb-gpt2")
        assert WEIGHTS_NAME in server.files("tester/gb-gpt2")
        assert not any(n.startswith("model") for n in server.files("tester/gb-gpt2"))
        again = transformers.AutoModelForCausalLM.from_pretrained("tester/gb-gpt2")
    torch.testing.assert_close(outputs(again), outputs(model), rtol=0, atol=0)


def test_an_edited_quantization_config_is_refused_with_the_file_named(folders, tmp_path):
    import shutil

    folder = shutil.copytree(folders["llama"], tmp_path / "edited")
    path = folder / MODEL_CONFIG_NAME
    config = json.loads(path.read_text())
    config["quantization_config"]["tile_size"] = [8, 8]  # other tiles, whatever the family
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json \(quantization_config\) is \[16, 16, 1\] but this model gives"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("name", ["llama_rows", "llama_shared"])
def test_old_checkpoints_load_with_load_compressed_and_a_rewrite_loads_through_transformers(name, tmp_path):
    old = os.path.join(FIXTURES, name)
    model = hf_gb.load_compressed(old)
    assert not hasattr(model.config, "quantization_config")
    GenomicBottleneck.from_pretrained(old).save_pretrained(tmp_path / "new")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "new")
    torch.testing.assert_close(outputs(again), outputs(model), rtol=0, atol=0)


def run_without_hf_gb(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that fails if anything imports hf_gb."""
    guard = textwrap.dedent("""
        import sys
        class _NoHfGb:
            def find_spec(self, name, path=None, target=None):
                if name == "hf_gb" or name.startswith("hf_gb."):
                    raise AssertionError("this process must not import " + name)
        sys.meta_path.insert(0, _NoHfGb())
    """)
    return subprocess.run([sys.executable, "-c", guard + textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def test_without_hf_gb_every_transformers_route_fails_loudly(tmp_path):
    torch.manual_seed(0)
    folder = save(llama(), tmp_path / "lm", processing_class=tokenizer())
    again = tmp_path / "again"
    transformers.AutoModelForCausalLM.from_pretrained(folder).save_pretrained(again)  # re-saved by the route
    code = f"""
        import transformers
        routes = {{
            "auto": lambda f: transformers.AutoModelForCausalLM.from_pretrained(f),
            "auto_base": lambda f: transformers.AutoModel.from_pretrained(f),
            "concrete": lambda f: transformers.LlamaForCausalLM.from_pretrained(f),
            "pipeline": lambda f: transformers.pipeline("text-generation", model=f),
        }}
        for folder in ({str(folder)!r}, {str(again)!r}):
            for name, load in routes.items():
                try:
                    load(folder)
                except Exception as e:
                    assert "import hf_gb" in str(e) and "pip install hf_gb" in str(e), (name, str(e)[-500:])
                    print("refused", name)
                else:
                    raise AssertionError(name + " loaded a compressed checkpoint without hf_gb")
        assert "hf_gb" not in sys.modules
    """
    result = run_without_hf_gb(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("refused") == 8


def test_import_hf_gb_registers_without_importing_transformers(folders):
    code = f"""
        import sys
        sys.meta_path.pop(0)  # hf_gb allowed here
        import hf_gb
        assert "transformers" not in sys.modules, "import hf_gb imported transformers"
        import torch, transformers
        model = transformers.AutoModelForCausalLM.from_pretrained({folders["llama"]!r})
        assert model.hf_quantizer.bottleneck is not None
        print("ok")
    """
    result = run_without_hf_gb(code, PYTHONPATH=REPO)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_the_quantizer_classes_are_registered_and_picklable():
    import pickle

    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from hf_gb.io import loader

    assert AUTO_QUANTIZER_MAPPING["hf_gb"] is loader.GBQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["hf_gb"] is loader.GBQuantizationConfig
    config = loader.GBQuantizationConfig(hidden_dim=4, tensors=[])
    assert pickle.loads(pickle.dumps(config)).to_dict() == {"quant_method": "hf_gb", "hidden_dim": 4, "tensors": []}
    assert loader.register()  # again: no "already registered" error
