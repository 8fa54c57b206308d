"""Secret site bundles (issue 19): training choices drawn from a secret the attacker lacks.

The shipped bundle ships inside a public package, so an attacker holds every weight of it and
evades it completely (README, "Adaptive attacks"). A site that trains its own bundle can hold
something the attacker does not: a secret from which training draws the detector CNN's shape
(``train.detector_cnn.CNN_SHAPES``, ``CNN_TRUNCS``) and training seed, a subset of the forest's
features in a drawn order, the forest's seed and, with the victim zoo, which zoo families the
training attacks come from. Nothing here makes the site bundle robust to an attacker who holds
*it*; it measures (``train.greybox``) how much an attack crafted on the public bundle transfers.

The secret lives in a file (never on argv, where ``ps`` and shell history see it) that only
its owner may read (mode 0600: a group- or world-readable file is refused). Every draw is an
HMAC-SHA256 of the secret and the draw's name, so one secret always gives the same bundle
choices and the draws are independent of each other. The bundle records only a salted digest
(``sha256(salt || secret)``, the salt stored beside it) so a site can tell which of its
secrets made a bundle (``matches_digest``) without the bundle revealing it; the model card
lists the drawn choices, never the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIN_SECRET_BYTES = 16  # 128 bits: a guessed secret must not be a practical search
DOMAIN = b"xray-sentinel/secret-site-bundle/v1/"
# share of the forest's feature set a site bundle keeps (at least this many of them)
MIN_FEATURE_SHARE = 0.6
# the fewest zoo families a site bundle's training attacks come from
MIN_ZOO_FAMILIES = 4


class SecretError(ValueError):
    """A secret file that is missing, readable by others, or too short; says the fix."""


def new_secret_file(path: Path) -> Path:
    """Write a fresh 256-bit secret (hex) to ``path``, mode 0600, refusing to overwrite one."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise SecretError(f"secret file {path} exists: never overwritten (a bundle made from "
                          "it would no longer be reproducible); pick a new path") from exc
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    return path


def read_secret(path: Path) -> bytes:
    """The secret's bytes (surrounding whitespace stripped). Refuses a file others can read
    (chmod 600 it) and one shorter than ``MIN_SECRET_BYTES``."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise SecretError(f"secret file {path} does not exist; make one with "
                          f"`sentinel train --new-secret-file {path} ...`") from exc
    if not stat.S_ISREG(st.st_mode):
        raise SecretError(f"secret file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise SecretError(f"secret file {path} is readable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`")
    raw = path.read_bytes().strip()
    if len(raw) < MIN_SECRET_BYTES:
        raise SecretError(f"secret file {path} holds {len(raw)} bytes, fewer than "
                          f"{MIN_SECRET_BYTES}; make a new one with --new-secret-file")
    return raw


def _rng(secret: bytes, name: str) -> np.random.Generator:
    """An independent generator per draw: HMAC-SHA256(secret, domain || name)."""
    mac = hmac.new(secret, DOMAIN + name.encode(), hashlib.sha256).digest()
    return np.random.default_rng(int.from_bytes(mac, "big"))


def secret_digest(secret: bytes, salt: bytes) -> str:
    return hashlib.sha256(salt + secret).hexdigest()


def matches_digest(secret: bytes, record: dict[str, Any]) -> bool:
    """Whether ``secret`` made the bundle whose manifest records ``record`` (its "secret")."""
    want = secret_digest(secret, bytes.fromhex(record["salt"]))
    return hmac.compare_digest(want, record["digest"])


@dataclass(frozen=True)
class SecretDraws:
    """What a secret drew for one site bundle, and its salted digest (never the secret).

    Recorded whole in the bundle manifest (``training_data.config.secret``) and in its model
    card: the choices are no secret once the bundle itself is held; the secret stays needed
    to make another bundle with the same choices."""

    cnn_filters: int
    cnn_width: int
    cnn_kernel: int
    cnn_trunc: float
    cnn_seed: int
    forest_seed: int
    feature_names: tuple[str, ...]  # the forest's inputs, in the drawn order
    zoo_families: tuple[str, ...]  # () when trained without the zoo
    salt: str
    digest: str
    scheme: str = "sha256(salt || secret)"

    @property
    def tag(self) -> str:
        """Work-dir cache key of these choices (the models they make), not of the secret's
        digest: the same secret with a new salt reuses its trained models."""
        choices = {k: v for k, v in asdict(self).items() if k not in ("salt", "digest")}
        return hashlib.sha256(json.dumps(choices, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def cnn_arch(self) -> dict[str, Any]:
        """Keyword arguments of ``train.detector_cnn.build_shipped``."""
        return {"filters": self.cnn_filters, "width": self.cnn_width,
                "kernel": self.cnn_kernel, "trunc": self.cnn_trunc}

    def manifest_record(self) -> dict[str, Any]:
        return asdict(self)

    def card_markdown(self, feature_set: str) -> str:
        """The model card's section: which choices were drawn, without the secret."""
        from detector.features import FEATURE_SETS

        left_out = [n for n in FEATURE_SETS[feature_set] if n not in self.feature_names]
        zoo = (", ".join(self.zoo_families) if self.zoo_families
               else "none (trained without the victim zoo)")
        return "\n".join([
            "## Secret site bundle",
            "",
            "Its training choices were drawn from a site secret (`sentinel train "
            "--secret-file`). The secret is not in this bundle; its salted digest is "
            f"(`{self.scheme}`, salt `{self.salt}`, digest `{self.digest}`), so the site can "
            "check which of its secrets made it.",
            "",
            "| choice | drawn |",
            "| --- | --- |",
            f"| detector CNN shape | {self.cnn_filters} high-pass filters, width "
            f"{self.cnn_width}, {self.cnn_kernel}x{self.cnn_kernel} kernels, residual "
            f"truncated at {self.cnn_trunc:g} grey levels |",
            "| detector CNN training seed | drawn |",
            f"| forest features ({len(self.feature_names)} of "
            f"{len(FEATURE_SETS[feature_set])}, in this order) | "
            f"{', '.join(self.feature_names)} |",
            f"| features left out | {', '.join(left_out) or 'none'} |",
            "| forest seed | drawn |",
            f"| zoo families of the training attacks | {zoo} |",
            "",
            "Operating point: keep this bundle's threshold and add a CNN gate calibrated on at "
            "least 300 of the site's own clean images per source (`sentinel calibrate CLEAN_DIR "
            "--bundle THIS_BUNDLE --cnn-gate`, then `[detector] cnn_gate`): the attacker who "
            "holds the public bundle lacks this CNN's weights, and measured on three such "
            "bundles the gate caught 47-82% of the strongest public-bundle attack (README, "
            "\"Adaptive attacks\"), where the threshold alone caught none. It does not stop "
            "an attacker who obtains this bundle.",
            "",
        ])


