"""Secret site bundles (issue 19): training choices drawn from a secret the attacker lacks.

The shipped bundle ships inside a public package, so an attacker holds every weight of it and
evades it completely (README, "Adaptive attacks"). A site that trains its own bundle can hold
something the attacker does not: a secret from which training draws the detector CNN's shape
(``train.detector_cnn.CNN_SHAPES``, ``CNN_TRUNCS``) and training seed, a subset of the forest's
features in a drawn order, the forest's seed and, with the victim zoo, which zoo families the
training attacks come from. Nothing here makes the site bundle robust to an attacker who holds
*it*; it measures (``train.greybox``) how much an attack crafted on the public bundle transfers.

The secret lives in a file (never on argv, where ``ps`` and shell history see it) that only
its owner may read (mode 0600: a group- or world-readable file is refused). The file also says
which **draw scheme** its secret uses, so one file always makes the same bundle even after the
scheme changes: a file of one hex line (written before session 23) is scheme 1; files written
since begin with a header line naming scheme 2 (``DRAW_SCHEMES`` says what each changed).
Every draw is an HMAC-SHA256 of the secret and the draw's name, so one secret always gives the
same bundle choices and the draws are independent of each other. The bundle records only a
salted digest (``sha256(salt || secret)``, the salt stored beside it) so a site can tell which
of its secrets made a bundle (``matches_digest``) without the bundle revealing it; the model
card lists the drawn choices, never the secret.
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


@dataclass(frozen=True)
class FeatureRule:
    """How one draw scheme picks the forest's features: never ``never``, always ``always``
    (each at a drawn place in the order), and at least ``MIN_FEATURE_SHARE`` of the rest, from
    the HMAC stream named ``stream``. ``why`` is what the model card says of the scheme."""

    stream: str
    why: str
    never: tuple[str, ...] = ()
    always: tuple[str, ...] = ()


# Draw schemes differ only in their feature rule; new secret files get the last one.
# Scheme 2 (README, "Why the forests flag NIH", "Draw scheme 2"): of forests fitted like a site
# bundle's, every one reading noise_sigma (the absolute noise level) flagged 2.5-9.1% of clean
# NIH images, which are noisier than Kermany's doubly-compressed 224 copies; without it, a
# forest that also lacks near_zero_diff_frac flags 34-42% and one lacking residual_kurtosis
# 6-13%, and one lacking residual_std_ratio detects about half of PGD at eps 0.003 where the
# others detect about 80%.
FEATURE_RULES: dict[int, FeatureRule] = {
    1: FeatureRule("features", "the forest's features: at least 60% of the set, any of them"),
    2: FeatureRule(
        "features-v2",
        "the forest's features: never noise_sigma; always near_zero_diff_frac, "
        "residual_std_ratio and residual_kurtosis; at least 60% of the other seven (a forest "
        "reading the absolute noise level flags sources noisier than its training images: "
        "README, \"Why the forests flag NIH\" and \"Draw scheme 2\")",
        never=("noise_sigma",),
        always=("near_zero_diff_frac", "residual_std_ratio", "residual_kurtosis")),
}
DRAW_SCHEMES: dict[int, str] = {k: rule.why for k, rule in FEATURE_RULES.items()}
CURRENT_DRAW_SCHEME = max(DRAW_SCHEMES)
_HEADER = "xray-sentinel site secret, draw scheme "


class SecretError(ValueError):
    """A secret file that is missing, readable by others, or too short; says the fix."""


@dataclass(frozen=True)
class SiteSecret:
    """A secret file's contents: the secret's bytes and the draw scheme it is used with."""

    key: bytes
    draw_scheme: int


def new_secret_file(path: Path) -> Path:
    """Write a fresh 256-bit secret (hex, after a header naming ``CURRENT_DRAW_SCHEME``) to
    ``path``, mode 0600, refusing to overwrite one."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise SecretError(f"secret file {path} exists: never overwritten (a bundle made from "
                          "it would no longer be reproducible); pick a new path") from exc
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{_HEADER}{CURRENT_DRAW_SCHEME}\n{secrets.token_hex(32)}\n")
    return path


