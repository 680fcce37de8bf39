import math
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from hf_gb import GBConfig, GenomicBottleneck
from hf_gb.engine.gains import gain_key


class Conv1D(nn.Module):
    """GPT-2's Conv1D without transformers: weight stored (in, out), y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class Net(nn.Module):
    """Every covered layout, a padded tile grid, a module under two names, a tied weight and an unused layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)  # kernel layout
        self.proj = Conv1D(12, 64)  # transposed layout
        self.fc = nn.Linear(12, 20)  # 20 x 12 does not divide 8 x 8 tiles
        self.mha = nn.MultiheadAttention(20, 2, batch_first=True)  # in_proj_weight
        self.shared = nn.Linear(20, 20)
        self.alias = self.shared  # the same module under a second name
        self.tied_a = nn.Linear(20, 6, bias=False)
        self.tied_b = nn.Linear(20, 6, bias=False)
        self.tied_b.weight = self.tied_a.weight
        self.unused = nn.Linear(8, 8)  # takes no part in the loss
        self.norm = nn.LayerNorm(20)

    def forward(self, x):
        h = torch.tanh(self.proj(torch.relu(self.conv(x)).flatten(1)))
        h = self.norm(torch.tanh(self.fc(h)))[:, None, :]
        h = h + self.mha(h, h, h, need_weights=False)[0]
        h = torch.tanh(self.alias(torch.tanh(self.shared(h)))).squeeze(1)
        return self.tied_a(h) * self.tied_b(h).sigmoid()


NET_COVERED = {
    "conv.weight", "proj.weight", "fc.weight", "mha.in_proj_weight", "mha.out_proj.weight", "shared.weight",
    "tied_a.weight", "unused.weight",
}


def _net(dtype=torch.float64, **config):
    torch.manual_seed(0)
    model = Net().to(dtype)
    config = {"family": "mlp", "hidden_dim": 4, "tile_size": 8, "kernel": "eager", **config}
    gb = GenomicBottleneck(model, GBConfig(**config))
    return model, gb.to(dtype)


def _batches(n, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 2, 4, 4, generator=gen, dtype=dtype), torch.randn(5, 6, generator=gen, dtype=dtype))
            for _ in range(n)]


def _loss(out, y):
    return ((out - y) ** 2).mean()


def _has(params, param):
    return any(p is param for p in params)


def _reference_weights(gb, noise_seed=None):
    """Covered weights as functions of the g-net parameters, through the unfused reference and plain autograd."""
    weights = {}
    for i, (key, bank) in enumerate(gb.banks.items()):
        tiles = bank(reference=True)  # (n_tiles, rows, cols * K)
        if noise_seed is not None:  # bank i's noise at step seed s is seeded (s * 1_000_003 + i), as in predict
            tiles = tiles + bank.sigma()[:, None, None] * bank.noise((noise_seed * 1_000_003 + i) % 2**63)
        for t in (t for t in gb.covered if t.bank == key):
            g = t.geometry
            w = tiles[t.offset : t.offset + t.n_tiles]
            nr, nc = math.ceil(t.shape[0] / g.rows), math.ceil(t.shape[1] / g.cols)
            w = w.reshape(nr, nc, g.rows, g.cols, g.kernel).permute(0, 2, 1, 3, 4)
            w = w.reshape(nr * g.rows, nc * g.cols, g.kernel)[: t.shape[0], : t.shape[1]]
            gain = gain_key(t.name)  # GBConfig.gains: weight = exp(rows) * G * exp(columns)
            if gain in gb.row_gains:
                w = w * gb.row_gains[gain].exp()[:, None, None]
            if gain in gb.col_gains:
                w = w * gb.col_gains[gain].exp()[None, :, None]
            weights[t.name] = w.squeeze(-1).t() if t.layout == "transposed" else w.reshape(t.param_shape)
    return weights


