"""
``twistd gridnode``: the command line and the service tree of a node.

`Options` turns the command line into a validated `NodeConfig` (config
file and command line; EC2 user-data joins at start-up, since reading it
needs the reactor). `makeService` assembles the node's services.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from gridnode import __version__
from gridnode.config import FILE_ONLY, SETTINGS, NodeConfig, build_config, load_config_file
from gridnode.errors import ConfigError
from gridnode.notify.targets import Defaults

#: options that may be given more than once (their values joined by commas)
REPEATABLE = frozenset({"webhook-allow", "webhook", "retain-inputs", "retain-outputs"})


def _shown(default: Any) -> str:
    if default is None or default == () or default == Defaults():
        return "none"
    return str(default)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run one gridnode node: it accepts video uploads over HTTP, converts them with ffmpeg, "
        "keeps originals and results in the store and serves them. Every option is also a key "
        "of the --config file (TOML) and of EC2 user-data; the command line wins over user-data, "
        "which wins over the config file."
    )
    optParameters = [["config", "c", None, "TOML file of configuration keys", str]] + [
        [s.key, None, None, f"{s.help} [default: {_shown(s.default)}]"] for s in SETTINGS
        if s.default is not False and s.key not in REPEATABLE and s.key not in FILE_ONLY
    ]
    optFlags = [[s.key, None, s.help] for s in SETTINGS if s.default is False]

    def __init__(self) -> None:
        super().__init__()
        self.cli: dict[str, Any] = {}
        self.file: dict[str, Any] = {}
        self.node_config: NodeConfig | None = None

    def parseOptions(self, options: list[str] | None = None) -> None:  # noqa: N802 - Twisted's name
        args = list(sys.argv[1:] if options is None else options)
        # --instance-metadata takes an optional URL; usage.Options has no such arity.
        for i, arg in enumerate(args):
            if arg == "--instance-metadata" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                args[i] = "--instance-metadata="
        super().parseOptions(args)

    def opt_webhook_allow(self, value: str) -> None:
        """address ranges webhooks may go to although not public (CIDR; repeatable, or comma-separated)"""
        self.opts["webhook-allow"] = ",".join(filter(None, [self.opts.get("webhook-allow"), value]))

    def opt_webhook(self, value: str) -> None:
        """notify URLs of every job that names none: URLS (comma-separated) for every tenant, TENANT=URLS
        for one (repeatable, or space-separated)"""
        self.opts["webhook"] = " ".join(filter(None, [self.opts.get("webhook"), value]))

    def opt_retain_inputs(self, value: str) -> None:
        """days a finished job's input is kept (default: for ever); TENANT=DAYS for one tenant's jobs
        (repeatable, or space-separated)"""
        self.opts["retain-inputs"] = " ".join(filter(None, [self.opts.get("retain-inputs"), value]))

    def opt_retain_outputs(self, value: str) -> None:
        """days a finished job's outputs are kept (default: for ever); TENANT=DAYS for one tenant's
        jobs (repeatable, or space-separated)"""
        self.opts["retain-outputs"] = " ".join(filter(None, [self.opts.get("retain-outputs"), value]))

    def opt_version(self) -> None:
        """Print gridnode's version and exit."""
        print(f"gridnode {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:  # noqa: N802 - Twisted's name
        # Flags are 0 when absent: only a given flag is a command-line setting.
        self.cli = {k: v for k, v in self.opts.items() if v not in (None, 0) and k != "config"}
        try:
            if self["config"]:
                self.file = load_config_file(self["config"])
            self.node_config = build_config(file=self.file, cli=self.cli, file_path=self["config"])
        except ConfigError as e:
            # One line and a non-zero exit: twistd would print its whole usage for a UsageError.
            raise SystemExit(f"twistd gridnode: {e.message}") from None


def makeService(options: Options, reactor: Any = None) -> IService:  # noqa: N802 - twistd's name
    """The node's service tree; the reactor is the global one unless given."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from gridnode.node import NodeService

    assert options.node_config is not None
    # twistd begins logging after makeService: the level filter goes on its observers once it runs
    from twisted.logger import globalLogPublisher

    from gridnode.logs import filter_levels

    reactor.callWhenRunning(filter_levels, globalLogPublisher, options.node_config.log_level)
    top = MultiService()
    top.setName("gridnode")
    NodeService(reactor, options.node_config, file=options.file, cli=options.cli,
                file_path=options["config"]).setServiceParent(top)
    return top
