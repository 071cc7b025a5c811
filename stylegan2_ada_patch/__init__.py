"""The official-code side of rtm-mapping, for StyleGAN2-ADA and StyleGAN3 checkouts (the package name is
historical): the train.py patch (patcher, one table of edits per codebase), what the patched train.py
calls (train_hooks), CPU smoke-test shims (cpu), a synthetic dataset (dataset) and checkout lookup (checkout)."""
