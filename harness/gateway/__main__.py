import sys

from harness.gateway.cli import main

sys.exit(main())
