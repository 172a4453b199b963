"""One flag style for every command line of the project.

Flags are spelled with underscores (`--seq_len`, `--val_domain`); each also accepts its dashed spelling
(`--seq-len`) as an alias, which help and error messages leave out. Abbreviations are refused
(`--max_step` is not `--max_steps`). Every command line builds its parser with `FlagParser`.
"""
import argparse


class FlagParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with allow_abbrev=False and the dashed spelling of every flag as an alias.
    Sub-commands (`add_subparsers().add_parser`) are FlagParsers too."""

    def __init__(self, *args, allow_abbrev=False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        # Aliases are added here, not in add_argument, so flags added through argument groups get them too.
        for action in self._actions:
            for option in action.option_strings:
                if option.startswith("--") and "_" in option:
                    self._option_string_actions.setdefault("--" + option[2:].replace("_", "-"), action)
        return super().parse_known_args(args, namespace)
