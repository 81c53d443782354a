"""difflora: LoRA fine-tuning of Stable Diffusion with Riemannian-preconditioned optimizers.

The data path is laid out module by module: ``data`` (images -> tensors), ``models`` (loading and
LoRA attachment), ``train`` (latents -> loss -> preconditioned step), ``optim`` (the scaled
optimizers), ``lora_io`` (LoRA files), ``sampling`` (samples and grids), ``evaluation`` (scores).
"""

__version__ = "0.1.0"
