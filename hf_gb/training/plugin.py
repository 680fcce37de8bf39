"""`GBPlugin`: the genomic bottleneck in a custom Accelerate loop (one process, DDP, FSDP2 or DeepSpeed ZeRO).

Accelerate's ``Accelerator(kwargs_handlers=...)`` accepts only its own handler classes, so the plugin attaches
explicitly: ``plugin.prepare(accelerator, model)`` builds the `GenomicBottleneck`, makes it identical on every rank,
and hooks it into ``accelerator.save_state()`` / ``load_state()`` (no pickle). The loop then calls two hooks per
micro-batch::

    plugin.before_step()      # first micro-batch of an optimizer step: g-nets -> weights (docs/design.md §2, phase 1)
    accelerator.backward(loss)
    plugin.after_backward()   # sync micro-batch: accumulated (all-reduced) weight grads -> g-net grads (phase 3)

Under DDP the g-nets are replicated (docs/design.md §7): every rank predicts the same weights, DDP averages ``W.grad``,
and every rank pushes the same gradient, so no g-net communication is needed after `prepare`. Under FSDP2
(``fsdp_version=2``) the g-nets are replicated too, but each rank predicts and pushes only the tiles of its own rows
and the g-net gradients are summed over ranks (`hf_gb.engine.shards`); prepare the model and optimizer with
`GBPlugin.accelerator_prepare` instead of ``accelerator.prepare`` so that the g-nets stay out of Accelerate's
FSDP2 parameter remapping. Under DeepSpeed ZeRO stage 1 or 2 the same call builds the engine with the g-nets in its
optimizer and pushes their gradients inside ``accelerator.backward``, just before DeepSpeed steps
(`hf_gb.training.distributed.wrap_engine_step`); ``after_backward`` then only checks that it happened. Under ZeRO
stage 3 each rank also predicts only its own partitions, with the g-nets gathered from each prediction to its push
(`hf_gb.training.distributed.GatheredGnets`); ``accelerator.save_state`` is not supported there yet.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine.config import GBConfig
from ..files import FORMAT_NAME, PLUGIN_STATE_NAME, atomic_write
from ..io.checks import warn_non_finite
from ..io.pretrained import GenomicBottleneck
from . import distributed
from .settings import add_config_fields, config_from, settings

logger = logging.getLogger(__name__)

__all__ = ["GBPlugin"]

ENV_PREFIX = "HF_GB_"

# Where the loop is within one optimizer step.
_IDLE = "idle"  # between optimizer steps: the next before_step() predicts
_FORWARD = "forward"  # before_step() done; this micro-batch's after_backward() is due
_ACCUMULATING = "accumulating"  # a non-sync micro-batch finished; weights stay predicted until the sync one


@dataclass
@add_config_fields("", optional=True, help_format="{help} ({env})")
class GBPlugin:
    """Genomic bottleneck for custom Accelerate loops, configured in code or through ``HF_GB_*`` variables.

    Every field left ``None`` is read from the environment variable ``HF_GB_<FIELD>`` (e.g. ``HF_GB_HIDDEN_DIM=16``,
    ``HF_GB_TILE_SIZE=32`` or ``32,64``, ``HF_GB_TARGET_MODULES=query,value`` for name suffixes or a regex without
    commas, ``HF_GB_STOCHASTIC=true``), then from ``gb_config``, then from `GBConfig`'s default. The resolved
    `GBConfig` is ``plugin.gb_config``.

    Args:
        every `GBConfig` field (``hidden_dim``, ``compression``, ``tile_size``, ...): as in `GBConfig`, read from
            ``HF_GB_<FIELD>`` when left ``None``.
        gb_config (`GBConfig`, *optional*): base configuration for the fields that neither the call nor the
            environment sets.

    Example::

        >>> import torch
        >>> from accelerate import Accelerator
        >>> from hf_gb import GBPlugin
        >>> accelerator = Accelerator(cpu=True)
        >>> plugin = GBPlugin(hidden_dim=8, tile_size=32)
        >>> model, gb = plugin.prepare(accelerator, torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
        ...                                                             torch.nn.Linear(64, 10)))
        >>> optimizer = torch.optim.AdamW(plugin.trainable_parameters(), lr=1e-3)
        >>> model, optimizer = accelerator.prepare(model, optimizer)
        >>> with accelerator.accumulate(model):
        ...     plugin.before_step()
        ...     accelerator.backward(model(torch.randn(4, 64)).pow(2).mean())
        ...     plugin.after_backward()
        ...     _ = accelerator.clip_grad_norm_(plugin.trainable_parameters(), 1.0)
        ...     optimizer.step()
        ...     optimizer.zero_grad()
    """

    gb_config: GBConfig | None = field(
        default=None, metadata={"help": "Base GBConfig for fields set neither here nor in the environment."}
    )

    def __post_init__(self):
        base = self.gb_config if self.gb_config is not None else GBConfig()
        if not isinstance(base, GBConfig):
            raise TypeError(f"gb_config must be a GBConfig, got {type(base).__name__}: {base!r}")
        values = {}
        for setting in settings():
            value = getattr(self, setting.name)
            env = ENV_PREFIX + setting.name.upper()
            if value is None and os.environ.get(env, "").strip():
                raw = os.environ[env].strip()
                try:
                    value = setting.parse_env(raw)
                except ValueError as e:
                    raise ValueError(f"{env}={raw!r} is not a valid {setting.name}: {e}") from e
            values[setting.name] = value
        try:
            self.gb_config = config_from(values, base)
        except ValueError as e:
            raise ValueError(f"GBPlugin: {e}") from e
        for setting in settings():  # show the effective values, as Accelerate's plugins do
            setattr(self, setting.name, getattr(self.gb_config, setting.name))
        self._accelerator = None
        self._bottleneck: GenomicBottleneck | None = None
        self._phase = _IDLE
        self._steps = 0  # optimizer steps begun; seeds the weight noise of stochastic g-nets
        self._kind = "single"  # "single", "ddp", "fsdp2" or "deepspeed" (distributed.check_setup), set by prepare
        self._gathered: distributed.GatheredGnets | None = None  # ZeRO-3: holds the g-nets (accelerator_prepare)

    # ----------------------------------------------------------------- attaching
    @property
    def bottleneck(self) -> GenomicBottleneck:
        if self._bottleneck is None:
            raise RuntimeError("GBPlugin has no bottleneck yet: call plugin.prepare(accelerator, model) first")
        return self._bottleneck

    def prepare(self, accelerator: Any, model: nn.Module) -> tuple[nn.Module, GenomicBottleneck]:
        """Attach g-nets to ``model`` and register them with ``accelerator``; returns ``(model, bottleneck)``.

        Call before ``accelerator.prepare(model, optimizer, ...)``: the model is moved to ``accelerator.device`` and
        returned unwrapped. With several processes the g-nets (and their output scales, calibrated from each
        rank's own random init) are broadcast from the main process, so every rank predicts the same weights.
        """
        if self._bottleneck is not None:
            raise RuntimeError("this GBPlugin is already attached to a model; create one GBPlugin per model")
        distributed.check_launch(accelerator.num_processes, "GBPlugin", "create the Accelerator with cpu=True")
        fsdp_requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
        self._kind = distributed.check_setup(accelerator, fsdp_requested, False, "GBPlugin")
        inner = accelerator.unwrap_model(model)
        if not any(type(p).__name__ == "DTensor" for p in inner.parameters()):
            inner.to(accelerator.device)
        gb = GenomicBottleneck(inner, self.gb_config)
        if accelerator.num_processes > 1:
            distributed.broadcast_gnets(gb)
        self._accelerator = accelerator
        self._bottleneck = gb
        self._predict_for_eval()
        # Not `register_for_checkpointing`: Accelerate pickles those objects and unpickles them on load_state.
        self._checkpoint = _CheckpointState(self)
        inner.register_load_state_dict_post_hook(self._checkpoint.after_model_load)
        accelerator.register_save_state_pre_hook(self._save_state_pre_hook)
        accelerator.register_load_state_pre_hook(self._load_state_pre_hook)
        if accelerator.is_main_process:
            logger.info("Genomic bottleneck attached:\n%s", gb.summary(per_tensor=False))
        return model, gb

    def accelerator_prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, *others: Any) -> tuple:
        """``accelerator.prepare(model, optimizer, *others)`` that also works under FSDP2 and DeepSpeed; returns what
        it returns.

        FSDP2's prepare maps every optimizer parameter to a model parameter and the g-nets are none, so they are
        taken out of ``optimizer`` for the call and put back after, and the bottleneck is bound to the sharded
        weights (each rank then predicts only its own rows). DeepSpeed (ZeRO 1/2) maps them to named model
        parameters, so they join the model for the call and leave it after, and the engine's step is wrapped to
        push the g-net gradients first. Under one process or DDP it is ``accelerator.prepare``.
        """
        accelerator, gb = self._accelerator, self.bottleneck
        if self._kind == "deepspeed":
            inner = accelerator.unwrap_model(model)
            distributed.join_model(inner, gb)
            try:
                prepared = accelerator.prepare(model, optimizer, *others)
            finally:
                distributed.leave_model(inner)
            if getattr(accelerator.state.deepspeed_plugin, "zero_stage", None) == 3:
                distributed.bind_zero3(inner, gb)  # each rank predicts the elements it owns
                self._gathered = distributed.GatheredGnets(gb)
            distributed.wrap_engine_step(accelerator.deepspeed_engine_wrapped.engine, gb, self._gathered)
            self._predict_for_eval()
            return prepared
        if self._kind != "fsdp2":
            return accelerator.prepare(model, optimizer, *others)
        taken = distributed.detach_params(optimizer, gb.parameters())
        prepared = accelerator.prepare(model, optimizer, *others)
        model = prepared[0]
        distributed.reattach_params(getattr(prepared[1], "optimizer", prepared[1]), taken)
        gb.rebind(accelerator.unwrap_model(model))
        self._predict_for_eval()
        return prepared

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer (and gradient clipping) must cover: g-net parameters and uncompressed parameters."""
        gb = self.bottleneck
        return [*gb.parameters(), *gb.uncompressed_parameters()]

    # ----------------------------------------------------------------- the loop hooks
    def before_step(self) -> None:
        """Call at the start of every micro-batch; predicts the weights on the first micro-batch of each step.

        Raises ``RuntimeError`` when called twice without `after_backward` in between, or when the g-nets still hold
        the gradients pushed for the previous step (``optimizer.step()`` / ``optimizer.zero_grad()`` not called).
        """
        gb = self.bottleneck
        if self._phase == _FORWARD:
            raise RuntimeError(
                "GBPlugin.before_step() called twice without after_backward() in between; call "
                "plugin.after_backward() after accelerator.backward(loss) in every micro-batch"
            )
        if self._phase == _ACCUMULATING:  # a later micro-batch of the same optimizer step: weights are current
            self._phase = _FORWARD
            return
        self._require_step_finished("GBPlugin.before_step()")
        self._steps += 1
        # The noise seed must be the same on every rank and after a resume: derived from the step count.
        if self._gathered is not None:  # ZeRO-3: held until the push inside accelerator.backward
            self._gathered.gather()
        gb.predict_weights(step=self._steps)
        self._phase = _FORWARD

    def after_backward(self) -> None:
        """Call after ``accelerator.backward(loss)`` in every micro-batch, before clipping.

        On the sync micro-batch (``accelerator.sync_gradients``) the accumulated weight gradients, already averaged
        across ranks by DDP, are pushed into the g-net gradients. Raises ``RuntimeError`` without a preceding
        `before_step` for this micro-batch.
        """
        gb = self.bottleneck
        if self._phase != _FORWARD:
            raise RuntimeError(
                "GBPlugin.after_backward() called without before_step() for this micro-batch: the weights were not "
                "predicted, so there is no prediction to push gradients through; call plugin.before_step() at the "
                "start of every micro-batch"
            )
        if self._accelerator.sync_gradients:
            if self._kind != "deepspeed":
                gb.push_gradients()
            elif gb.prediction_pending:  # DeepSpeed's step inside accelerator.backward() pushes (accelerator_prepare)
                raise RuntimeError(
                    "Under DeepSpeed the g-net gradients are pushed inside accelerator.backward(), by the engine "
                    "that plugin.accelerator_prepare(model, optimizer) builds; prepare with it instead of "
                    "accelerator.prepare"
                )
            self._phase = _IDLE
        else:
            self._phase = _ACCUMULATING

    def update_weights(self) -> None:
        """Predict the weights from the current g-nets without sampling noise (before evaluation or export).

        Call between optimizer steps, after ``optimizer.step()``: the weights the loop predicted at the start of a
        step are those of the g-nets before that step.
        """
        self._require_step_finished("GBPlugin.update_weights()")
        self._predict_for_eval()

    def _predict_for_eval(self) -> None:
        if self._gathered is not None:
            self._gathered.gather()
        self.bottleneck.predict_weights(sample=False, keep_graph=False)  # nothing will be pushed through it
        if self._gathered is not None:
            self._gathered.release()

    def _require_step_finished(self, what: str) -> None:
        if self._phase != _IDLE:
            raise RuntimeError(
                f"{what} called in the middle of an optimizer step (gradient accumulation has not reached "
                "the sync micro-batch's after_backward())"
            )
        pending = [n for n, p in self.bottleneck.named_parameters() if p.grad is not None and bool(p.grad.any())]
        if pending:
            raise RuntimeError(
                f"{what}: g-net parameters (e.g. {pending[0]}) still hold the gradients pushed for the "
                "previous step; call optimizer.step() and optimizer.zero_grad() first, with the optimizer built over "
                "plugin.trainable_parameters() and passed to accelerator.prepare"
            )

    # ----------------------------------------------------------------- checkpoints
    def _save_state_pre_hook(self, models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        # Gradients are not part of the state: saving before the step they belong to would lose them.
        self._require_step_finished("accelerator.save_state()")
        self._refuse_zero3("accelerator.save_state()")
        self._checkpoint.save(output_dir)

    def _load_state_pre_hook(self, models: list[nn.Module], input_dir: str) -> None:
        # The model and optimizer load after this hook; the model's load_state_dict post-hook then predicts the
        # weights of the g-nets restored here (the model file holds the prediction of an earlier step).
        self._refuse_zero3("accelerator.load_state()")
        for t in self.bottleneck.covered:
            t.param.grad = None
        self._phase = _IDLE
        self._checkpoint.load(input_dir)

    def _refuse_zero3(self, what: str) -> None:
        if self._gathered is not None:
            raise NotImplementedError(f"{what} with GBPlugin under DeepSpeed ZeRO-3 is not supported yet (the g-nets "
                                      "are partitioned; a state folder holds only DeepSpeed's files, without them); "
                                      "plugin.save_pretrained() writes the compressed model")

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> str:
        """Write the compressed checkpoint (as `GenomicBottleneck.save_pretrained`) from the main process only.

        Loadable with `hf_gb.load_compressed`. All processes must call it; they wait for the write to finish. Under
        FSDP2 the uncompressed tensors are gathered for it (the covered weights never are).
        """
        from contextlib import nullcontext

        accelerator = self._accelerator
        if accelerator is None:
            raise RuntimeError("GBPlugin.save_pretrained() needs plugin.prepare(accelerator, model) first")
        save_directory = os.fspath(save_directory)
        gb, context = self.bottleneck, nullcontext()
        if self._gathered is not None:  # ZeRO-3: every rank gathers the g-nets and the uncompressed tensors
            from deepspeed.runtime.zero.partition_parameters import GatheredParameters

            gnets = [] if self._gathered.held else list(gb.parameters())
            context = GatheredParameters([*gnets, *gb.uncompressed_parameters()], modifier_rank=None)
        elif gb.sharded:
            context = gb.gathered()
        with context:
            if accelerator.is_main_process:
                self.bottleneck.save_pretrained(save_directory, **kwargs)
        accelerator.wait_for_everyone()
        return save_directory


class _CheckpointState:
    """What `accelerator.save_state` stores for the plugin: the g-nets and the step count, as safetensors.

    ``hf_gb_plugin_state.safetensors`` in the state folder holds the bottleneck's ``state_dict``; its metadata
    holds the step count. Nothing is pickled, so a replaced file cannot run code on ``load_state``.
    """

    def __init__(self, plugin: GBPlugin):
        self.plugin = plugin
        self.predict_after_load = False

    def save(self, output_dir: str) -> None:
        from safetensors.torch import save_file

        accelerator = self.plugin._accelerator
        writer = accelerator.is_local_main_process if _save_on_each_node(accelerator) else accelerator.is_main_process
        if not writer:  # every rank holds the same g-nets
            return
        gnets = {k: v.detach().cpu().contiguous() for k, v in self.plugin.bottleneck.state_dict().items()}
        warn_non_finite(gnets, output_dir)
        metadata = {"format": FORMAT_NAME, "steps": str(self.plugin._steps)}
        atomic_write(os.path.join(output_dir, PLUGIN_STATE_NAME), lambda tmp: save_file(gnets, tmp, metadata))

    def load(self, input_dir: str) -> None:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        plugin, gb = self.plugin, self.plugin.bottleneck
        path = os.path.join(input_dir, PLUGIN_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{input_dir} has no {PLUGIN_STATE_NAME}, so the g-nets cannot be restored; it was not written by "
                "accelerator.save_state() with this GBPlugin (earlier hf_gb versions stored them in a pickle, "
                "custom_checkpoint_0.pkl, which is never loaded)"
            )
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
            gnets = load_file(path)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"{path} is corrupt or truncated: {e}") from e
        steps = metadata.get("steps", "")
        if metadata.get("format") != FORMAT_NAME or not steps.isdigit():
            raise ValueError(f"{path} is not a GBPlugin state (metadata format={metadata.get('format')!r}, "
                             f"steps={steps!r})")
        own = gb.state_dict()
        if set(gnets) != set(own) or any(tuple(gnets[k].shape) != tuple(v.shape) for k, v in own.items()):
            wrong = sorted(set(gnets) ^ set(own)) or [k for k, v in own.items() if gnets[k].shape != v.shape]
            raise ValueError(f"{path} holds other g-nets than this plugin's (e.g. {wrong[0]!r}); was it saved with "
                             "another GBConfig or model?")
        warn_non_finite(gnets, path)
        gb.load_state_dict(gnets)
        plugin._steps = int(steps)
        plugin._phase = _IDLE
        plugin._predict_for_eval()  # covered weights stay the prediction whether or not the model loads next
        self.predict_after_load = True

    def after_model_load(self, module: nn.Module, incompatible_keys: Any) -> None:
        """Load-state-dict post-hook of the model: its file held the prediction of an earlier step; predict the
        restored g-nets' weights again (only on the load that `accelerator.load_state` does after `load`)."""
        if self.predict_after_load:
            self.predict_after_load = False
            self.plugin._predict_for_eval()


def _save_on_each_node(accelerator: Any) -> bool:
    return bool(getattr(getattr(accelerator, "project_configuration", None), "save_on_each_node", False))
