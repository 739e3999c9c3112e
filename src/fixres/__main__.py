"""Allow ``python -m fixres``."""

from fixres.cli import main

raise SystemExit(main())
