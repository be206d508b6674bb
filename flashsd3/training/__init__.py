"""Training: SD3's rectified-flow objective, data, the loop (flow fine-tuning, Flash distillation).

objectives.py  sigma samplers, flow-matching loss, caption dropout (functions of tensors)
data.py        image + caption examples (folder or JSONL), centre crop and resize
cache.py       `prepare`: VAE latents and CLIP embeddings in safetensors shards; CachedData reads them
config.py      TrainConfig (frozen dataclass) from defaults <- JSON/TOML file <- flags; settings and their types
models.py      the transformer / VAE / encoders a command loads, and the meta-device model of the checks
trainable.py   LoRA adapters or chosen full weights; the final save (PEFT layout / transformer folder)
folder.py      the run folder: its marker, what --overwrite deletes, metrics
checkpoint.py  the checkpoint format, writing, choosing the one to resume from
loop.py        torchrun, the checks before a run, the step loop with the one OptimizerStep, Ctrl-C; knows no loss
grid.py        sample grids from fixed prompts and seeds
flow.py        FlowConfig + FlowTask: fine-tuning with SD3's objective
flash/         FlashConfig + FlashTask: Flash Diffusion distillation (flash/__init__.py lists its files)
cli.py         `flashsd3-train prepare | flow | flash` (scripts/train.py)
"""
