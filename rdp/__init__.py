"""rdp: pretraining and depth-sweep evaluation of recurrent-depth language models.

The repository keeps one top-level folder per room (pretrain/, data_pipeline/, launch/,
kernels/, evals/, slurm/, configs/); installed, they live under this one namespace
(`rdp.pretrain`, `rdp.kernels`, ...), so nothing shadows or is shadowed by PyPI packages
of the same names (`kernels`, `evals`, `launch`, `slurm`).
"""
__version__ = "0.1.0"
