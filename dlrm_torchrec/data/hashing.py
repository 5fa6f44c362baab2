"""Counter-based random numbers: a value is a hash of its keys (seed, position, ...), so
any process computes any sample without generating the ones before it. numpy only (the
preprocessing CLI imports this without torch)."""

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def hash_keys(*keys) -> np.ndarray:
    """Hash of a tuple of (broadcast) integer keys -> uint64 array."""
    h = np.uint64(0x243F6A8885A308D3)
    with np.errstate(over="ignore"):
        for k in keys:
            h = splitmix64(np.asarray(h, dtype=np.uint64) ^ np.asarray(k).astype(np.uint64))
    return np.asarray(h, dtype=np.uint64)


def uniform01(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> float64 uniform in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def normal(h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
    """Two independent hash arrays -> standard normals (Box-Muller)."""
    u1 = 1.0 - uniform01(h1)  # (0, 1]
    u2 = uniform01(h2)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
