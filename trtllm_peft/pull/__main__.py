"""`python -m trtllm_peft.pull ...` = `trtllm-peft pull ...`."""

import sys

from trtllm_peft.pull.command import main

sys.exit(main())
