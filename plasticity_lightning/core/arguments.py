"""The argument parser of the subcommands that are not LightningCLI (``report``, ``study``, ``tune``).

It is jsonargparse's parser, the one LightningCLI itself uses, so these commands read ``--config`` files the way
``plasticity fit`` does: a YAML mapping of the command's options (keys are the long options' names with ``_``,
e.g. ``summary_tasks``), composed left to right with repeated ``--config``; the command line wins over the files.
A usage error is a :class:`~plasticity_lightning.core.errors.PlasticityConfigError`, which ``plasticity`` prints
as one line and exits with status 2.

.. code-block:: yaml

    # comparison.yaml: plasticity report --config comparison.yaml
    compare: true
    runs: [runs/bp, runs/cbp]
    labels: [BP, CBP]
    summary_tasks: 5
"""

from __future__ import annotations

import re
from typing import Any, NoReturn

from jsonargparse import ActionConfigFile, ArgumentParser

from plasticity_lightning.core.errors import PlasticityConfigError

# the parser's own options (help, the config file, jsonargparse's printers), not keys of a command's config
_PARSER_OWN = frozenset({"help", "config", "print_config", "print_shtab", "==SUPPRESS=="})
CONFIG_HELP = (
    "YAML file of this command's options (keys as the long options, with _); repeat to compose: later files "
    "and the command line win"
)


class CommandParser(ArgumentParser):
    """jsonargparse's parser with ``--config`` (when ``config=True``) and one-line configuration errors.

    Args:
        config: add ``--config`` (a command whose own ``--config`` means something else, like ``tune``'s recipe,
            passes ``False``).
        *args, **kwargs: as for :class:`jsonargparse.ArgumentParser`.

    Example:
        >>> parser = CommandParser(prog="plasticity demo")
        >>> _ = parser.add_argument("--tasks", type=int, default=3)
        >>> parser.parse_args(["--tasks", "5"]).tasks
        5
        >>> parser.option_keys()
        ['tasks']
        >>> parser.parse_args(["--tasks", "many"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        plasticity_lightning.core.errors.PlasticityConfigError: plasticity demo: Parser key "tasks": ... many (see: ...)
    """

    def __init__(self, *args: Any, config: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)
        if config:
            self.add_argument("--config", action=ActionConfigFile, help=CONFIG_HELP)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # jsonargparse's messages span lines (the key, then the reason): the CLI promises one line
        message = " ".join(message.split())
        if re.match(r"Option '.*' is not accepted", message):
            message += f"; accepted: {', '.join(self.option_keys())}"
        elif match := re.match(r"Subcommand '(.*)' does not accept option", message):
            subcommand = self._subcommands_action._name_parser_map[match.group(1)]
            message += f"; accepted: {', '.join(subcommand.option_keys())}"
        raise PlasticityConfigError(f"{self.prog}: {message} (see: {self.prog} --help)") from ex

    def option_keys(self) -> list[str]:
        """The keys a ``--config`` file may hold: every option's and positional's destination."""
        return sorted(action.dest for action in self._actions if action.dest not in _PARSER_OWN)
