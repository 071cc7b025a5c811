"""The StyleGAN2-ADA side of rtm-mapping: the train.py patch (patcher), what the patched train.py
calls (train_hooks), CPU smoke-test shims (cpu), a synthetic dataset (dataset) and checkout lookup."""
