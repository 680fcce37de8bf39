"""Training through the bottleneck: transformers' Trainer (`trainer.GBTrainer`, `arguments.GBTrainingArguments`,
with its FSDP2 and DeepSpeed overrides in `fsdp` and `deepspeed`), custom Accelerate loops (`plugin.GBPlugin`), and
the policy both share for several processes (`distributed`). ``hf_gb.GBTrainer`` and friends load these on first
use; this package imports nothing itself, so `settings` can be used without transformers.
"""
