# `python -m cbs_convert.sample`: an entry point that nothing imports, so it may reach up to the cli layer.
from cbs_convert.cli.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
