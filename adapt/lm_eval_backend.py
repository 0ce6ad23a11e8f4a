"""`python -m adapt.lm_eval_backend`: the old name of `python -m adapt.evaluation.lm_eval_backend` (lm-eval's command
line with `--model dlm-adapt` registered), kept until the release `adapt.deprecations` names."""

import sys

from .deprecations import renamed

if __name__ == "__main__":
    row = renamed("command")["python -m adapt.lm_eval_backend"]
    print(f"dlm-adapt: warning: {row.old} is now {row.new} (the old name goes in {row.removed_in})", file=sys.stderr)
    from .evaluation.lm_eval_backend import main

    sys.exit(main())
