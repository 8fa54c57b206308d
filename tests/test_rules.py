"""Routing rules: first match wins, default, non-image pass, thresholds, and `rules test`."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from gateway.config import load_config
from gateway.rules import Association, decide, early_rule
from tests.dicom_factory import make_sr, relabel, synthetic

CONFIG = """
[listener]
port = 11112
[[callers]]
ae_title = "CR1"
commitment = true
port = 104
[state]
dir = "state"
[destinations.pacs]
kind = "directory"
path = "pacs"
[destinations.research]
kind = "directory"
path = "research"
[detector.thresholds]
CR = 0.3

[[rules]]
name = "blocked-sender"
action = "reject"
[rules.match]
calling_ae = "OLDBOX"

[[rules]]
name = "knee"
action = "pass"
destinations = ["research"]
[rules.match]
BodyPartExamined = { regex = "KNEE|TIBIA" }

[[rules]]
name = "chest-dx"
action = "screen"
threshold = 0.8
shadow = true
[rules.match]
Modality = "DX"
BodyPartExamined = "CHEST"

[default]
action = "screen"
destinations = ["pacs"]
"""

A = Association(calling_ae="CR1", called_ae="SENTINEL", peer="127.0.0.1")


@pytest.fixture()
def cfg(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = tmp_path / "c.toml"
    p.write_text(CONFIG)
    return load_config(p)


def ds_of(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, defer_size=1024)


def test_first_match_and_default(cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    knee = ds_of(synthetic(tmp_path / "k.dcm", 64, 64, body_part="KNEE"))
    d = decide(cfg, knee, A)
    # 'knee' passes by BodyPartExamined, a header the sender writes: the image is screened
    # (and goes where the rule says), never passed on a label (issue 20 defect 3).
    assert (d.rule.name, d.action, d.destinations) == ("knee", "screen", ("research",))
    assert any("matched" in r for r in d.reasons)
    assert "rule 'knee' says pass, but the instance carries PixelData" in d.override

    chest_cr = ds_of(synthetic(tmp_path / "c.dcm", 64, 64, body_part="CHEST"))
    d = decide(cfg, chest_cr, A)
    assert (d.rule.name, d.action, d.threshold, d.shadow) == ("default", "screen", 0.3, False)
    assert any("Modality='DX': value 'CR' does not match" in r for r in d.reasons)

    chest_dx = ds_of(synthetic(tmp_path / "d.dcm", 64, 64, body_part="CHEST", modality="DX"))
    d = decide(cfg, chest_dx, A)
    # The rule's shadow is not applied: it is chosen by headers the sender writes, and the
    # default that association facts select enforces (gateway.rules: headers only tighten).
    assert (d.rule.name, d.threshold, d.shadow) == ("chest-dx", 0.8, False)
    assert d.at_most_bundle and d.threshold_for(0.6) == 0.6 and d.threshold_for(0.9) == 0.8


def test_association_facts(cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ds = ds_of(synthetic(tmp_path / "k.dcm", 64, 64, body_part="KNEE"))
    d = decide(cfg, ds, Association("OLDBOX", "SENTINEL", "10.0.0.1"))
    assert (d.rule.name, d.action) == ("blocked-sender", "reject")
    # The SCP can refuse before acknowledging: the rule needs association facts only.
    r = early_rule(cfg, "OLDBOX", "SENTINEL", "10.0.0.1", "1.2.840.10008.5.1.4.1.1.1")
    assert r is not None and r.name == "blocked-sender"
    # For other callers the outcome depends on the dataset: unknown at association time.
    assert early_rule(cfg, "CR1", "SENTINEL", "10.0.0.1", "1.2.840.10008.5.1.4.1.1.1") is None


def test_non_image_passes_unless_a_rule_says_otherwise(cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sr = ds_of(make_sr(tmp_path / "sr.dcm"))
    d = decide(cfg, sr, A)
    assert d.action == "pass" and d.destinations == ("pacs",)
    assert "non-image-pass" in d.reasons
    d = decide(cfg, sr, Association("OLDBOX", "SENTINEL", ""))
    assert d.action == "reject"


def test_rules_test_command(cfg, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from gateway.cli import main

    knee = synthetic(tmp_path / "k.dcm", 64, 64, body_part="TIBIA")
    chest = synthetic(tmp_path / "c.dcm", 64, 64)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    rc = main(["rules", "test", "--config", str(cfg.path), "--calling-ae", "CR1",
               str(knee), str(chest), str(junk)])
    out = capsys.readouterr().out
    assert rc == 1  # one file unreadable
    assert f"{knee}: rule 'knee' -> screen to research" in out
    assert f"{chest}: rule 'default' -> screen to pacs, threshold 0.3" in out
    assert "BodyPartExamined~/KNEE|TIBIA/: matched" in out
    assert f"{junk}: unreadable" in out
    assert "storage commitment for CR1: Success only for what every destination" in out
    assert "reports go to 127.0.0.1:104" in out


# -- issue 20 defect 3: screening must not be skipped by editing a header -----------------------

# The example config's routing before the fix: screen CR and DX, pass everything else.
ROUTING = """
[listener]
port = 11112
[state]
dir = "state"
[destinations.archive]
kind = "directory"
path = "archive"
[detector.thresholds]
CR = 0.3
DX = 0.9

