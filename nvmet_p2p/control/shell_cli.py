"""The `targetcli-ext` console script: the shell, or one clear line when its extra is
missing (configshell-fb comes with `pip install 'nvmet-p2p[shell]'`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from nvmet_p2p.control import shell
    except ModuleNotFoundError as e:
        if e.name != "configshell_fb":
            raise
        print("targetcli-ext needs configshell-fb, which is not installed: pip install "
              "'nvmet-p2p[shell]' (Debian: apt install python3-configshell-fb)",
              file=sys.stderr)
        return 1
    return shell.main(argv)


if __name__ == "__main__":
    sys.exit(main())
