"""Secure aggregation by pairwise additive masking (Bonawitz et al., CCS 2017, "SecAgg"),
with a fresh X25519 key agreement every round and dropout recovery through Shamir shares.
Pure: no Ray, no I/O; the coordinator relays the messages (`fedmrg.privacy.server`).

One round, clients u in the round's roster, each holding a vector x_u:

1. `advertise`: u makes two X25519 key pairs, (c_u) to encrypt shares to its peers and (s_u)
   for pairwise masks, and sends the public halves.
2. `share_keys`: given every advertised key, u draws a self-mask seed b_u, splits b_u and its
   mask secret key s_u into t-of-n Shamir shares (over GF(2^521 - 1)), and sends each peer v
   its two shares encrypted with AES-GCM under HKDF(X25519(c_u, c_v)). The coordinator only
   relays ciphertexts.
3. `mask`: u sends y_u = x_u + PRG(b_u) + sum_{v in U2, v != u} +-PRG(k_uv) (mod 2^64),
   k_uv = HKDF(X25519(s_u, s_v)), + when u < v, - when u > v (U2: who finished step 2). The
   pairwise masks cancel in the sum over any set that contains both ends.
4. `unmask`: once masked inputs are in (survivors U3), each survivor sends, for every other
   survivor, its share of b_v and, for every client of U2 that dropped, its share of s_v,
   never both for one client (that would unmask it). With t shares the coordinator rebuilds
   b_v of the survivors and s_v of the dropped, removes PRG(b_v) and the dropped clients'
   pairwise masks, and is left with sum_{u in U3} x_u: nothing about any single x_u.

Vectors are fixed point: round(x * 2^f) as int64, summed mod 2^64 (uint64 wraps), read back as
a signed int64 / 2^f. The rounding error is at most 2^-(f+1) per coordinate and client;
`quantize` refuses values whose sum over clients could wrap (|x| 2^f >= 2^62 / clients).
PRG: AES-256 in counter mode (`cryptography`), a cryptographic PRG (numpy's are not).
Threshold t = max(2, n // 2 + 1) of the n advertised clients: more than half must cooperate to
unmask anything, and up to n - t clients may drop after masking.

Honest-but-curious coordinator: it learns the sum, the roster and each client's sample
count. SecAgg+ (Bell et al. 2020) masks with a sparse graph of neighbours to scale to
thousands of clients; a federation of hospitals has a handful, so every pair is masked.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmrg.privacy import PrivacyError

PRIME = 2**521 - 1  # Shamir field: a Mersenne prime above every 256-bit secret
HEADROOM_BITS = 62  # |sum| stays below 2^62 of the 2^63 a signed int64 holds
SELF, MASK = "self", "mask"  # which secret an unmasking share rebuilds


# --------------------------------------------------------------------------- fixed point


def quantize(values: np.ndarray, fraction_bits: int, clients: int) -> np.ndarray:
    """float values -> uint64 fixed point round(x * 2^f) mod 2^64; an error naming the largest
    value when a sum over `clients` of such values could wrap."""
    scaled = np.rint(np.asarray(values, dtype=np.float64) * float(2 ** fraction_bits))
    limit = float(2 ** HEADROOM_BITS) / max(1, clients)
    peak = float(np.max(np.abs(scaled))) if scaled.size else 0.0
    if not np.isfinite(peak) or peak >= limit:
        raise PrivacyError(f"secure aggregation: value {peak / 2 ** fraction_bits:.6g} does not "
                           f"fit {fraction_bits} fraction bits for {clients} clients (|x| < "
                           f"{limit / 2 ** fraction_bits:.6g}); lower "
                           f"privacy.secagg_fraction_bits")
    return scaled.astype(np.int64).view(np.uint64)


def dequantize(total: np.ndarray, fraction_bits: int) -> np.ndarray:
    """A uint64 fixed-point sum -> float64 (two's complement)."""
    return total.view(np.int64).astype(np.float64) / float(2 ** fraction_bits)


# --------------------------------------------------------------------------- Shamir


def shamir_split(secret: int, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """{x: f(x)} for a random polynomial f of degree threshold - 1 with f(0) = secret."""
    if not 0 <= secret < PRIME:
        raise PrivacyError("Shamir secret out of the field")
    if not 1 <= threshold <= len(xs):
        raise PrivacyError(f"threshold {threshold} for {len(xs)} shares")
    coefficients = [secret, *(secrets.randbelow(PRIME) for _ in range(threshold - 1))]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def shamir_combine(shares: Mapping[int, int], threshold: int) -> int:
    """f(0) from at least `threshold` points {x: f(x)} (Lagrange interpolation)."""
    if len(shares) < threshold:
        raise PrivacyError(f"{len(shares)} shares, {threshold} needed")
    points = list(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret


# --------------------------------------------------------------------------- primitives


def threshold_for(clients: int) -> int:
    """Shares needed to rebuild a secret among `clients` (module docstring)."""
    return min(clients, max(2, clients // 2 + 1))


def _kdf(secret: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=info.encode()).derive(secret)


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` pseudorandom uint64 from a 32-byte seed (AES-256-CTR keystream)."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    stream = encryptor.update(b"\0" * (8 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=np.uint64).copy()


def _raw(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    if isinstance(key, X25519PrivateKey):
        return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pair_mask(secret_key: X25519PrivateKey, peer_public: bytes, round_id: int, a: str, b: str,
              length: int) -> np.ndarray:
    """PRG(k_ab) of the pair {a, b}: the same from either end's secret key."""
    low, high = sorted((a, b))
    shared = secret_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return prg(_kdf(shared, f"fedmrg secagg mask {round_id} {low} {high}"), length)


def _signed_add(total: np.ndarray, mask: np.ndarray, owner: str, peer: str) -> None:
    """total += mask when owner < peer, -= when owner > peer (mod 2^64, in place)."""
    if owner < peer:
        np.add(total, mask, out=total)
    else:
        np.subtract(total, mask, out=total)


@dataclass(frozen=True)
class AdvertisedKeys:
    """Step 1: a client's two public keys for one round."""

    center: str
    cipher_public: bytes
    mask_public: bytes


def _share_cipher(secret_key: X25519PrivateKey, peer_public: bytes, round_id: int) -> AESGCM:
    shared = secret_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return AESGCM(_kdf(shared, f"fedmrg secagg shares {round_id}"))


def _aad(round_id: int, sender: str, receiver: str) -> bytes:
    return f"{round_id}|{sender}|{receiver}".encode()


# --------------------------------------------------------------------------- client


class SecAggClient:
    """One client's side of one round (module docstring, steps 1-4)."""

    def __init__(self, center: str, round_id: int):
        self.center, self.round_id = center, round_id
        self._cipher_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = secrets.token_bytes(32)
        self._roster: dict[str, AdvertisedKeys] = {}
        self._threshold = 0
        self._held: dict[str, tuple[int, int, int]] = {}  # owner -> (x, self share, mask share)
        self._masked_with: list[str] = []
        self._unmasked = False

    def advertise(self) -> AdvertisedKeys:
        return AdvertisedKeys(self.center, _raw(self._cipher_key.public_key()),
                              _raw(self._mask_key.public_key()))

    def share_keys(self, roster: Mapping[str, AdvertisedKeys]) -> dict[str, bytes]:
        """Step 2: {peer: ciphertext of its shares of my b and s}; `roster`: every advertised
        key of the round, mine included."""
        if self.center not in roster or len(roster) < 2:
            raise PrivacyError(f"secure aggregation round {self.round_id}: client "
                               f"{self.center!r} needs itself and a peer in the roster, got "
                               f"{sorted(roster)}")
        self._roster = dict(roster)
        names = sorted(roster)
        xs = {c: i + 1 for i, c in enumerate(names)}
        self._threshold = threshold_for(len(names))
        self_shares = shamir_split(int.from_bytes(self._self_seed, "big"), list(xs.values()),
                                   self._threshold)
        mask_shares = shamir_split(int.from_bytes(_raw(self._mask_key), "big"),
                                   list(xs.values()), self._threshold)
        out = {}
        for peer in names:
            x = xs[peer]
            if peer == self.center:
                self._held[self.center] = (x, self_shares[x], mask_shares[x])
                continue
            plain = f"{x}:{self_shares[x]}:{mask_shares[x]}".encode()
            cipher = _share_cipher(self._cipher_key, roster[peer].cipher_public, self.round_id)
            nonce = secrets.token_bytes(12)
            out[peer] = nonce + cipher.encrypt(nonce, plain,
                                               _aad(self.round_id, self.center, peer))
        return out

    def mask(self, values: np.ndarray, shared_with_me: Mapping[str, bytes],
             active: Sequence[str]) -> np.ndarray:
        """Step 3: the masked fixed-point vector. `shared_with_me`: {sender: ciphertext} of
        every client of `active` (U2: who finished step 2) but me."""
        active = sorted(set(active))
        if self.center not in active or len(active) < self._threshold:
            raise PrivacyError(f"secure aggregation round {self.round_id}: {len(active)} "
                               f"clients finished sharing keys, {self._threshold} needed")
        for sender in active:
            if sender == self.center:
                continue
            if sender not in shared_with_me:
                raise PrivacyError(f"secure aggregation round {self.round_id}: no shares from "
                                   f"{sender!r} for {self.center!r}")
            blob = shared_with_me[sender]
            cipher = _share_cipher(self._cipher_key, self._roster[sender].cipher_public,
                                   self.round_id)
            x, b_share, s_share = (int(p) for p in cipher.decrypt(
                blob[:12], blob[12:], _aad(self.round_id, sender, self.center)).split(b":"))
            self._held[sender] = (x, b_share, s_share)
        values = np.asarray(values, dtype=np.uint64)
        out = values + prg(self._self_seed, values.size)
        for peer in active:
            if peer != self.center:
                _signed_add(out, pair_mask(self._mask_key, self._roster[peer].mask_public,
                                           self.round_id, self.center, peer, values.size),
                            self.center, peer)
        self._masked_with = active
        return out

    def unmask(self, survivors: Sequence[str], dropped: Sequence[str],
               ) -> dict[str, tuple[str, int, int]]:
        """Step 4: {owner: (SELF or MASK, x, share)}: b shares of the survivors, s shares of
        the dropped. Refused once, and for a client named both ways."""
        if self._unmasked:
            raise PrivacyError(f"client {self.center!r}: round {self.round_id} already unmasked")
        both = set(survivors) & set(dropped)
        unknown = (set(survivors) | set(dropped)) - set(self._masked_with)
        if both or unknown or self.center not in survivors:
            raise PrivacyError(f"client {self.center!r}: refusing to unmask round "
                               f"{self.round_id} (survivors {sorted(survivors)}, dropped "
                               f"{sorted(dropped)}, masked with {self._masked_with})")
        self._unmasked = True
        out = {}
        for owner in survivors:
            x, b_share, _ = self._held[owner]
            out[owner] = (SELF, x, b_share)
        for owner in dropped:
            x, _, s_share = self._held[owner]
            out[owner] = (MASK, x, s_share)
        return out


# --------------------------------------------------------------------------- server


class SecAggServer:
    """The coordinator's side of one round: it relays, then removes the masks of the sum."""

    def __init__(self, round_id: int, length: int):
        self.round_id, self.length = round_id, length
        self.roster: dict[str, AdvertisedKeys] = {}
        self.active: list[str] = []  # U2
        self._shares: dict[str, dict[str, bytes]] = {}  # sender -> {receiver: ciphertext}

    @property
    def threshold(self) -> int:
        return threshold_for(len(self.roster))

    def set_roster(self, keys: Sequence[AdvertisedKeys]) -> dict[str, AdvertisedKeys]:
        """Step 1's replies -> the roster every client gets for step 2."""
        self.roster = {k.center: k for k in sorted(keys, key=lambda k: k.center)}
        if len(self.roster) < 2:
            raise PrivacyError(f"secure aggregation round {self.round_id}: "
                               f"{len(self.roster)} client(s) advertised keys, at least 2 "
                               f"needed (one client's sum is its update)")
        return dict(self.roster)

    def route_shares(self, shares: Mapping[str, Mapping[str, bytes]],
                     ) -> dict[str, dict[str, bytes]]:
        """Step 2's replies {sender: {receiver: ciphertext}} -> {receiver: {sender:
        ciphertext}} over U2 (the senders), each to be delivered with its step-3 request."""
        self.active = sorted(shares)
        if len(self.active) < self.threshold:
            raise PrivacyError(f"secure aggregation round {self.round_id}: {len(self.active)} "
                               f"clients shared keys, {self.threshold} needed")
        self._shares = {s: dict(v) for s, v in shares.items()}
        return {r: {s: self._shares[s][r] for s in self.active if s != r}
                for r in self.active}

    def unmask_request(self, masked: Mapping[str, np.ndarray]) -> tuple[list[str], list[str]]:
        """(survivors, dropped) of U2 once the masked inputs in `masked` are in."""
        survivors = sorted(set(masked) & set(self.active))
        if len(survivors) < self.threshold:
            raise PrivacyError(f"secure aggregation round {self.round_id}: {len(survivors)} "
                               f"masked inputs, {self.threshold} needed to unmask")
        return survivors, [c for c in self.active if c not in survivors]

    def aggregate(self, masked: Mapping[str, np.ndarray],
                  unmasking: Mapping[str, Mapping[str, tuple[str, int, int]]]) -> np.ndarray:
        """sum of the survivors' vectors (uint64 mod 2^64) from their masked inputs and the
        unmasking shares {responder: {owner: (kind, x, share)}}."""
        survivors, dropped = self.unmask_request(masked)
        responders = [r for r in survivors if r in unmasking]
        if len(responders) < self.threshold:
            raise PrivacyError(f"secure aggregation round {self.round_id}: {len(responders)} "
                               f"clients sent unmasking shares, {self.threshold} needed")

        def rebuild(owner: str, kind: str) -> int:
            points = {}
            for r in responders:
                got = unmasking[r].get(owner)
                if got is None or got[0] != kind:
                    raise PrivacyError(f"secure aggregation round {self.round_id}: {r!r} sent "
                                       f"no {kind} share of {owner!r}")
                points[got[1]] = got[2]
            return shamir_combine(points, self.threshold)

        total = np.zeros(self.length, dtype=np.uint64)
        for center in survivors:
            vector = np.asarray(masked[center], dtype=np.uint64)
            if vector.shape != (self.length,):
                raise PrivacyError(f"secure aggregation round {self.round_id}: {center!r} "
                                   f"sent {vector.shape[0]} values, {self.length} expected")
            np.add(total, vector, out=total)
        for center in survivors:
            seed = rebuild(center, SELF).to_bytes(32, "big")
            np.subtract(total, prg(seed, self.length), out=total)
        for gone in dropped:
            secret = X25519PrivateKey.from_private_bytes(rebuild(gone, MASK).to_bytes(32, "big"))
            for center in survivors:
                # the survivor added +-PRG(k_{center,gone}): take it out again
                mask = pair_mask(secret, self.roster[center].mask_public, self.round_id,
                                 center, gone, self.length)
                _signed_add(total, mask, gone, center)  # the opposite sign of the survivor's
        return total