def push_against_autograd(model, gb, batches, step=None, noise_seed=None):
    """predict, one backward per batch, push; then assert that predict wrote exactly the reference prediction
    (`_reference_weights`) and that the pushed gradients of the trainable g-net tensors and the uncompressed tensors
    equal end-to-end autograd through it. Returns ``(trainable (name, param) pairs, their pushed gradients)``; the
    gradients of the uncompressed tensors follow in the list."""
    gb.predict_weights(step=step)
    for x, y in batches:
        _loss(model(x), y).backward()
    gb.push_gradients()
    trainable = [(n, p) for n, p in gb.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable] + gb.uncompressed_parameters()
    got = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    reference = _reference_weights(gb, noise_seed=noise_seed)
    for name, w in reference.items():  # predict wrote exactly the reference prediction
        torch.testing.assert_close(model.get_parameter(name).detach(), w.detach(), rtol=1e-12, atol=1e-12)
    total = sum(_loss(functional_call(model, reference, (x,)), y) for x, y in batches)
    want = torch.autograd.grad(total, params, allow_unused=True, materialize_grads=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    return trainable, got


@pytest.mark.parametrize("center", [True, False], ids=["centred", "uncentred"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["deterministic", "stochastic"])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_push_equals_end_to_end_autograd(accumulate, stochastic, center):
    model, gb = _net(stochastic=stochastic, init_noise=0.3, center=center)
    assert {t.name for t in gb.covered} == NET_COVERED
    gb.train()
    weights_before = {t.name: t.param for t in gb.covered}
    ptrs = {t.name: t.param.data_ptr() for t in gb.covered}

    trainable, got = push_against_autograd(model, gb, _batches(accumulate), step=7,
                                           noise_seed=gb.noise_seed(7) if stochastic else None)
    # Centring removes the output bias: centred banks have none.
    assert any(n.endswith(".b2") for n, _ in trainable) == (not center)
    assert all(t.param.grad is None for t in gb.covered)  # the weight grads were consumed
    # Same Parameter objects, same storage: predict writes in place.
    assert all(t.param is weights_before[t.name] and t.param.data_ptr() == ptrs[t.name] for t in gb.covered)
    for (name, _), g in zip(trainable, got):  # every trainable g-net tensor learns
        assert g.abs().sum() > 0 or g.numel() == 1, name
    if stochastic:
        noisy = {t.name: t.param.detach().clone() for t in gb.covered}
        mean = _reference_weights(gb)
        assert any(not torch.allclose(noisy[n], mean[n].detach()) for n in noisy)


def test_stochastic_eval_predicts_the_mean():
    model, gb = _net(stochastic=True)
    gb.eval()
    gb.predict_weights()
    first = {t.name: t.param.detach().clone() for t in gb.covered}
    gb.predict_weights()
    mean = _reference_weights(gb)
    for name, w in first.items():
        torch.testing.assert_close(w, model.get_parameter(name).detach())
        torch.testing.assert_close(w, mean[name].detach(), rtol=1e-12, atol=1e-12)


def test_push_accumulates_into_gnet_grads_until_zeroed():
    model, gb = _net()
    x, y = _batches(1)[0]
    grads = []
    for _ in range(2):
        gb.predict_weights()
        _loss(model(x), y).backward()
        gb.push_gradients()
        grads.append(gb.banks[next(iter(gb.banks))].w2.grad.clone())
    torch.testing.assert_close(grads[1], 2 * grads[0])  # same weights, same batch: the grad doubled


def test_push_without_predict_raises():
    model, gb = _net()
    with pytest.raises(RuntimeError, match="predict_weights"):
        gb.push_gradients()  # construction predicts but leaves nothing to push
    gb.predict_weights()
    x, y = _batches(1)[0]
    _loss(model(x), y).backward()
    gb.push_gradients()
    with pytest.raises(RuntimeError, match="predict_weights"):
        gb.push_gradients()  # one push per prediction


def test_predict_with_pending_grads_raises():
    model, gb = _net()
    gb.predict_weights()
    x, y = _batches(1)[0]
    _loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="push_gradients"):
        gb.predict_weights()
    gb.push_gradients()
    gb.predict_weights()  # fine once pushed


def test_works_without_a_process_group():
    assert not dist.is_available() or not dist.is_initialized()
    model, gb = _net(dtype=torch.float32)
    optimizer = torch.optim.SGD(list(gb.parameters()) + gb.uncompressed_parameters(), lr=0.1)
    x, y = _batches(1, dtype=torch.float32)[0]
    before = model.fc.weight.detach().clone()
    for _ in range(2):
        gb.predict_weights()
        _loss(model(x), y).backward()
        gb.push_gradients()
        optimizer.step()
        optimizer.zero_grad()
    gb.predict_weights()
    assert not torch.equal(before, model.fc.weight)  # the g-nets trained and the weights moved with them


def test_core_does_not_import_transformers():
    code = ("import sys, hf_gb, hf_gb.engine, hf_gb.io; bad = [m for m in ('transformers', 'accelerate', "
            "'huggingface_hub', 'safetensors', 'datasets') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- initial scale
@pytest.mark.parametrize(
    "make",
    [lambda: nn.Linear(256, 512), lambda: nn.Linear(1000, 64), lambda: nn.Conv2d(16, 32, 3),
     lambda: nn.Conv1d(8, 8, 5), lambda: Conv1D(96, 300)],
    ids=["linear", "linear-wide", "conv2d", "conv1d", "gpt2-conv1d"],
)
def test_predicted_std_matches_init(make):
    torch.manual_seed(0)
    model = nn.Sequential(make())
    init_std = model[0].weight.detach().std().item()
    GenomicBottleneck(model, GBConfig(hidden_dim=16, tile_size=64))
    std = model[0].weight.detach().std().item()
    assert 0.5 < std / init_std < 2.0, (std, init_std)


# ----------------------------------------------------------------------------- coverage
def _covered_by_rule(model, embeddings=False):
    """Covered parameters computed independently: default-covered module types, minus embedding-tied tensors."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, kinds) or type(m).__name__ == "Conv1D" or (embeddings and isinstance(m, nn.Embedding)):
            params = [("weight", m.weight)]
        elif isinstance(m, nn.MultiheadAttention):
            params = [("in_proj_weight", m.in_proj_weight)]
        else:
            continue
        for attr, p in params:
            if (embeddings or id(p) not in embedding_ids) and id(p) not in found:
                found[id(p)] = (f"{name}.{attr}", p)
    return found


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def _llama(tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                        tie_word_embeddings=tie))


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100, max_position_embeddings=64))


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, image_size=32, patch_size=8, num_labels=3))


# (builder, covered module types that must appear, a tied tensor that must be skipped)
TRANSFORMERS = [
    (_gpt2, {"Conv1D"}, "lm_head.weight"),  # lm_head is tied to the input embedding
    (_llama, {"Linear"}, None),
    (_bert, {"Linear"}, "cls.predictions.decoder.weight"),
    (_vit, {"Linear", "Conv2d"}, None),
]


@pytest.mark.parametrize("build,types,tied", TRANSFORMERS, ids=["gpt2", "llama", "bert", "vit"])
def test_coverage_of_transformers_models(build, types, tied):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build()
    expected = _covered_by_rule(model)
    init_std = {name: p.detach().std().item() for name, p in expected.values()}
    all_params = {id(p): p for p in model.parameters()}
    gb = GenomicBottleneck(model, GBConfig(hidden_dim=8, min_compression=1e-6))
    stats = gb.stats()

    assert {t.param is expected[id(t.param)][1] for t in gb.covered} == {True}
    assert len(gb.covered) == len(expected)
    assert stats["covered_params"] == sum(p.numel() for _, p in expected.values())
    assert {t.module_type for t in gb.covered} == types
    if tied is not None:
        assert tied not in {t.name for t in gb.covered}
        assert any("tied" in s["reason"] for s in stats["skipped"])
    # Uncompressed parameters are exactly the complement of the covered ones.
    uncompressed = {id(p) for p in gb.uncompressed_parameters()}
    assert uncompressed.isdisjoint(expected) and uncompressed | set(expected) == set(all_params)
    assert stats["uncompressed_params"] == sum(p.numel() for i, p in all_params.items() if i not in expected)
    assert stats["gnet_params"] == sum(p.numel() for p in gb.parameters())
    assert stats["gnet_params"] == sum(r["gnet_params"] for r in stats["tensors"])
    total = stats["covered_params"] + stats["uncompressed_params"]
    assert stats["overall_compression"] == pytest.approx(total / (stats["gnet_params"] + stats["uncompressed_params"]))
    for t in gb.covered:  # predicted at the scale of the layer's own init
        assert 0.5 < t.param.detach().std().item() / init_std[expected[id(t.param)][0]] < 2.0, t.name
    assert "covered compression" in gb.summary()


def test_llama_tied_embedding_opt_in_covered_once():
    pytest.importorskip("transformers")
    model = _llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    default = GenomicBottleneck(model, GBConfig(family="mlp", hidden_dim=8, min_compression=1e-6))
    assert "lm_head.weight" not in {t.name for t in default.covered}
    assert _has(default.uncompressed_parameters(), model.model.embed_tokens.weight)
    default.detach_model()  # one bottleneck per model
    gb = GenomicBottleneck(model, GBConfig(family="mlp", hidden_dim=8, min_compression=1e-6,
                                           target_modules=r".*(embed_tokens|lm_head|_proj)"))
    emb = [t for t in gb.covered if t.param is model.lm_head.weight]
    assert len(emb) == 1
    expected = _covered_by_rule(model, embeddings=True)
    assert gb.stats()["covered_params"] == sum(p.numel() for _, p in expected.values())
    ids = torch.randint(0, 100, (2, 8))
    gb.predict_weights()
    model(input_ids=ids, labels=ids).loss.backward()
    gb.push_gradients()  # the tied tensor's grad (from both uses) is pushed once, then cleared
    assert model.lm_head.weight.grad is None and gb.banks[next(iter(gb.banks))].w2.grad is not None


@pytest.mark.parametrize("kdim,names", [(None, {"in_proj_weight", "out_proj.weight"}),
                                        (8, {"q_proj_weight", "k_proj_weight", "v_proj_weight",
                                             "out_proj.weight"})])
def test_multihead_attention(kdim, names):
    model = nn.MultiheadAttention(16, 2, kdim=kdim, vdim=kdim)
    gb = GenomicBottleneck(model, GBConfig(hidden_dim=4, tile_size=8))
    assert {t.name for t in gb.covered} == names
    assert {id(p) for p in gb.uncompressed_parameters()} == {id(model.in_proj_bias), id(model.out_proj.bias)}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))


def _blocks():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block())


ALL = {f"{b}.{m}.weight" for b in "01" for m in ("q", "k", "mlp.0", "mlp.2")}


@pytest.mark.parametrize(
    "target,exclude,covered",
    [
        (None, None, ALL),
        (["q"], None, {"0.q.weight", "1.q.weight"}),
        (["mlp.0"], None, {"0.mlp.0.weight", "1.mlp.0.weight"}),
        (["lp.0"], None, None),  # a suffix matches whole name parts only: nothing matches, which raises
        (r".*\.mlp\.\d", None, {f"{b}.mlp.{i}.weight" for b in "01" for i in "02"}),
        (r"q", None, None),  # a regex matches the full name
        (None, ["k"], ALL - {"0.k.weight", "1.k.weight"}),
        (None, r"1\..*", {n for n in ALL if n.startswith("0.")}),
        ([r"q", "k"], ["1.k"], {"0.q.weight", "1.q.weight", "0.k.weight"}),
    ],
)
def test_target_and_exclude_modules(target, exclude, covered):
    model = _blocks()
    if covered is None:  # a target that matches no module is a typo: PEFT raises too
        with pytest.raises(ValueError, match="matches no module"):
            GenomicBottleneck(model, GBConfig(hidden_dim=2, tile_size=8, target_modules=target))
        return
    gb = GenomicBottleneck(model, GBConfig(hidden_dim=2, tile_size=8, target_modules=target,
                                           exclude_modules=exclude))
    assert {t.name for t in gb.covered} == covered
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in gb.uncompressed_parameters()} == set(names.values()) - covered


def test_embedding_is_opt_in():
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16, bias=False))
    assert {t.name for t in GenomicBottleneck(model, GBConfig(hidden_dim=2, tile_size=8)).covered} == {"1.weight"}
    gb = GenomicBottleneck(model, GBConfig(hidden_dim=2, tile_size=8, target_modules=["0", "1"]))
    assert {t.name for t in gb.covered} == {"0.weight", "1.weight"}
    assert gb.uncompressed_parameters() == []


def test_nested_and_shared_modules_predicted_once():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Sequential(nn.Sequential(nn.Sequential(nn.Linear(8, 8)))), shared,
                          nn.ModuleDict({"again": shared}))
    gb = GenomicBottleneck(model, GBConfig(hidden_dim=2, tile_size=4))
    assert [t.name for t in gb.covered] == ["0.0.0.0.weight", "1.weight"]
    assert gb.stats()["covered_params"] == 128
    assert sum(bank.n_tiles for bank in gb.banks.values()) == 8  # 4 tiles each, the shared one once


def test_unknown_module_types_are_skipped_and_reported():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(8, 8))

    model = nn.Sequential(Custom(), nn.Linear(8, 8))
    gb = GenomicBottleneck(model, GBConfig(hidden_dim=2, tile_size=4, target_modules=["0", "1"]))
    assert [t.name for t in gb.covered] == ["1.weight"]
    assert gb.stats()["skipped"] == [{"name": "0.kernel", "reason": "unsupported module type Custom"}]
    assert "0.kernel" in gb.summary() and "not covered" in gb.summary()
    assert _has(gb.uncompressed_parameters(), model[0].kernel)


def test_min_compression_leaves_small_tensors_uncompressed():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))
    gb = GenomicBottleneck(model, GBConfig(family="mlp", hidden_dim=16, min_compression=2.0))
    assert [t.name for t in gb.covered] == ["0.weight"]
    assert _has(gb.uncompressed_parameters(), model[1].weight)
    assert "compress it only" in gb.stats()["skipped"][0]["reason"]


@pytest.mark.parametrize("target", [20.0, 100.0, 500.0])
def test_stated_compression_is_met(target):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 2048), nn.Linear(2048, 512), nn.Conv2d(64, 128, 3))
    gb = GenomicBottleneck(model, GBConfig(hidden_dim=16, compression=target))
    ratio = gb.stats()["covered_compression"]
    assert abs(ratio / target - 1) < 0.2, ratio
    # Each Linear meets it on its own too (a 64x128x3x3 conv cannot reach 500x: its kernel bits cost too much).
    assert all(abs(r["compression"] / target - 1) < 0.2 for r in gb.stats()["tensors"] if r["module_type"] == "Linear")


def test_bottleneck_parameters_are_the_gnets_only():
    model, gb = _net()
    model_ids = {id(p) for p in model.parameters()}
    assert all(id(p) not in model_ids for p in gb.parameters())
    assert all(k.startswith("banks.") for k in gb.state_dict())
    assert any(k.endswith(".scale") for k in gb.state_dict())  # output scale is saved with the g-nets


class Parallel(nn.Sequential):
    def forward(self, x):
        return sum(m(x) for m in self)


@pytest.mark.compiled
def test_compiled_path_matches_eager_end_to_end():
    """predict and push through the compiled kernels (one small bank, float32) agree with the eager path."""
    results = []
    for kernel in ("eager", "compiled"):
        torch.manual_seed(0)
        model = Parallel(nn.Linear(40, 48), Conv1D(48, 40))  # one bank: 6 tiles of 16 x 40, h = 8
        gb = GenomicBottleneck(model, GBConfig(hidden_dim=8, tile_size=[16, 40], kernel=kernel))
        assert len(gb.banks) == 1 and next(iter(gb.banks.values())).compiled() == (kernel == "compiled")
        gb.predict_weights()
        model(torch.randn(4, 40, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
        gb.push_gradients()
        results.append(([p.detach().clone() for p in model.parameters()], [p.grad for p in gb.parameters()]))
    for eager, compiled in zip(*results):
        for e, c in zip(eager, compiled):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- guarding the step
@pytest.mark.parametrize("skip", [True, False], ids=["skip", "apply"])
def test_nonfinite_step_is_skipped(skip, caplog):
    model, gb = _net(skip_nonfinite=skip)
    x, y = _batches(1)[0]
    gb.predict_weights()
    (_loss(model(x), y) * float("nan")).backward()
    with caplog.at_level("WARNING", logger="hf_gb.engine.bottleneck"):
        kept = gb.push_gradients()
    assert kept is not skip
    grads = [p.grad for p in [*gb.parameters(), *gb.uncompressed_parameters()]]
    if skip:  # optimizers skip tensors without a gradient: nothing moves
        assert all(g is None for g in grads) and "not finite" in caplog.text
    else:
        assert any(g is not None and not g.isfinite().all() for g in grads) and "not finite" not in caplog.text
    gb.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    gb.predict_weights()  # the next step starts normally
    _loss(model(x), y).backward()
    assert gb.push_gradients() and all(p.grad is None or p.grad.isfinite().all() for p in gb.parameters())


def test_transposed_geometries_draw_different_noise():
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(32, 64, bias=False))
    gb = GenomicBottleneck(model, GBConfig(hidden_dim=4, tile_size=[32, 64], stochastic=True, init_noise=1.0))
    assert sorted(gb.banks) == ["32x64x1", "64x32x1"] or len(gb.banks) == 2
    gb.train()
    gb.predict_weights(step=3)
    noisy = [model[0].weight.detach().clone(), model[1].weight.detach().t().clone()]
    gb.zero_grad()
    gb.predict_weights(sample=False, keep_graph=False)
    noise = [noisy[0] - model[0].weight.detach(), noisy[1] - model[1].weight.detach().t()]
    scaled = [n / n.std() for n in noise]
    assert not torch.allclose(scaled[0], scaled[1], atol=1e-3)


def test_meta_model_gets_a_clear_error():
    with torch.device("meta"):
        model = nn.Linear(16, 16)
    with pytest.raises(ValueError, match="meta device.*weight"):
        GenomicBottleneck(model, GBConfig(hidden_dim=2, tile_size=8))


def test_one_bottleneck_per_model():
    model = nn.Sequential(nn.Linear(16, 16))
    first = GenomicBottleneck(model, GBConfig(hidden_dim=2, tile_size=8))
    with pytest.raises(ValueError, match="already has a GenomicBottleneck.*detach_model"):
        GenomicBottleneck(model, GBConfig(hidden_dim=2, tile_size=8))
    first.detach_model()
    second = GenomicBottleneck(model, GBConfig(hidden_dim=2, tile_size=8))
    assert second.covered and not first.covered


def test_prediction_without_graph_cannot_be_pushed():
    model, gb = _net()
    gb.predict_weights(keep_graph=False)
    x, y = _batches(1)[0]
    _loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="predict_weights"):
        gb.push_gradients()


def test_one_unmatched_target_entry_warns(caplog):
    model = _blocks()
    with caplog.at_level("WARNING", logger="hf_gb.engine.layers"):
        gb = GenomicBottleneck(model, GBConfig(hidden_dim=2, tile_size=8, target_modules=["q", "q_prj"]))
    assert {t.name for t in gb.covered} == {"0.q.weight", "1.q.weight"}
    assert "['q_prj'] match no module" in caplog.text
