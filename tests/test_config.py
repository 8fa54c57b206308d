"""The config loader: valid files load into frozen dataclasses; every error names key and fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """
[listener]
port = 11112
[[callers]]
ae_title = "CR1"
addresses = ["10.1.0.0/16", "127.0.0.1"]
[state]
dir = "state"
[destinations.archive]
kind = "directory"
path = "out"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_example_config_loads() -> None:
    cfg = load_config(REPO / "systemd" / "sentinel.example.toml")
    assert cfg.listener.host == "127.0.0.1" and cfg.listener.port == 11112
    assert cfg.state_dir == Path("/var/lib/xray-sentinel")
    assert cfg.destinations["archive"].kind == "directory"
    # every instance with pixel data is screened; SR/KO/PR pass on their own (gateway.rules)
    assert cfg.rules == () and cfg.default.action == "screen"
    assert cfg.audit_path == Path("/var/lib/xray-sentinel/audit/audit.jsonl")
    assert cfg.quarantine_dir == Path("/var/lib/xray-sentinel/quarantine")


def test_example_config_rules_as_commented_load_and_check_says_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The example's commented rules, uncommented, are valid; the shipped file draws no
    WARNING from `sentinel check`, the one that lets a sender's pixels through unscreened does."""
    from gateway.cli import main

    text = (REPO / "systemd" / "sentinel.example.toml").read_text()
    assert main(["check", "--no-bundle", "--config", str(write(tmp_path, text))]) == 0
    assert "WARNING" not in capsys.readouterr().out
    start = text.index("# [[rules]]")
    block = text[start:text.index("[default]", start)]
    rules = "\n".join(line[2:].split("  #")[0].rstrip() if line.startswith("# ") else line
                      for line in block.splitlines())
    cfg = load_config(write(tmp_path, text.replace(block, rules + "\n")))
    assert [(r.name, r.action) for r in cfg.rules] == [
        ("old-cr-room", "reject"), ("dx-room-2", "screen"), ("us-room", "pass")]
    assert cfg.rules[2].allow_unscreened_pixels and not cfg.rules[1].allow_unscreened_pixels
    assert main(["check", "--no-bundle", "--config", str(cfg.path)]) == 0
    out = capsys.readouterr().out
    assert "WARNING:" in out and "'us-room' sets allow_unscreened_pixels" in out


def test_minimal_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.listener.ae_title == "SENTINEL"
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.destinations["archive"].path == tmp_path / "out"
    assert cfg.default.destinations == ("archive",)
    assert cfg.detector.bundle is None and cfg.detector.on_error == "quarantine"
    caller = cfg.callers[0]
    assert caller.allows("10.1.200.3") and caller.allows("127.0.0.1")
    assert not caller.allows("10.2.0.1") and not caller.allows("not-an-ip")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.listener.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("edit", "key", "fix_word"),
    [
        (("port = 11112", "port = 70000"), "listener.port", "between"),
        (("port = 11112", 'port = "x"'), "listener.port", "listener"),
        (('ae_title = "CR1"', 'ae_title = "WAY_TOO_LONG_AE_TITLE"'), "callers[0].ae_title",
         "1-16"),
        (('"10.1.0.0/16"', '"10.1.0.0/99"'), "callers[0].addresses", "CIDR"),
        (('kind = "directory"', 'kind = "ftp"'), "destinations.archive.kind", "dicom"),
        (("[state]", "[state]\nbogus = 1"), "state.bogus", "remove"),
    ],
)
def test_errors_name_key_and_fix(tmp_path: Path, edit: tuple[str, str], key: str,
                                 fix_word: str) -> None:
    p = write(tmp_path, MINIMAL.replace(*edit))
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg and key in msg and "fix:" in msg and fix_word in msg


