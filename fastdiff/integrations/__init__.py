"""fastdiff's kernels inside other diffusion libraries.

    from fastdiff.integrations.diffusers import patch, unpatch

Each submodule imports its library lazily, so `import fastdiff` never needs it.
"""
