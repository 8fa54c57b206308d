"""Run the gateway daemon: ``sentinel serve --config FILE``.

Logs go to stderr (journald under systemd) as one line per event, UIDs only, never patient
names or other PHI. Exit status: 0 after a clean drain (SIGTERM), 2 when the config is invalid
or the model bundle does not verify (the message names the file and the fix).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="service log level")


def setup_logging(level: str) -> None:
    """One line per record on stderr; third-party libraries kept quiet (they may print
    dataset contents at debug levels)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pynetdicom", "pydicom", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # Python warnings (pydicom's may quote element values, e.g. a malformed patient name)
    # go through logging too, and only errors are kept. "ignore" as well: under the default
    # filter the interpreter remembers every distinct warning text it has shown, and a stream
    # of malformed datasets makes every text distinct (memory without bound).
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def run(args: argparse.Namespace) -> int:
    from detector.errors import BundleError
    from detector.preprocess import skip_value_checks
    from gateway.config import ConfigError, load_config
    from gateway.detector_process import ScoringStartError
    from gateway.service import Gateway

    setup_logging(args.log_level)
    skip_value_checks()  # they only warn, and setup_logging drops every warning
    log = logging.getLogger("sentinel.serve")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    gateway = Gateway(config)
    gateway.install_signal_handlers()
    try:
        gateway.start()
    except BundleError as exc:
        log.error("model bundle refused, not starting: %s (fix: restore the bundle files or "
                  "point [detector] bundle at a verified bundle)", exc)
        gateway.stop()
        return 2
    except ScoringStartError as exc:  # not the bundle: a killed child, a denied system call...
        log.error("not starting: %s (fix: the cause named here; the model bundle was not "
                  "refused)", exc)
        gateway.stop()
        return 2
    except OSError as exc:
        log.error("cannot start: %s", exc)
        gateway.stop()
        return 2
    return gateway.run_forever()