def test_rule_validation(tmp_path: Path) -> None:
    good = MINIMAL + """
[[rules]]
name = "chest"
action = "screen"
threshold = 0.7
[rules.match]
Modality = ["CR", "DX"]
BodyPartExamined = { regex = "CHEST|THORAX" }
calling_ae = "CR1"
"""
    cfg = load_config(write(tmp_path, good))
    rule = cfg.rules[0]
    assert rule.threshold == 0.7 and [m.key for m in rule.matchers] == [
        "Modality", "BodyPartExamined", "calling_ae"]
    bad_key = good.replace("BodyPartExamined", "BodyPartExamed")
    with pytest.raises(ConfigError, match=r"rules\[0\]\.match\.BodyPartExamed"):
        load_config(write(tmp_path, bad_key))
    bad_dest = good.replace('action = "screen"', 'action = "screen"\ndestinations = ["pacs"]')
    with pytest.raises(ConfigError, match=r"unknown destination 'pacs'.*define"):
        load_config(write(tmp_path, bad_dest))
    bad_regex = good.replace('"CHEST|THORAX"', '"CHEST("')
    with pytest.raises(ConfigError, match="bad regex"):
        load_config(write(tmp_path, bad_regex))
    bad_action = good.replace('action = "screen"', 'action = "drop"')
    with pytest.raises(ConfigError, match="unknown action"):
        load_config(write(tmp_path, bad_action))


def test_syntax_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\(syntax\).*invalid TOML"):
        load_config(write(tmp_path, MINIMAL + "\n[[[\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_metrics_must_be_loopback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"metrics.host.*loopback"):
        load_config(write(tmp_path, MINIMAL + '[metrics]\nhost = "0.0.0.0"\n'))


def test_dicom_destination_and_bundle_path(tmp_path: Path) -> None:
    text = MINIMAL + """
[destinations.pacs]
kind = "dicom"
host = "127.0.0.1"
port = 4242
ae_title = "ORTHANC"
present_caller_ae = true
[detector]
bundle = "nowhere"
"""
    with pytest.raises(ConfigError, match=r"detector.bundle.*manifest.json"):
        load_config(write(tmp_path, text))
    cfg = load_config(write(tmp_path, text.replace('bundle = "nowhere"', "")))
    pacs = cfg.destinations["pacs"]
    assert pacs.kind == "dicom" and pacs.port == 4242 and pacs.present_caller_ae
    # two associations, the second only for a backlog of 16 MB (gateway.forward)
    assert pacs.associations == 2 and pacs.extra_association_backlog_mb == 16.0
    one = text.replace('bundle = "nowhere"', "").replace("present_caller_ae = true",
                                                          "associations = 1")
    assert load_config(write(tmp_path, one)).destinations["pacs"].associations == 1
    with pytest.raises(ConfigError, match=r"destinations.pacs.associations"):
        load_config(write(tmp_path, one.replace("associations = 1", "associations = 0")))
    always = one.replace("associations = 1", "extra_association_backlog_mb = 0")
    assert load_config(write(tmp_path, always)).destinations["pacs"] \
        .extra_association_backlog_mb == 0
    with pytest.raises(ConfigError, match=r"destinations.pacs.extra_association_backlog_mb"):
        load_config(write(tmp_path, always.replace("= 0", "= -1")))


def test_check_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    good = write(tmp_path, MINIMAL)
    assert main(["check", "--config", str(good), "--no-bundle"]) == 0
    assert "ok:" in capsys.readouterr().out
    pacs = write(tmp_path, MINIMAL + '[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
                 'port = 4242\nae_title = "PACS"\nassociations = 2\n')
    assert main(["check", "--config", str(pacs), "--no-bundle"]) == 0
    assert "pacs (dicom, 2 associations)" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL.replace("port = 11112", "port = 0"))
    assert main(["check", "--config", str(bad), "--no-bundle"]) == 2
    err = capsys.readouterr().err
    assert "listener.port" in err and "fix:" in err


def test_example_config_site_gates_as_commented_load(tmp_path: Path) -> None:
    """The example's commented [detector] gates (line gate, line ramp, CNN gate), uncommented,
    load together: the ramp's example lies under the gate's, as the gateway requires."""
    text = (REPO / "systemd" / "sentinel.example.toml").read_text()
    out = []
    for line in text.splitlines():
        key = line[2:].split("=")[0].strip() if line.startswith("# ") else ""
        out.append(line[2:].split("  #")[0].rstrip()
                   if key in ("line_gate", "line_ramp", "cnn_gate") else line)
    cfg = load_config(write(tmp_path, "\n".join(out) + "\n"))
    assert (cfg.detector.line_gate, cfg.detector.line_ramp, cfg.detector.cnn_gate) == (
        2.3, 2.0, 0.39)
