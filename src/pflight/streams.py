"""Every random stream of pflight, one enum: each stream is seeded by (seed, ..., its purpose).

A stream's seed is :func:`stream_seed` of integers: the data seed, the round, the client and a
:class:`Stream` purpose (or, for streams fixed across rounds, a purpose alone). Keeping every purpose in
one enum makes two uses of the same stream impossible by construction (the values are unique, tested);
the values are those the streams always had, so runs are unchanged.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


def stream_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers, stable across processes and Python versions.

    >>> stream_seed(0, 1, 2) == stream_seed(0, 1, 2), stream_seed(0, 1, 2) == stream_seed(0, 2, 1)
    (True, False)
    """
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class Stream(IntEnum):
    """The purposes of pflight's random streams.

    Per (seed, round, client): ``TRAIN`` (batch order and local randomness of local training; the
    vectorized executor uses it for the same batch order), ``EVAL`` (personalization at evaluation),
    ``FAULT`` (dropouts and stragglers), ``FEDORA_SIGNATURE`` (FEDORA's one-time signature pass); per
    (seed, round): ``SAMPLE`` (the round's clients), ``EVAL_SAMPLE`` (the clients a round evaluates under
    ``Federation(eval_clients=...)``), ``FEDMD_SUBSET`` (FedMD's public subset); per seed:
    ``NEW_CLIENTS``, ``PUBLIC_POOL``, ``CLIENT_SPLIT`` (with the client), ``PFEDHN_INIT`` (per seed: the
    hypernetwork; per (seed, client): pFedHN-PC's private heads), ``LEAF_USERS`` (the users a LEAF source
    samples); per client:
    ``META_SUPPORT`` (the fixed support/query split), ``LOCAL_ONLY`` (the local-only model's batches).
    The global RNGs are reseeded per (seed, round, client, purpose + ``GLOBAL_OFFSET``) for dropout
    layers and the like.

    >>> len({int(s) for s in Stream}) == len(Stream)
    True
    """

    TRAIN = 0
    EVAL = 1
    SAMPLE = 2
    FAULT = 3
    FEDORA_SIGNATURE = 4  # its generator is never drawn from; it was 3 (FAULT's) before it had its own
    EVAL_SAMPLE = 5
    CLIENT_SPLIT = 31
    GLOBAL_OFFSET = 100
    NEW_CLIENTS = 7919
    META_SUPPORT = 0x5EED
    LOCAL_ONLY = 0x10CA1
    PUBLIC_POOL = 104729
    FEDMD_SUBSET = 0xFED3D
    PFEDHN_INIT = 0x48594E
    LEAF_USERS = 0x1EAF
