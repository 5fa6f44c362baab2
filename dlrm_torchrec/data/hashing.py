"""Counter-based random numbers: a value is a hash of its keys (seed, position, ...), so
any process computes any sample without generating the ones before it. numpy only (the
preprocessing CLI imports this without torch)."""

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = np.array(x, dtype=np.uint64)  # a copy (0-d for a scalar)
    return splitmix64_(z, np.empty_like(z))


def splitmix64_(z: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """splitmix64 of the uint64 array `z`, in place; `tmp` is scratch of z's shape. Makes no
    temporaries, so a caller working through cache-sized chunks stays in cache."""
    with np.errstate(over="ignore"):
        np.add(z, _GOLDEN, out=z)
        for shift, mult in ((30, _M1), (27, _M2)):
            np.right_shift(z, np.uint64(shift), out=tmp)
            np.bitwise_xor(z, tmp, out=z)
            np.multiply(z, mult, out=z)
        np.right_shift(z, np.uint64(31), out=tmp)
        np.bitwise_xor(z, tmp, out=z)
    return z


def hash_keys(*keys) -> np.ndarray:
    """Hash of a tuple of (broadcast) integer keys -> uint64 array."""
    h = np.uint64(0x243F6A8885A308D3)
    with np.errstate(over="ignore"):
        for k in keys:
            h = splitmix64(np.asarray(h, dtype=np.uint64) ^ np.asarray(k).astype(np.uint64))
    return np.asarray(h, dtype=np.uint64)


def uniform01(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> float64 uniform in [0, 1): the top 53 bits / 2^53.

    The 53-bit integers go to float64 through int64, which holds them exactly: numpy's
    uint64 -> float64 conversion is about 8x slower than int64's, and this is the generated
    data's hot path."""
    top = np.right_shift(h, np.uint64(11))
    u = np.empty(np.shape(top), dtype=np.float64)
    np.copyto(u, np.asarray(top).view(np.int64), casting="unsafe")
    np.multiply(u, 1.0 / (1 << 53), out=u)
    return u


def normal(h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
    """Two independent hash arrays -> standard normals (Box-Muller):
    sqrt(-2 log(1 - u1)) cos(2 pi u2), worked in place (no temporaries)."""
    radius = uniform01(h1)
    np.subtract(1.0, radius, out=radius)  # (0, 1]
    np.log(radius, out=radius)
    np.multiply(radius, -2.0, out=radius)
    np.sqrt(radius, out=radius)
    angle = uniform01(h2)
    np.multiply(angle, 2.0 * np.pi, out=angle)
    np.cos(angle, out=angle)
    np.multiply(radius, angle, out=radius)
    return radius
