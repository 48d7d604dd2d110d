"""How every fastdiff model config reads a config.json written by diffusers or transformers.

A real checkpoint's config carries more than the network's shape: bookkeeping ("_diffusers_version"),
generation settings, and keys added by library releases newer than fastdiff. Like diffusers, fastdiff reads
the settings it implements, insists that the settings it knows but does not implement keep the value that
switches them off (otherwise the numbers would silently differ), and drops the rest with one warning rather
than refusing a checkpoint it can run.
"""
import warnings
from collections.abc import Collection, Mapping
from typing import Any


def read_settings(d: Mapping[str, Any], fields: Collection[str], fixed: Mapping[str, tuple], where: str,
                  ignored: Collection[str] = ()) -> dict[str, Any]:
    """The entries of `d` whose key is in `fields`, for `Config(**result)`.

    fixed:   settings fastdiff does not implement, each with the values that leave the computation unchanged;
             any other value raises ValueError naming the key, the value and the values expected.
    ignored: keys known not to change the forward pass; they and keys starting with "_" (bookkeeping) are
             dropped silently. Every other key is dropped with one warning that names them all.
    where:   the model part, for messages ("UNet").
    """
    settings, unknown = {}, []
    for key, value in d.items():
        if key in fields:
            settings[key] = value
        elif key in fixed:
            # Lists in JSON, tuples in diffusers' in-memory configs: compare both as lists.
            if (list(value) if isinstance(value, tuple) else value) not in fixed[key]:
                expected = " or ".join(repr(v) for v in fixed[key])
                raise ValueError(f"{where} setting {key}={value!r} is not supported by fastdiff (expected {expected})")
        elif not (key.startswith("_") or key in ignored):
            unknown.append(key)
    if unknown:
        warnings.warn(f"{where} config keys unknown to fastdiff are ignored: {unknown}", stacklevel=3)
    return settings
