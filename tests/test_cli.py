"""The ``hf-gb`` command on tiny models: info, decompress, compress, push, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import HubServer, point_client_at  # noqa: E402

import hf_gb  # noqa: E402
from hf_gb import GBConfig, GenomicBottleneck  # noqa: E402
from hf_gb.cli import main  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT = torch.tensor([[2, 7, 4, 9, 5]])
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "genomic", "bottleneck"]


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 7, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=16)
    return transformers.BertModel(config).eval()


@pytest.fixture
def model_dir(tmp_path):
    """A plain transformers folder with a (word-piece) tokenizer."""
    folder = tmp_path / "bert"
    tiny_bert().save_pretrained(folder)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(folder)
    return folder


@pytest.fixture
def checkpoint(tmp_path):
    gb = GenomicBottleneck(tiny_bert(), GBConfig(hidden_dim=4, tile_size=16))
    return gb, gb.save_pretrained(str(tmp_path / "gb"))


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what setup printed (transformers' progress bars)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def hidden(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).last_hidden_state


@pytest.mark.parametrize("command", ["info", "decompress", "compress", "push"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: hf-gb {command}" in capsys.readouterr().out


def test_info_prints_the_compression_table(checkpoint, capsys):
    gb, folder = checkpoint
    code, out, _ = run(capsys, "info", folder)
    assert code == 0
    for t in gb.covered:
        assert t.name in out
    stats = gb.stats()
    assert f"g-net params: {stats['gnet_params']:,}" in out
    size = os.path.getsize(os.path.join(folder, "gb_model.safetensors"))
    assert f"{size:,} bytes" in out
    code, out, _ = run(capsys, "info", folder, "--json")
    data = json.loads(out)
    assert data["gnet_params"] == stats["gnet_params"] and data["files"]["gb_model.safetensors"] == size


def test_decompress_writes_a_folder_transformers_loads_without_hf_gb(checkpoint, tmp_path, capsys):
    gb, folder = checkpoint
    out_dir = tmp_path / "plain"
    code, _, _ = run(capsys, "decompress", folder, out_dir)
    assert code == 0
    assert not any(name.startswith("gb_") for name in os.listdir(out_dir))
    script = (
        "import sys; sys.modules['hf_gb'] = None  # any import of hf_gb now fails\n"
        "import torch, transformers\n"
        f"model = transformers.AutoModel.from_pretrained({str(out_dir)!r}).eval()\n"
        f"torch.save(model(torch.tensor({INPUT.tolist()!r})).last_hidden_state.detach(), {str(tmp_path / 'h.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "h.pt"), hidden(gb.model.eval()))


def test_compress_fits_writes_a_checkpoint_and_reports_errors(model_dir, tmp_path, capsys):
    out_dir, report = tmp_path / "compressed", tmp_path / "report.json"
    code, out, _ = run(capsys, "compress", model_dir, out_dir, "--compression", "3", "--hidden-dim", "4",
                       "--steps", "5", "--quiet", "--report", report)
    assert code == 0
    errors = json.loads(report.read_text())["relative_errors"]
    assert len(errors) == 13  # 2 layers x 6 Linear + pooler
    for name, err in errors.items():
        assert name in out and 0 < err < 3
    assert "mean relative weight error" in out
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)  # the tokenizer travels with the checkpoint
    assert tokenizer("hello genomic world")["input_ids"] == [2, 5, 7, 6, 3]
    gb = GenomicBottleneck.from_pretrained(str(out_dir))
    assert 2.5 < gb.stats()["covered_compression"] < 3.5
    model = hf_gb.load_compressed(str(out_dir))
    original = transformers.BertModel.from_pretrained(model_dir)
    for t in gb.covered:  # the checkpoint predicts weights whose error is the one reported
        w, target = dict(model.named_parameters())[t.name], dict(original.named_parameters())[t.name]
        assert abs(((w - target).norm() / target.norm()).item() - errors[t.name]) < 1e-4


def test_push_uploads_the_checkpoint(checkpoint, tmp_path, monkeypatch, capsys):
    _, folder = checkpoint
    with HubServer() as server:
        point_client_at(monkeypatch, server, str(tmp_path / "cache"))
        code, out, _ = run(capsys, "push", folder, "tester/cli-push")
        assert code == 0 and "tester/cli-push" in out
        remote = server.files("tester/cli-push")
        commit = server.commits("tester/cli-push")[-1]
        code, out, _ = run(capsys, "info", "tester/cli-push", "--revision", commit, "--cache-dir", tmp_path / "c")
        assert code == 0 and "covered compression" in out and commit in out  # the snapshot folder of that commit
        code, _, err = run(capsys, "info", "tester/cli-push", "--revision", "v9", "--cache-dir", tmp_path / "c")
        assert code == 1 and "no such revision" in err
    with open(os.path.join(folder, "gb_model.safetensors"), "rb") as f:
        assert remote["gb_model.safetensors"] == f.read()
    assert 'load_compressed("tester/cli-push")' in remote["README.md"].decode()


@pytest.fixture(scope="module")
def error_paths(tmp_path_factory):
    """Folders that are missing, plain transformers, compressed, and compressed with a truncated weights file."""
    tmp = tmp_path_factory.mktemp("errors")
    tiny_bert().save_pretrained(tmp / "plain")
    gb = GenomicBottleneck(tiny_bert(), GBConfig(hidden_dim=4, tile_size=16))
    folder = gb.save_pretrained(str(tmp / "gb"))
    bad = gb.save_pretrained(str(tmp / "bad"))
    return {"tmp": tmp, "plain": tmp / "plain", "gb": folder, "corrupt": corrupt(bad)}


def corrupt(folder: str) -> str:
    path = os.path.join(folder, "gb_model.safetensors")
    with open(path, "rb") as f:
        head = f.read(64)
    with open(path, "wb") as f:
        f.write(head)
    return folder


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "{tmp}/missing"], "No compressed checkpoint folder"),
        (["info", "{plain}"], "not a compressed hf_gb checkpoint"),
        (["info", "{corrupt}"], "corrupt or truncated"),
        (["decompress", "{corrupt}", "{tmp}/out"], "corrupt or truncated"),
        (["decompress", "{gb}", "{gb}/gb_config.json"], "is a file"),
        (["compress", "{tmp}/missing", "{tmp}/out", "--compression", "4"], "no model folder"),
        (["compress", "{gb}", "{tmp}/out", "--compression", "4"], "already a compressed checkpoint"),
        (["push", "{plain}", "tester/x"], "not a compressed hf_gb checkpoint"),
    ],
)
def test_user_errors_print_one_line_and_exit_nonzero(argv, message, error_paths, capsys):
    code, _, err = run(capsys, *(a.format(**error_paths) for a in argv))
    assert code == 1
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--compression", "0.5"], "--compression must be >= 1"),
        (["--compression", "x"], "--compression must be a float"),
        (["--compression", "4", "--steps", "-3"], "--steps must be >= 0"),
        (["--compression", "4", "--hidden-dim", "0"], "--hidden-dim must be > 0"),
        (["--compression", "4", "--lr", "nan"], "--lr must be > 0"),
        ([], "--compression"),
    ],
)
def test_bad_flag_values_exit_2_with_one_line(flags, message, tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["compress", str(tmp_path), str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_console_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hf_gb.cli", "info", str(tmp_path / "nowhere")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "hf-gb info: error: No compressed checkpoint folder" in proc.stderr


def test_debug_flag_shows_the_traceback(tmp_path):
    """``hf-gb --debug`` raises the error itself, so the traceback shows where it came from."""
    with pytest.raises(Exception, match="No compressed checkpoint folder"):
        main(["--debug", "info", str(tmp_path / "nowhere")])
