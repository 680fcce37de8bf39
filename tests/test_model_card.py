"""The model card: metadata, tables, a runnable load snippet, and a user's README kept."""

from __future__ import annotations

import os
import re

import pytest
import torch
import transformers

from hf_gb import GBConfig, GenomicBottleneck
from hf_gb.io.model_card import SECTION_START, is_hub_model_id, load_card, template_path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_bert(name_or_path: str | None = None):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    model = transformers.BertModel(config)
    if name_or_path is not None:
        model.config._name_or_path = name_or_path
    return model


def save(gb, folder, **card_kwargs) -> str:
    gb.save_pretrained(str(folder), model_card_kwargs=card_kwargs)
    return (folder / "README.md").read_text()


def test_card_metadata_tables_and_sizes(tmp_path):
    gb = GenomicBottleneck(tiny_bert("prajjwal1/bert-tiny"), GBConfig(hidden_dim=4, tile_size=16))
    state = {"log_history": [{"eval_loss": 1.5, "eval_accuracy": 0.75, "eval_runtime": 2.0}, {"train_loss": 2.25}],
             "global_step": 12, "epoch": 1.0}
    text = save(gb, tmp_path / "out", trainer_state=state, training_args={"learning_rate": 0.001, "seed": 3},
                datasets="imdb")
    card = load_card(str(tmp_path / "out"))
    assert card.data.library_name == "hf_gb"
    assert {"genomic-bottleneck", "hf_gb"} <= set(card.data.tags)
    assert card.data.base_model == "prajjwal1/bert-tiny"
    assert card.data.datasets == ["imdb"]
    assert card.data.metrics == ["accuracy"]
    stats = gb.stats()
    assert f"| covered (predicted by g-nets) | {len(gb.covered)} | {stats['covered_params']:,} |" in text
    assert f"**{stats['covered_compression']:.1f}x**" in text and f"**{stats['overall_compression']:.2f}x**" in text
    for r in stats["tensors"]:
        assert f"| `{r['name']}` | {'x'.join(map(str, r['shape']))} |" in text
    size = os.path.getsize(tmp_path / "out" / "gb_model.safetensors")
    assert f"| `gb_model.safetensors` | {size:,} |" in text
    assert "| accuracy | 0.75 |" in text and "| train_loss | 2.25 |" in text
    assert "| learning_rate | 0.001 |" in text and "| global_step | 12 |" in text


def test_local_paths_never_become_base_model(tmp_path):
    gb = GenomicBottleneck(tiny_bert(str(tmp_path)), GBConfig(hidden_dim=4, tile_size=16))
    save(gb, tmp_path / "out")
    assert load_card(str(tmp_path / "out")).data.base_model is None


@pytest.mark.parametrize(
    "name, expected",
    [("gpt2", True), ("user/model-1.5", True), ("/abs/path", False), ("./rel", False), ("a/b/c", False),
     ("../up", False), ("", False), (None, False), ("has space", False)],
)
def test_is_hub_model_id(name, expected):
    assert is_hub_model_id(name) is expected


def test_load_snippet_runs(tmp_path):
    gb = GenomicBottleneck(tiny_bert(), GBConfig(hidden_dim=4, tile_size=16))
    text = save(gb, tmp_path / "out")
    snippet = re.search(r"```python\n(.*?)```", text, re.S)[1]
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 (the card's own example)
    inputs = torch.tensor([[2, 4, 6, 8]])
    with torch.no_grad():
        expected = gb.model.eval()(inputs).last_hidden_state
        torch.testing.assert_close(namespace["model"](inputs).last_hidden_state, expected)


def test_users_readme_is_updated_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n# My model\n\nMy own words.\n")
    gb = GenomicBottleneck(tiny_bert(), GBConfig(hidden_dim=4, tile_size=16))
    save(gb, out)
    text = save(gb, out, model_name="second save")
    assert "# My model\n\nMy own words." in text
    assert text.count(SECTION_START) == 1 and "# second save" in text
    card = load_card(str(out))
    assert card.data.license == "mit" and card.data.tags[0] == "mine" and "genomic-bottleneck" in card.data.tags


@pytest.mark.parametrize(
    "readme",
    ["# Just a title\n\nNo metadata at all.\n", "---\ntags: [unclosed\n---\n# Broken YAML\n\nStill mine.\n",
     "---\ntags: single-tag\n---\nOne tag as a string.\n"],
)
def test_unusual_user_readmes_are_kept(readme, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text(readme)
    gb = GenomicBottleneck(tiny_bert(), GBConfig(hidden_dim=4, tile_size=16))
    text = save(gb, out)
    assert readme.splitlines()[-1] in text and text.count(SECTION_START) == 1
    card = load_card(str(out))
    assert "genomic-bottleneck" in card.data.tags
    if "single-tag" in readme:
        assert card.data.tags[0] == "single-tag"


def test_packaged_template_and_model_cards_copy_are_identical():
    with open(template_path(), encoding="utf-8") as f:
        packaged = f.read()
    with open(os.path.join(REPO_ROOT, "model_cards", "model_card.md"), encoding="utf-8") as f:
        assert f.read() == packaged, "model_cards/model_card.md drifted from hf_gb/templates/model_card.md"