def read_secret(path: Path) -> SiteSecret:
    """The secret (surrounding whitespace stripped) and its draw scheme: the header line's, or
    1 for a file without one. Refuses a file others can read (chmod 600 it), one shorter than
    ``MIN_SECRET_BYTES`` and one naming a scheme this version does not know."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise SecretError(f"secret file {path} does not exist; make one with "
                          f"`sentinel train --secret-file {path} --new-secret ...`") from exc
    if not stat.S_ISREG(st.st_mode):
        raise SecretError(f"secret file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise SecretError(f"secret file {path} is readable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`")
    raw = path.read_bytes().strip()
    scheme = 1
    if raw.startswith(_HEADER.encode()):
        first, _, raw = raw.partition(b"\n")
        number = first[len(_HEADER):].decode("ascii", "replace").strip()
        if not number.isdigit() or int(number) not in DRAW_SCHEMES:
            raise SecretError(f"secret file {path} names draw scheme {number!r}, which this "
                              f"version does not know (known: {sorted(DRAW_SCHEMES)}); train "
                              "with the xray-sentinel release that wrote it")
        scheme, raw = int(number), raw.strip()
    if len(raw) < MIN_SECRET_BYTES:
        raise SecretError(f"secret file {path} holds {len(raw)} bytes, fewer than "
                          f"{MIN_SECRET_BYTES}; make a new one with --new-secret")
    return SiteSecret(raw, scheme)


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
    draw_scheme: int = 1  # train.secret.DRAW_SCHEMES; records from before it are scheme 1

    @property
    def tag(self) -> str:
        """Work-dir cache key of these choices (the models they make), not of the secret's
        digest nor of the draw scheme: the same choices reuse their trained models."""
        choices = {k: v for k, v in asdict(self).items()
                   if k not in ("salt", "digest", "draw_scheme")}
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
            f"| draw scheme | {self.draw_scheme}: {DRAW_SCHEMES[self.draw_scheme]} |",
            "",
            "Operating point: keep this bundle's threshold and add a CNN gate calibrated on at "
            "least 300 of the site's own clean images per source (`sentinel calibrate CLEAN_DIR "
            "--bundle THIS_BUNDLE --cnn-gate`, raised to attacks crafted on the public bundle "
            "with `--cnn-gate-attacks`, then `[detector] cnn_gate`): the attacker who holds the "
            "public bundle lacks this CNN's weights. On fourteen site bundles hardened with "
            "such attacks (`--harden-with`) the raised gate caught 94.5-100% of the strongest "
            "public-bundle attack, where the threshold alone caught none (README, \"Adaptive "
            "attacks\"). It does not stop an attacker who obtains this bundle.",
            "",
        ])


def draw(secret: bytes | SiteSecret, feature_set: str, zoo_families: tuple[str, ...] = (),
         salt: bytes | None = None) -> SecretDraws:
    """Every choice of a site bundle from ``secret`` (bare bytes: draw scheme 1, as before
    schemes were recorded). ``zoo_families``: the families training may draw from (empty
    without the zoo); a subset of at least ``MIN_ZOO_FAMILIES`` is kept. ``salt`` (default: 16
    fresh random bytes) only salts the recorded digest. Schemes differ only where
    ``DRAW_SCHEMES`` says; every other draw of a secret is the same in each."""
    from detector.features import FEATURE_SETS
    from detector.scoring import GATE_FEATURE
    from train.detector_cnn import CNN_SHAPES, CNN_SHAPES_V1, CNN_TRUNCS

    site = secret if isinstance(secret, SiteSecret) else SiteSecret(secret, 1)
    secret = site.key
    names = [n for n in FEATURE_SETS[feature_set] if n != GATE_FEATURE]
    r = _rng(secret, "cnn-shape")
    shape = CNN_SHAPES_V1[int(r.integers(len(CNN_SHAPES_V1)))]
    while shape not in CNN_SHAPES:  # over the latency budget: draw again, same stream
        shape = CNN_SHAPES_V1[int(r.integers(len(CNN_SHAPES_V1)))]
    trunc = float(CNN_TRUNCS[int(_rng(secret, "cnn-trunc").integers(len(CNN_TRUNCS)))])
    feats = _draw_features(secret, names, FEATURE_RULES[site.draw_scheme])
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
        digest=secret_digest(secret, salt), draw_scheme=site.draw_scheme)


def _draw_features(secret: bytes, names: list[str], rule: FeatureRule) -> tuple[str, ...]:
    """The forest's features by ``rule``, in a drawn order (scheme 1, with nothing never or
    always drawn, takes the same stream steps it took before schemes were recorded)."""
    always = [n for n in rule.always if n in names]
    others = [n for n in names if n not in rule.never and n not in always]
    r = _rng(secret, rule.stream)
    k = int(r.integers(int(np.ceil(MIN_FEATURE_SHARE * len(others))), len(others) + 1))
    feats = [others[i] for i in r.permutation(len(others))[:k]]
    for name in always:
        feats.insert(int(r.integers(len(feats) + 1)), name)
    return tuple(feats)


def feature_columns(draws: SecretDraws | None, feature_set: str) -> np.ndarray | None:
    """Indices of the drawn features in ``feature_set``'s vector (None: all, in order)."""
    if draws is None:
        return None
    from detector.features import FEATURE_SETS

    names = FEATURE_SETS[feature_set]
    return np.asarray([names.index(n) for n in draws.feature_names], np.int64)
