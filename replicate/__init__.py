"""alexnet-2012: the 2012 AlexNet (Krizhevsky, Sutskever, Hinton), replicated in PyTorch."""

from replicate.kernels.mkl_dispatch import resolve_vml_dispatch

resolve_vml_dispatch()  # before any op is split across threads: see mkl_dispatch
