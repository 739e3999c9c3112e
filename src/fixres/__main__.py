"""Allow ``python -m fixres``."""

from fixres.cli.app import main

raise SystemExit(main())
