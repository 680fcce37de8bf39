"""The module paths of the flat layout (hf_gb.bank, hf_gb.trainer, ...) keep working: every name that code used from
them is the new object, with one DeprecationWarning that names its new path. This is the only file in the repository
that imports the old paths."""

import importlib
import pickle
import sys
import warnings

import pytest

import hf_gb
from hf_gb import _compat

# old module: {new module (under hf_gb): the names code used from the old one that live there, "old=new" where the
# name changed}
USED = {
    "hf_gb.accelerate_plugin": {"training.plugin": "GBPlugin"},
    "hf_gb.bank": {"engine.bank": "GNetBank _pick=pick", "engine.families": "MLPBank",
                   "engine.families.separable": "SPARSE_SAMPLE",
                   "engine.registry": "families family_class register_family"},
    "hf_gb.bottleneck": {"io.pretrained": "GenomicBottleneck", "engine.gains": "gain_key",
                         "engine.planning": "CoveredTensor DEFAULT_TILE_SIZE stored_per_tile tensor_geometry"},
    "hf_gb.checkpoint": {"files": "WEIGHTS_NAME", "io.checks": "read_header", "io.download": "resolve_checkpoint",
                         "io.checkpoint": "gb_state_tensors load_checkpoint_state save_compressed",
                         "io.pretrained": "bottleneck_from_pretrained load_compressed",
                         "io.architecture": "_model_class=model_class_for"},
    "hf_gb.checkpoint_checks": {"io.checks": "_gnet_values_wanted last_complete_checkpoint"},
    "hf_gb.config": {"files": "CONFIG_NAME", "engine.config": "FORMAT_VERSION GBConfig read_config_json"},
    "hf_gb.distill": {"compress.distill": "GBDistillationArguments GBDistillationTrainer build_student "
                                          "distillation_loss mean_pool"},
    "hf_gb.distill_data": {"compress.data": "load_texts tokenize"},
    "hf_gb.distributed": {"training.distributed": "check_setup detach_params load_optimizer_shard reattach_params "
                                                  "save_optimizer_shard"},
    "hf_gb.families": {"engine.families": "DeepBank MLPBank SharedBank",
                       "engine.families.deep": "CHUNK_ELEMENTS _chunks"},
    "hf_gb.hub": {"files": "is_inside", "io.checks": "check_compressed_folder", "io.download": "resolve_checkpoint",
                  "io.hub": "_skip_outside_links push_folder push_to_hub"},
    "hf_gb.kernels": {"engine.kernels": "AUTO_COMPILE_MIN_NUMEL backward_from center_tiles forward_into "
                                        "fused_backward fused_forward kernel_path reference_forward use_compiled"},
    "hf_gb.layers": {"engine.layers": "name_matches unmatched_patterns view3d"},
    "hf_gb.model_card": {"io.model_card": "SECTION_START is_hub_model_id load_card template_path write_model_card"},
    "hf_gb.native": {"engine.native": "failed get"},
    "hf_gb.regression": {"compress.regression": "compress_by_regression covered_weights fit_to_weights "
                                                "relative_errors"},
    "hf_gb.settings": {"training.settings": "add_config_fields config_from settings"},
    "hf_gb.sharding": {"engine.shards": "RowShard _chunk_offset grad_tiles is_dtensor local_tiles model_class "
                                        "row_shard tile_rows write_rows",
                       "engine.bottleneck": "gathered=Bottleneck.gathered rebind=Bottleneck.rebind"},
    "hf_gb.tiling": {"engine.tiling": "TileGeometry choose_geometry compression_of gain_values grid tile tile_into "
                                      "tile_rows untile untile_into",
                     "engine.codes": "FOURIER_PAIRS code_inputs code_width num_bits position_codes"},
    "hf_gb.trainer": {"training.trainer": "GBTrainer", "training.arguments": "GBTrainingArguments",
                      "io.checks": "last_complete_checkpoint"},
    "hf_gb.trainer_deepspeed": {"training.deepspeed": "DeepSpeedTrainerMixin"},
    "hf_gb.trainer_fsdp": {"training.fsdp": "FSDP2TrainerMixin"},
}


def expected(old: str) -> dict[str, tuple[str, str]]:
    """{old name: (new module, dotted name there)} of `USED`'s entry for ``old``."""
    out = {}
    for module, names in USED[old].items():
        for item in names.split():
            name, _, new = item.partition("=")
            out[name] = (f"hf_gb.{module}", new or name)
    return out


def resolve(module: str, dotted: str):
    value = importlib.import_module(module)
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.fixture
def fresh(monkeypatch):
    """Import an old module anew (a stand-in that has resolved nothing yet)."""
    def load(old: str):
        monkeypatch.delitem(sys.modules, old, raising=False)
        monkeypatch.delattr(hf_gb, old.split(".", 1)[1], raising=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # importing the old module itself does not warn; its names do
            return importlib.import_module(old)

    return load


def test_the_table_covers_every_old_module():
    assert sorted(f"hf_gb.{m}" for m in _compat.MOVED) == sorted(USED)


@pytest.mark.parametrize("old", sorted(USED))
def test_old_names_are_the_new_objects_with_one_warning_each(old, fresh):
    module = fresh(old)
    for name, (new_module, dotted) in expected(old).items():
        with pytest.warns(DeprecationWarning, match=rf"^{old}\.{name} is deprecated; use hf_gb\.") as caught:
            value = getattr(module, name)
        assert len(caught) == 1
        assert value is resolve(new_module, dotted), (old, name)
        named = str(caught[0].message).rsplit(" ", 1)[1]  # the path the warning names holds the same object
        path, attr = named.rsplit(".", 1) if "." not in dotted else (named[: -len(dotted) - 1], dotted)
        assert resolve(path, attr) is value, named
        assert caught[0].filename == __file__  # the warning points at the line that used the old path
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert getattr(module, name) is value  # warned once: later uses are silent


def test_old_paths_work_as_imports_and_attributes(fresh):
    fresh("hf_gb.bank")
    with pytest.warns(DeprecationWarning, match="hf_gb.bank.MLPBank is deprecated; use hf_gb.engine.families"):
        from hf_gb.bank import MLPBank
    assert MLPBank is resolve("hf_gb.engine.families", "MLPBank")
    fresh("hf_gb.config")
    with pytest.warns(DeprecationWarning, match="hf_gb.config.GBConfig"):
        assert hf_gb.config.GBConfig is hf_gb.GBConfig  # `import hf_gb; hf_gb.config.GBConfig`
    fresh("hf_gb.kernels")
    from hf_gb import kernels  # an old module as an attribute of the package

    with pytest.warns(DeprecationWarning, match="use hf_gb.engine.kernels.fused_forward"):
        assert kernels.fused_forward is resolve("hf_gb.engine.kernels", "fused_forward")


def test_pickles_that_name_old_paths_still_load(fresh):
    fresh("hf_gb.config")
    with pytest.warns(DeprecationWarning, match="hf_gb.config.GBConfig"):
        assert pickle.loads(b"chf_gb.config\nGBConfig\n.") is hf_gb.GBConfig  # e.g. training_args.bin


def test_a_name_that_never_existed_is_an_attribute_error(fresh):
    module = fresh("hf_gb.bank")
    with pytest.raises(AttributeError, match="no attribute 'nope'.*hf_gb.engine.bank"):
        module.nope  # noqa: B018
