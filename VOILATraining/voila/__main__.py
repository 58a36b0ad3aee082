from __future__ import annotations

import sys

from voila.cli import main

sys.exit(main())
