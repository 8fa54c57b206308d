"""Run the web review console, or manage its accounts.

  sentinel console --config F                      serve the console (see [console] in F)
  sentinel console --config F user add NAME --role viewer|reviewer|auditor|admin
  sentinel console --config F user passwd NAME     new password (also unlocks the account)
  sentinel console --config F user disable NAME    (enable NAME: enable and unlock)
  sentinel console --config F user list

Passwords are read from the terminal (twice) or, with --password-stdin, from the first line of
standard input; never from the command line, where ``ps`` and the shell history would show them.
Account changes are written to the audit log with the operator's OS account as actor.

Exit codes: 0 done, 2 error (bad config, unknown user, refused listener).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

EXIT_OK, EXIT_ERROR = 0, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", "-c", type=Path, required=True, help="the gateway's TOML file")
    sub = parser.add_subparsers(dest="console_command", metavar="ACTION")
    user = sub.add_parser("user", help="add, change, disable or list console accounts")
    acts = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = acts.add_parser("add", help="a new account")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=("viewer", "reviewer", "auditor", "admin"))
    add.add_argument("--password-stdin", action="store_true", help="read it from stdin")
    pw = acts.add_parser("passwd", help="set a new password and unlock")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true", help="read it from stdin")
    for name, text in (("disable", "refuse sign-in (ends open sessions)"),
                       ("enable", "allow sign-in again and clear a lockout")):
        p = acts.add_parser(name, help=text)
        p.add_argument("name")
    acts.add_parser("list", help="accounts, roles and lockouts")


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise ValueError("no terminal to ask for the password: pipe it with --password-stdin")
    first = getpass.getpass("New password: ")
    if getpass.getpass("Again: ") != first:
        raise ValueError("the two passwords differ")
    return first


def _user_command(args: argparse.Namespace) -> int:
    from gateway.audit import AuditLog
    from gateway.cmd_quarantine import operator_name
    from gateway.config import load_config
    from gateway.console.accounts import Accounts
    from gateway.console.settings import users_path

    cfg = load_config(args.config)
    accounts = Accounts(users_path(cfg.console, cfg.state_dir))
    command = args.user_command
    if command == "list":
        for u in accounts.list():
            state = "disabled" if u.disabled else f"locked ({u.failed} failed)" if u.locked \
                else "active"
            print(f"{u.name:<24} {u.role:<9} {state}")
        return EXIT_OK
    if command == "add":
        user = accounts.add(args.name, args.role, _password(args.password_stdin))
        what = f"added {user.name} as {user.role}"
    elif command == "passwd":
        accounts.set_password(args.name, _password(args.password_stdin))
        what = f"new password for {args.name} (unlocked)"
    elif command == "disable":
        accounts.disable(args.name)
        what = f"disabled {args.name}"
    else:
        accounts.enable(args.name)
        what = f"enabled and unlocked {args.name}"
    AuditLog(cfg.audit_path).append("console-user", actor=operator_name(), detail=what)
    print(what)
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from gateway.config import load_config
    from gateway.console.app import create_app
    from gateway.console.settings import ConsoleConfig

    cfg = load_config(args.config)
    s = cfg.console or ConsoleConfig()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(cfg)
    if not app.state.console.accounts.list():
        print("sentinel console: no accounts yet: add one with `sentinel console --config "
              f"{args.config} user add NAME --role admin`", file=sys.stderr)
    scheme = "https" if s.tls else "http"
    print(f"console: {scheme}://{s.host}:{s.port}/ (state {cfg.state_dir})", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=s.host, port=s.port, log_level="info", server_header=False,
                proxy_headers=False, ssl_certfile=str(s.tls_cert) if s.tls_cert else None,
                ssl_keyfile=str(s.tls_key) if s.tls_key else None)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError
    from gateway.console.accounts import AccountError

    try:
        if args.console_command == "user":
            return _user_command(args)
        return _serve(args)
    except ConfigError as exc:
        print(f"sentinel console: invalid config: {exc}", file=sys.stderr)
    except (AccountError, OSError, ValueError) as exc:
        print(f"sentinel console: {exc}", file=sys.stderr)
    return EXIT_ERROR
