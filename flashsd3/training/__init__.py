"""Training: SD3's rectified-flow objective, data, the loops (flow fine-tuning, Flash distillation).

objectives.py  sigma samplers, flow-matching loss, caption dropout (functions of tensors)
data.py        image + caption examples (folder or JSONL), centre crop and resize
cache.py       `prepare`: VAE latents and CLIP embeddings in safetensors shards; CachedData reads them
config.py      TrainConfig (frozen dataclass) from defaults <- JSON/TOML file <- flags
trainable.py   LoRA adapters or chosen full weights; the final save (PEFT layout / transformer folder)
loop.py        torchrun + DDP, the step loop, checkpoints, resume, metrics, Ctrl-C; objective-agnostic (Task)
grid.py        sample grids from fixed prompts and seeds
flow.py        FlowConfig + FlowTask: fine-tuning with SD3's objective
cli.py         `flashsd3-train prepare | flow` (scripts/train.py)
"""
