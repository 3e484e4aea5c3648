"""`s3dist config`: print the resolved config of a recipe + overrides, or the field reference."""

from __future__ import annotations

import yaml

from s3dist.config import describe, load_config, to_dict


def _show(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _reference(args) -> int:
    print("| key | default | meaning |\n|---|---|---|")
    for key, default, doc in describe():
        print(f"| `{key}` | `{default}` | {doc} |")
    return 0


def add_subcommands(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text)
    s = p.add_subparsers(dest="config_cmd", required=True)
    show = s.add_parser("show", help="validate and print the resolved config")
    show.add_argument("--config", help="recipe YAML")
    show.add_argument("overrides", nargs="*", help="dotted overrides key=value")
    show.set_defaults(func=_show)
    ref = s.add_parser("reference", help="every config key with its default and meaning (Markdown)")
    ref.set_defaults(func=_reference)
