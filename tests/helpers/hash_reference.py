"""The data's counter-based random numbers written plainly, in Python integers:
`ref_uniform(*keys)` is uniform01(hash_keys(*keys)) of dlrm_torchrec.data.hashing
(splitmix64 folded over the keys, then the top 53 bits over 2^53). The preprocessing's
sub-sampling and the derived multi-hot ids are checked against it."""


_M = (1 << 64) - 1


def _splitmix(x):
    z = (x + 0x9E3779B97F4A7C15) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


def ref_uniform(*keys):
    h = 0x243F6A8885A308D3
    for k in keys:
        h = _splitmix(h ^ (k & _M))
    return (h >> 11) * 2.0 ** -53