[[rules]]
name = "radiographs"
action = "screen"
destinations = ["archive"]
[rules.match]
Modality = ["CR", "DX"]

[default]
action = "pass"
destinations = ["archive"]
"""
CR_CLASS = "1.2.840.10008.5.1.4.1.1.1"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR


@pytest.fixture()
def routing(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = tmp_path / "routing.toml"
    p.write_text(ROUTING)
    return load_config(p)


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    return synthetic(tmp_path / "cr.dcm", 64, 64)


def assert_screened(d, why: str) -> None:  # type: ignore[no-untyped-def]
    assert d.action == "screen", d.reasons
    assert d.override and why in d.override and "screened instead" in d.override
    assert d.rule.name == "default" and d.destinations == ("archive",)
    assert d.override in d.reasons


@pytest.mark.parametrize("label", ["OT", "cr", "", "CR "])
def test_relabelled_image_is_screened(routing, image: Path, tmp_path: Path, label: str) -> None:  # type: ignore[no-untyped-def]
    """Before: Modality OT (or cr, empty, padded) missed the CR/DX rule and the default passed
    it unscreened."""
    ds = ds_of(relabel(image, tmp_path / "x.dcm", modality=label))
    if label == "CR ":  # pydicom strips trailing padding when reading: this one matches the rule
        d = decide(routing, ds, A)
        assert (d.rule.name, d.action, d.override) == ("radiographs", "screen", "")
        return
    assert_screened(decide(routing, ds, A), "carries PixelData")


def test_sr_class_with_pixel_data_is_screened(routing, image: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An image relabelled as a Basic Text SR (dataset and file meta) keeps its Pixel Data."""
    path = relabel(image, tmp_path / "srpix.dcm", modality="SR", sop_class=SR_CLASS)
    ds = ds_of(path)
    assert_screened(decide(routing, ds, A), "carries PixelData")
    # also when the presentation context negotiated the SR class (what storescu proposes)
    assert_screened(decide(routing, ds, A, sop_class=SR_CLASS), "carries PixelData")


