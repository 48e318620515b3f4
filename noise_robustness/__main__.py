"""``python -m noise_robustness {fit,validate,test,predict,sweep,certify,attack} ...``"""

import sys

try:  # loading torch and Lightning takes seconds: Ctrl-C then stops the command before it began, in one line
    from noise_robustness.cli import cli_main
    from noise_robustness.engine.memory import tune_allocator

    tune_allocator()  # freed memory kept for the next step's tensors
except KeyboardInterrupt:
    subcommands = ("fit", "validate", "test", "predict", "sweep", "certify", "attack")
    command = next((arg for arg in sys.argv[1:] if arg in subcommands), "noise_robustness")
    print(f"[{command}] stopped by SIGINT before it began: nothing was made; run it again", file=sys.stderr)
    sys.exit(130)  # 128 + SIGINT, as cli_main exits for a signal

cli_main()
