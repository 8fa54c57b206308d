"""The web review console (``sentinel console``): quarantine review, audit search and health.

A separate process from the gateway, reading the same state directory and calling the same
quarantine and audit code as the CLI (gateway.cmd_quarantine, gateway.audit). Only
``settings`` (config parsing) and ``cmd`` (argument parsing) import at ``sentinel`` start-up;
the web stack (Starlette, Jinja2, argon2) is imported when the console runs, never by
``sentinel serve``.
"""
