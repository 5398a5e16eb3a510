"""One device mesh with five named axes, built from a short spec such as "data=2,expert=4".

| axis       | what it splits                                                        |
|------------|-----------------------------------------------------------------------|
| `data`     | batch (attention runs data-parallel: DP attention)                    |
| `fsdp`     | parameters for training (and the batch with them)                     |
| `expert`   | routed experts                                                        |
| `tensor`   | query heads, output groups, expert / shared FFN width, vocabulary    |
| `sequence` | compressed KV entries of long contexts (cache_seq)                   |

Every mesh has all five axes (unnamed ones have size 1), so any rule set works on
any mesh shape. The order is outermost first: `data` spans hosts (DCN) most
naturally, `tensor` and `sequence` want the fastest links.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from v4jax.errors import MeshError

AXES = ("data", "fsdp", "expert", "tensor", "sequence")


def parse_mesh_spec(spec: str | Mapping[str, int], n_devices: int) -> dict[str, int]:
    """"data=2,expert=4" (or a dict) -> sizes of all five axes; one size may be -1 (fill)."""
    if isinstance(spec, str):
        sizes = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep:
                raise MeshError(f"mesh spec {spec!r}: {item!r} is not axis=size")
            if name in sizes:
                raise MeshError(f"mesh spec {spec!r}: axis {name!r} given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise MeshError(f"mesh spec {spec!r}: size of {name!r} is not an integer") from None
    else:
        sizes = dict(spec)
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise MeshError(f"mesh spec {spec!r}: unknown axis {unknown[0]!r} (axes are {', '.join(AXES)})")
    fill = [a for a, n in sizes.items() if n == -1]
    if len(fill) > 1 or any(n < 1 and n != -1 for n in sizes.values()):
        raise MeshError(f"mesh spec {spec!r}: sizes must be >= 1, with at most one -1 (fill)")
    known = math.prod(n for n in sizes.values() if n != -1)
    if fill:
        if n_devices % known:
            raise MeshError(f"mesh spec {spec!r}: {n_devices} devices do not divide by {known}")
        sizes[fill[0]] = n_devices // known
    out = {a: sizes.get(a, 1) for a in AXES}
    if math.prod(out.values()) != n_devices:
        raise MeshError(f"mesh spec {spec!r} needs {math.prod(out.values())} devices; {n_devices} are available")
    return out


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with the five axes in AXES order, all AxisType.Auto.

    With several processes (`jax.distributed`) the devices are the global ones, so
    every process builds the same mesh from the same spec.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)


def describe(mesh: Mesh) -> str:
    """The non-trivial axes of a mesh as a spec string ("data=2,expert=4"; "single" for one device)."""
    parts = [f"{a}={n}" for a, n in mesh.shape.items() if n > 1]
    return ",".join(parts) or "single"


def simulate_cpu_devices(n: int) -> None:
    """Ask JAX for n CPU devices; possible only before its first computation.

    Raises MeshError if JAX has already started with another number of CPU devices.
    """
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:
        have = len(jax.devices("cpu"))
        if have != n:
            raise MeshError(f"cannot simulate {n} CPU devices: JAX already started with {have} ({e})") from e
