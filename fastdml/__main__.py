"""`python -m fastdml`: the `fastdml` command."""

from fastdml.cli import main

raise SystemExit(main())