def draw(secret: bytes, feature_set: str, zoo_families: tuple[str, ...] = (),
         salt: bytes | None = None) -> SecretDraws:
    """Every choice of a site bundle from ``secret``. ``zoo_families``: the families training
    may draw from (empty without the zoo); a subset of at least ``MIN_ZOO_FAMILIES`` is kept.
    ``salt`` (default: 16 fresh random bytes) only salts the recorded digest."""
    from detector.features import FEATURE_SETS
    from detector.scoring import GATE_FEATURE
    from train.detector_cnn import CNN_SHAPES, CNN_SHAPES_V1, CNN_TRUNCS

    names = [n for n in FEATURE_SETS[feature_set] if n != GATE_FEATURE]
    r = _rng(secret, "cnn-shape")
    shape = CNN_SHAPES_V1[int(r.integers(len(CNN_SHAPES_V1)))]
    while shape not in CNN_SHAPES:  # over the latency budget: draw again, same stream
        shape = CNN_SHAPES_V1[int(r.integers(len(CNN_SHAPES_V1)))]
    trunc = float(CNN_TRUNCS[int(_rng(secret, "cnn-trunc").integers(len(CNN_TRUNCS)))])
    r = _rng(secret, "features")
    k = int(r.integers(int(np.ceil(MIN_FEATURE_SHARE * len(names))), len(names) + 1))
    feats = tuple(names[i] for i in r.permutation(len(names))[:k])
    fams: tuple[str, ...] = ()
    if zoo_families:
        r = _rng(secret, "zoo-families")
        lo = min(MIN_ZOO_FAMILIES, len(zoo_families))
        n_f = int(r.integers(lo, len(zoo_families) + 1))
        keep = set(r.permutation(len(zoo_families))[:n_f].tolist())
        fams = tuple(f for i, f in enumerate(zoo_families) if i in keep)
    salt = secrets.token_bytes(16) if salt is None else salt
    return SecretDraws(
        cnn_filters=shape[0], cnn_width=shape[1], cnn_kernel=shape[2], cnn_trunc=trunc,
        cnn_seed=int(_rng(secret, "cnn-seed").integers(2**31 - 1)),
        forest_seed=int(_rng(secret, "forest-seed").integers(2**31 - 1)),
        feature_names=feats, zoo_families=fams, salt=salt.hex(),
        digest=secret_digest(secret, salt))


def feature_columns(draws: SecretDraws | None, feature_set: str) -> np.ndarray | None:
    """Indices of the drawn features in ``feature_set``'s vector (None: all, in order)."""
    if draws is None:
        return None
    from detector.features import FEATURE_SETS

    names = FEATURE_SETS[feature_set]
    return np.asarray([names.index(n) for n in draws.feature_names], np.int64)