def test_sr_without_pixels_passes(routing, cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sr = make_sr(tmp_path / "sr.dcm")
    for config in (routing, cfg):  # a pass default, and a screen default
        d = decide(config, ds_of(sr), A, sop_class=SR_CLASS, path=sr)
        assert (d.action, d.override) == ("pass", ""), d.reasons
        assert d.destinations == (("archive",) if config is routing else ("pacs",))


def test_negotiated_class_must_match_the_dataset(routing, cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An SR dataset without pixels passes only when the presentation context and the file meta
    name the same SOP class: a CR context carrying an 'SR' is not a report."""
    sr = make_sr(tmp_path / "sr.dcm")
    # the mismatch written into the file itself (file meta CR, dataset SR)
    mixed = pydicom.dcmread(sr)
    mixed.file_meta.MediaStorageSOPClassUID = CR_CLASS
    mixed.save_as(tmp_path / "mixed.dcm")  # enforce_file_format would rewrite the meta
    assert_screened(decide(routing, ds_of(tmp_path / "mixed.dcm"), A), "image class")
    # the presentation context's class against an SR file whose meta and dataset agree
    ds = ds_of(sr)
    assert_screened(decide(routing, ds, A, sop_class=CR_CLASS), "image class")
    other = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR: no pixels, but not what was sent
    assert_screened(decide(routing, ds, A, sop_class=other), "SOP classes disagree")
    d = decide(cfg, ds, A, sop_class=CR_CLASS)  # screen default: no non-image pass either
    assert d.action == "screen" and "non-image-pass" not in d.reasons


def test_image_class_without_pixel_data_goes_to_the_detector(routing, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A CR whose Pixel Data was cut away is screened, so the detector quarantines it with its
    typed reason (no-pixel-data), instead of passing as if it were a report."""
    ds = pydicom.dcmread(synthetic(tmp_path / "cr.dcm", 64, 64, modality="OT"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)
    d = decide(routing, ds_of(tmp_path / "nopix.dcm"), A)
    assert_screened(d, "image class")
    assert any("no Pixel Data: the detector decides" in r for r in d.reasons) or d.override


def test_pixel_data_beyond_where_the_parser_stops(routing, image: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """pydicom stops silently at a top-level item delimiter; a reader that goes on finds the
    Pixel Data behind it. An SR whose file does not parse to its end is not passed."""
    sr = make_sr(tmp_path / "sr.dcm")
    pixel = relabel(image, tmp_path / "p.dcm").read_bytes()
    tail = pixel[pixel.find(b"\xe0\x7f\x10\x00"):]
    hidden = tmp_path / "hidden.dcm"
    hidden.write_bytes(sr.read_bytes() + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + tail)
    ds = ds_of(hidden)
    assert "PixelData" not in ds  # invisible to the parse the rules see
    assert_screened(decide(routing, ds, A), "parse to its end")  # the file: ds.filename
    assert_screened(decide(routing, ds, A, sop_class=SR_CLASS, path=hidden), "parse to its end")


def test_relabelling_never_buys_a_more_lenient_threshold(routing, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """[detector.thresholds] is keyed on Modality, which the sender writes: DX = 0.9 may not
    loosen the bundle's threshold for a CR relabelled DX, and lower-case cr gets CR's 0.3."""
    def threshold(modality: str, bundle: float = 0.5) -> float | None:
        ds = ds_of(synthetic(tmp_path / f"{modality or 'none'}.dcm", 32, 32, modality=modality))
        t = decide(routing, ds, A).threshold_for(bundle)
        return bundle if t is None else t  # None: the bundle's own

    assert threshold("CR") == 0.3
    assert threshold("cr") == 0.3
    assert threshold("DX") == 0.5  # capped at the bundle's: a relabel cannot loosen
    assert threshold("DX", bundle=0.95) == 0.9  # below the bundle's it tightens
    assert threshold("OT") == 0.5
    # a header-keyed rule threshold is capped by the baseline the sender's association gives
    text = ROUTING.replace('[default]\naction = "pass"',
                           '[default]\naction = "pass"\nthreshold = 0.6')
    text = text.replace('action = "screen"\n', 'action = "screen"\nthreshold = 0.99\n', 1)
    p = tmp_path / "t.toml"
    p.write_text(text)
    cfg = load_config(p)
    ds = ds_of(synthetic(tmp_path / "dx.dcm", 32, 32, modality="DX"))
    d = decide(cfg, ds, A)
    assert (d.rule.name, d.threshold, d.at_most_bundle) == ("radiographs", 0.6, False)
    assert any("capped at 0.6" in r for r in d.reasons)
    # a header-keyed rule without a threshold keeps the bundle's, never the more lenient baseline
    p.write_text(text.replace("threshold = 0.99\n", "").replace("CR = 0.3\nDX = 0.9\n", ""))
    d = decide(load_config(p), ds, A)
    assert (d.rule.name, d.threshold_for(0.5), d.threshold_for(0.7)) == ("radiographs", 0.5, 0.6)


def test_association_keyed_thresholds_and_shadow_still_apply(tmp_path: Path) -> None:
    """A threshold or shadow chosen by association facts (checked by the gateway) is honoured,
    also above the bundle's: that is how a noisy source is given a more lenient threshold."""
    text = ROUTING.replace("[default]", """[[rules]]
name = "noisy-dx-room"
action = "screen"
threshold = 0.97
shadow = true
[rules.match]
calling_ae = "DXROOM"

[default]""")
    p = tmp_path / "a.toml"
    p.write_text(text)
    cfg = load_config(p)
    ds = ds_of(synthetic(tmp_path / "ot.dcm", 32, 32, modality="OT"))
    d = decide(cfg, ds, Association("DXROOM", "SENTINEL", "10.0.0.9"))
    assert (d.rule.name, d.action, d.threshold_for(0.5), d.shadow) == (
        "noisy-dx-room", "screen", 0.97, True)
    # a CR from that room matches 'radiographs' first: CR's 0.3 tightens, shadow stays
    ds = ds_of(synthetic(tmp_path / "cr2.dcm", 32, 32))
    d = decide(cfg, ds, Association("DXROOM", "SENTINEL", "10.0.0.9"))
    assert (d.rule.name, d.threshold_for(0.5)) == ("radiographs", 0.3)


UNSCREENED_RULE = """
[[rules]]
name = "ultrasound-room"
action = "pass"
allow_unscreened_pixels = true
destinations = ["archive"]
[rules.match]
calling_ae = "US1"
peer = "10.0.0.7"
"""


def test_allow_unscreened_pixels_is_explicit_and_keyed_on_the_sender(
        image: Path, tmp_path: Path) -> None:
    p = tmp_path / "u.toml"
    p.write_text(ROUTING.replace("[default]", UNSCREENED_RULE + "\n[default]"))
    cfg = load_config(p)
    ds = ds_of(relabel(image, tmp_path / "us.dcm", modality="US"))
    d = decide(cfg, ds, Association("US1", "SENTINEL", "10.0.0.7"))
    assert (d.rule.name, d.action) == ("ultrasound-room", "pass")
    assert "UNSCREENED" in d.override and "allow_unscreened_pixels" in d.override
    # another sender writing the same header is screened
    d = decide(cfg, ds, Association("US2", "SENTINEL", "10.0.0.7"))
    assert d.action == "screen"


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ('name = "x"\naction = "pass"\nallow_unscreened_pixels = true\n[rules.match]\n'
         'Modality = "US"', "Modality, which the sender writes"),
        ('name = "x"\naction = "pass"\nallow_unscreened_pixels = true\n[rules.match]\n'
         'calling_ae = "US1"\nSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"', "SOPClassUID"),
        ('name = "x"\naction = "screen"\nallow_unscreened_pixels = true\n[rules.match]\n'
         'calling_ae = "US1"', 'only meaningful with action = "pass"'),
        ('name = "x"\naction = "pass"\nallow_unscreened_pixels = true', "every sender"),
    ],
)
def test_allow_unscreened_pixels_refused_where_a_header_reaches_it(
        tmp_path: Path, rule: str, problem: str) -> None:
    from gateway.config import ConfigError

    p = tmp_path / "bad.toml"
    p.write_text(ROUTING.replace("[default]", f"[[rules]]\n{rule}\n\n[default]"))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert err.value.key.endswith("allow_unscreened_pixels") and problem in err.value.problem
    assert err.value.fix
    p.write_text(ROUTING + "allow_unscreened_pixels = true\n")  # never on the default
    with pytest.raises(ConfigError, match="allow_unscreened_pixels"):
        load_config(p)


def test_check_warns_about_header_keyed_routing(  # type: ignore[no-untyped-def]
        routing, capsys: pytest.CaptureFixture[str]) -> None:
    """`sentinel check` accepts the old routing (exit 0) but says, on WARNING lines, that the
    default's pass and the per-Modality thresholds do not do what they seem to."""
    from gateway.cli import main

    assert main(["check", "--no-bundle", "--config", str(routing.path)]) == 0
    out = capsys.readouterr().out
    warnings = [x for x in out.splitlines() if x.startswith("WARNING:")]
    assert len(warnings) == 2, out
    assert '[default] action = "pass"' in warnings[0] and "Modality" in warnings[0]
    assert "lower-case cr" in warnings[0]
    assert "[detector.thresholds] (CR = 0.3, DX = 0.9)" in warnings[1]
    assert out.count("    means: ") == 2 and out.count("    fix: ") == 2
    assert 'set [default] action = "screen"' in out


def test_check_warns_with_the_bundle_threshold(routing) -> None:  # type: ignore[no-untyped-def]
    from gateway.rules import config_warnings

    (_what, meaning, fix), = [w for w in config_warnings(routing, 0.62) if "thresholds" in w[0]]
    assert "no effect here: [detector.thresholds] DX = 0.9 > 0.62" in meaning
    assert "calling_ae" in fix


def test_check_warns_about_pass_rules_on_headers_and_unscreened(tmp_path: Path) -> None:
    from gateway.rules import config_warnings

    p = tmp_path / "w.toml"
    text = CONFIG.replace("[default]", UNSCREENED_RULE.replace('"archive"', '"pacs"')
                          + "\n[default]")
    p.write_text(text)
    warnings = config_warnings(load_config(p))
    heads = [w[0] for w in warnings]
    assert any("rule 'knee' passes instances by BodyPartExamined" in h for h in heads)
    assert any("rule 'chest-dx' sets shadow but matches on Modality, BodyPartExamined" in h
               for h in heads)
    assert any("rule 'ultrasound-room' sets allow_unscreened_pixels" in h
               and "WITHOUT SCREENING" in h for h in heads)


def test_rules_test_shows_the_real_outcome(routing, image: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    ot = relabel(image, tmp_path / "ot.dcm", modality="OT")
    sr = make_sr(tmp_path / "sr.dcm")
    rc = main(["rules", "test", "--config", str(routing.path), str(ot), str(sr)])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"{ot}: rule 'default' -> screen to archive, threshold 0.3 or the bundle's" not in out
    assert f"{ot}: rule 'default' -> screen to archive, threshold bundle default" in out
    assert "rule 'default' says pass, but the instance carries PixelData: screened" in out
    assert f"{sr}: rule 'default' -> pass to archive" in out
    # the negotiated class can be given: an SR sent on a CR context is screened
    main(["rules", "test", "--config", str(routing.path), "--sop-class", CR_CLASS, str(sr)])
    assert f"{sr}: rule 'default' -> screen to archive" in capsys.readouterr().out
